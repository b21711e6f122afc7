"""Store bytes and stage times of each way to keep features: `features.keep` all | sample x `features.dtype` float32 | float16.

    .venv/bin/python bench/storage.py [--minutes 20] [--chunk-frames 1024] [--workers 2] [--train-steps 20] [--no-hubert]

On a synthesized corpus (devtools/demo_corpus.py), k-means on the paper's 10% sample: iteration 1
(39-dim MFCC, 100 frames/s, k=100) and, unless --no-hubert, iteration 2 (layer 3 of a `tiny`
model, 192 dims at 50 frames/s, trained --train-steps steps on iteration 1's labels, k=100). For
each mode it prints the bytes per audio hour of the features store and of the labels store, the
feature and label stages' wall times (their records' seconds), and the store's bytes against
`keep: all` float32; then what a 768-dim layer of LibriSpeech-960 would take, from the share of
the corpus's frames each mode stored and its bytes per value. Each mode runs in a store of its
own that starts from a copy of the shared stages (intake, and for iteration 2 all of iteration 1),
so only its own stages run.

A store's last chunk is stored whole (Zarr pads it), so on a corpus of minutes a sample store
carries up to a chunk of padding that LibriSpeech would not notice: hence small chunks here.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.commit import StageRecord
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import FEATURES_STORE, LABELS_STORE
from tasks.stages.catalog import run_plan

MODES = (("all", "float32"), ("all", "float16"), ("sample", "float32"), ("sample", "float16"))
LIBRISPEECH_HOURS = 960
BASE_DIM, BASE_FRAME_RATE = 768, 50
LAYER = 3
KMEANS = {"k": 100, "sample_fraction": 0.1}


def config_for(
    store: Path, wav: Path, args: argparse.Namespace, first: dict[str, Any], second: dict[str, Any] | None
) -> PretrainConfig:
    """Iteration 1 on MFCC stored as `first` says and, with `second`, iteration 2 on a layer of its model."""
    steps = args.train_steps
    train = {"model": "tiny", "steps": steps, "max_batch_seconds": 20, "max_sample_seconds": 5,
             "io": {"checkpoint_every": steps}, "logging": {"log_every": steps}}
    chunks = {"chunk_frames": args.chunk_frames}
    iterations = [{"features": {"kind": "mfcc", **chunks, **first}, "kmeans": KMEANS, "train": train}]
    if second is not None:
        iterations.append({"features": {"kind": "hubert", "layer": LAYER, **chunks, **second}, "kmeans": KMEANS})
    return PretrainConfig.model_validate({"run": "bench", "store": str(store), "corpus": {"source": str(wav)}, "iterations": iterations})


def row(name: str, mode: tuple[str, str], records: dict, iteration: int, hours: float, reference: int | None) -> tuple[str, int]:
    features: StageRecord = records[("features", iteration)]
    labels: StageRecord = records[("labels", iteration)]
    features_bytes = features.objects[FEATURES_STORE].bytes
    labels_bytes = labels.objects[LABELS_STORE].bytes
    share = "" if reference is None else f"{features_bytes / reference:6.3f}x"
    float16 = labels.metrics.get("float16_agreement")
    agreement = f"{100 * float16['share']:7.3f}%" if float16 else "      -"
    return (
        f"{name:<24}{mode[0]:<8}{mode[1]:<9}{features_bytes / hours / 2**20:>16.1f}{labels_bytes / hours / 2**20:>14.2f}"
        f"{features.seconds:>12.1f}{labels.seconds:>10.1f}{share:>12}{agreement:>11}"
    ), features_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--chunk-frames", type=int, default=1024, help="features.chunk_frames of every run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--no-hubert", action="store_true", help="iteration 1 (MFCC) only")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    wav = cached_demo_corpus(args.out, args.minutes)
    lines, bytes_per_value = [], {}
    with tempfile.TemporaryDirectory(dir=args.out) as scratch_name, dask_client(n_workers=args.workers) as client:
        scratch = Path(scratch_name)
        base = config_for(scratch / "base", wav, args, {}, None if args.no_hubert else {})
        base_records = run_plan(base, ArtifactStore(base.store), client, "intake" if args.no_hubert else "train")
        hours = base_records[("intake", None)].counts["hours"]
        reference = None
        for keep, dtype in MODES:
            store = scratch / f"mfcc-{keep}-{dtype}"
            shutil.copytree(scratch / "base" / "bench" / "corpus", store / "bench" / "corpus")
            config = config_for(store, wav, args, {"keep": keep, "dtype": dtype}, None)
            records = run_plan(config, ArtifactStore(config.store), client, "labels")
            line, size = row("1: MFCC 39-dim", (keep, dtype), records, 1, hours, reference)
            reference = reference or size
            lines.append(line)
        if not args.no_hubert:
            reference = None
            for keep, dtype in MODES:
                store = scratch / f"layer-{keep}-{dtype}"
                shutil.copytree(scratch / "base", store)
                config = config_for(store, wav, args, {}, {"keep": keep, "dtype": dtype})
                records = run_plan(config, ArtifactStore(config.store), client, "labels@2")
                line, size = row(f"2: tiny layer {LAYER} 192-dim", (keep, dtype), records, 2, hours, reference)
                reference = reference or size
                lines.append(line)
                counts = records[("features", 2)].counts
                stored_share = counts["frames"] / counts.get("corpus_frames", counts["frames"])
                bytes_per_value[(keep, dtype)] = stored_share * np.dtype(dtype).itemsize
    print(f"corpus: {args.minutes:g} min of synthesized speech ({hours:.3f} h), {args.workers} Dask workers; k-means sample_fraction 0.1")
    print(
        f"{'iteration: features':<24}{'keep':<8}{'dtype':<9}{'features MiB/h':>16}{'labels MiB/h':>14}"
        f"{'features s':>12}{'labels s':>10}{'vs all/f32':>12}{'f16 agree':>11}"
    )
    print("\n".join(lines))
    if bytes_per_value:
        frames = LIBRISPEECH_HOURS * 3600 * BASE_FRAME_RATE
        scaled = {mode: value * frames * BASE_DIM / 1e9 for mode, value in bytes_per_value.items()}
        print(
            f"LibriSpeech-960, a {BASE_DIM}-dim layer at {BASE_FRAME_RATE} frames/s ({frames / 1e6:.0f} M frames), storing the "
            "share of frames stored above: " + ", ".join(f"{keep}/{dtype} {size:.0f} GB" for (keep, dtype), size in scaled.items())
        )


if __name__ == "__main__":
    main()
