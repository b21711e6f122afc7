"""An iteration's labels as fairseq's HuBERT recipe reads them: train.tsv + train.km (valid.*), dict.km.txt.

fairseq reads a .tsv line as a file, or as `path:offset:length`, the bytes of an audio file inside
another (`fairseq.data.audio.audio_utils.parse_path`): a WebDataset member or a Hugging Face Arrow
value is named that way. Audio fairseq cannot address (a span of a recording, a Parquet row) is
written out, as float WAV at its own rate, to `OUT/audio/<id>.wav`, and named there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import zarr

from infra.store import ArtifactStore
from tasks.corpus.audio import read_utterance
from tasks.corpus.manifest import Utterance
from tasks.frames.store import id_batches
from tasks.products import ExportError
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest


@dataclass(frozen=True)
class FairseqSplit:
    """One split's files: `<name>.tsv` (audio manifest) and `<name>.km` (labels), same order."""

    name: str
    tsv: Path
    km: Path
    utterances: int


def utterance_split(utterance: Utterance) -> str:
    """"train" or "valid"; manifests written before validation splits existed are all train."""
    return getattr(utterance, "split", "train")


def fairseq_root(paths: list[str]) -> tuple[str, list[str]]:
    """fairseq's manifest root folder and each path relative to it.

    The root is the deepest folder holding every file; with none but `/` (files on several
    disks), it is `/` and the paths stay absolute, which fairseq's os.path.join keeps as they are.
    """
    folders = [path.split("/")[:-1] for path in paths]
    common: list[str] = []
    for parts in zip(*folders):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    root = "/".join(common)
    if root in ("", "/") or root.endswith(":") or root.endswith(":/"):
        return "/", paths
    return root, [path[len(root) + 1 :] for path in paths]


def _utterance_labels(array: zarr.Array, offsets: np.ndarray) -> Iterator[np.ndarray]:
    """Each utterance's labels in manifest order, read a few chunks at a time."""
    chunk_frames = array.chunks[0]
    loaded_start, loaded = 0, np.zeros(0, dtype=np.int16)
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        if stop > loaded_start + loaded.shape[0]:
            loaded_start = (start // chunk_frames) * chunk_frames
            loaded = array[loaded_start : max(stop, min(loaded_start + 4 * chunk_frames, array.shape[0]))]
        yield loaded[start - loaded_start : stop - loaded_start]


AUDIO_FOLDER = "audio"


def fairseq_audio(utterance: Utterance, out_dir: Path, storage_options: dict) -> str:
    """Where fairseq reads an utterance's audio: its file, `shard:offset:length`, or a file written
    out for it (a span, a Parquet row)."""
    if not utterance.is_span and utterance.row is None:
        if utterance.byte_offset is not None:
            return f"{utterance.path}:{utterance.byte_offset}:{utterance.byte_length}"
        return utterance.path
    target = out_dir / AUDIO_FOLDER / f"{utterance.id}.wav"
    target.parent.mkdir(parents=True, exist_ok=True)
    samples, sample_rate = read_utterance(utterance, storage_options)
    temporary = target.with_name(target.name + ".partial")
    soundfile.write(temporary, samples, sample_rate, subtype="FLOAT", format="WAV")
    temporary.replace(target)
    return str(target)


def _write_atomically(target: Path, lines: list[str]) -> None:
    temporary = target.with_name(target.name + ".partial")
    temporary.write_text("".join(line + "\n" for line in lines))
    temporary.replace(target)


def export_fairseq_labels(store: ArtifactStore, layout: RunLayout, iteration: int, out_dir: Path) -> list[FairseqSplit]:
    """fairseq's HuBERT training files for an iteration's labels, as `fairseq-hydra-train` reads them.

    `train.tsv` + `train.km` always, `valid.tsv` + `valid.km` for utterances in the valid split:
    the .tsv's first line is the audio root, then `relpath<TAB>samples` (as the file holds them,
    before resampling), and line i of the .km is the labels of the .tsv's utterance i. And
    `dict.km.txt`: `<label> <frames>` for every label 0..k-1, unused ones with count 0.
    """
    group = store.open_zarr(layout.labels_store(iteration), mode="r")
    offsets, k = group["offsets"][:], int(group.attrs["k"])
    utterances = load_manifest(store, layout)
    stored_ids = group["utt_ids"]
    if len(utterances) != stored_ids.shape[0] or any(
        mine != theirs for mine, theirs in zip(id_batches(utterances.ids()), id_batches(stored_ids))
    ):
        raise ExportError(f"labels of iteration {iteration} do not follow the run's manifest (utterance ids differ)")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "valid": []}
    chosen: dict[str, list[tuple[str, int]]] = {"train": [], "valid": []}
    counts = np.zeros(k, dtype=np.int64)
    for utterance, labels in zip(utterances, _utterance_labels(group["labels"], offsets)):
        split = utterance_split(utterance)
        if split not in lines:
            raise ExportError(f"utterance {utterance.id}: unknown split {split!r} (expected 'train' or 'valid')")
        lines[split].append(" ".join(map(str, labels.tolist())))
        chosen[split].append((fairseq_audio(utterance, out_dir, store.storage_options), utterance.samples))
        counts += np.bincount(labels, minlength=k)
    written = []
    for split in ("train", "valid"):
        if split == "valid" and not chosen[split]:
            continue
        root, relpaths = fairseq_root([path for path, _ in chosen[split]])
        tsv, km = out_dir / f"{split}.tsv", out_dir / f"{split}.km"
        _write_atomically(tsv, [root] + [f"{rel}\t{samples}" for rel, (_, samples) in zip(relpaths, chosen[split])])
        _write_atomically(km, lines[split])
        written.append(FairseqSplit(split, tsv, km, len(chosen[split])))
    _write_atomically(out_dir / "dict.km.txt", [f"{label} {count}" for label, count in enumerate(counts.tolist())])
    return written
