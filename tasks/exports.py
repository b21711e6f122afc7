"""Committed artifacts in other tools' formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infra.store import ArtifactStore
from tasks.layout import RunLayout


def export_fairseq_labels(store: ArtifactStore, layout: RunLayout, iteration: int, out_dir: Path, split: str) -> Path:
    """Write fairseq's `<split>.km` (one line of labels per utterance, manifest order) and `dict.km.txt`."""
    group = store.open_zarr(layout.labels_store(iteration), mode="r")
    offsets, array = group["offsets"][:], group["labels"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{split}.km"
    temporary = target.with_suffix(".km.partial")
    chunk_frames = array.chunks[0]
    with temporary.open("w") as handle:
        loaded_start, loaded = 0, np.zeros(0, dtype=np.int16)
        for start, stop in zip(offsets[:-1], offsets[1:]):
            if stop > loaded_start + loaded.shape[0]:
                loaded_start = (start // chunk_frames) * chunk_frames
                loaded = array[loaded_start : max(stop, min(loaded_start + 4 * chunk_frames, array.shape[0]))]
            handle.write(" ".join(map(str, loaded[start - loaded_start : stop - loaded_start].tolist())) + "\n")
    temporary.replace(target)
    (out_dir / "dict.km.txt").write_text("".join(f"{label} 1\n" for label in range(int(group.attrs["k"]))))
    return target
