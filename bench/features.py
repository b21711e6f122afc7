"""Feature stage throughput: the Dask stage on 1 and 2 workers against fairseq's per-utterance loop.

    .venv/bin/python bench/features.py [--minutes 60] [--repeats 5] [--out bench-out]

Prints audio-seconds per second (best of --repeats runs) of (a) the reference loop that fairseq's `dump_mfcc_feature.py`
runs (read, `kaldi.mfcc` + deltas, save a numpy file per utterance; one process, torch's default
threads), (b) the feature stage on a LocalCluster of 1 worker and (c) of 2 workers, each on the
same synthesized corpus in the same run, and the ratios. Cluster start-up and intake are not timed:
only the stage call (planning, Zarr writes, waiting for every chunk).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.compliance.kaldi
import torchaudio.functional

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES, run_plan


def reference_loop(wav_folder: Path, out_folder: Path) -> float:
    """fairseq's dump_mfcc_feature.py, one utterance at a time; returns audio-seconds per second."""
    paths = sorted(wav_folder.glob("*.wav"))
    audio_seconds = 0.0
    start = time.perf_counter()
    for path in paths:
        samples, rate = soundfile.read(path, dtype="float32")
        waveform = torch.from_numpy(samples).view(1, -1)
        audio_seconds += waveform.shape[1] / rate
        mfccs = torchaudio.compliance.kaldi.mfcc(waveform=waveform, sample_frequency=rate, use_energy=False)
        mfccs = mfccs.transpose(0, 1)
        deltas = torchaudio.functional.compute_deltas(mfccs)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        features = torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()
        np.save(out_folder / f"{path.stem}.npy", features.numpy())
    return audio_seconds / (time.perf_counter() - start)


def stage_throughput(wav_folder: Path, workers: int, scratch: Path, repeats: int) -> float:
    """Best of `repeats` runs of the feature stage, each into a fresh store, on one cluster."""
    best = 0.0
    with dask_client(n_workers=workers, threads_per_worker=1) as client:
        for repeat in range(repeats):
            config = PretrainConfig.model_validate(
                {
                    "run": f"bench-{workers}-{repeat}",
                    "store": str(scratch / "store"),
                    "corpus": {"source": str(wav_folder)},
                    "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 100}, "train": {"model": "tiny"}}],
                }
            )
            store = ArtifactStore(config.store)
            run_plan(config, store, client, "intake")
            utterances = load_manifest(store, RunLayout(config.run))
            start = time.perf_counter()
            run_stage(STAGES["features"], StageContext(config, store, client, 1))
            seconds = time.perf_counter() - start
            best = max(best, sum(u.samples_16k for u in utterances) / 16_000 / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs of each (default 5)")
    args = parser.parse_args()
    wav_folder = cached_demo_corpus(args.out, args.minutes)
    with tempfile.TemporaryDirectory(dir=args.out) as scratch_name:
        scratch = Path(scratch_name)
        (scratch / "npy").mkdir()
        reference = max(reference_loop(wav_folder, scratch / "npy") for _ in range(args.repeats))
        one = stage_throughput(wav_folder, 1, scratch, args.repeats)
        two = stage_throughput(wav_folder, 2, scratch, args.repeats)
    print(
        f"corpus: {args.minutes:g} min of synthesized speech; best of {args.repeats} runs each; "
        f"{torch.get_num_threads()} torch threads in the reference"
    )
    print(f"{'reference loop (fairseq dump_mfcc)':<38}{reference:>10.1f} audio-s/s")
    print(f"{'feature stage, 1 Dask worker':<38}{one:>10.1f} audio-s/s   {one / reference:.2f}x reference (target >= 1)")
    print(f"{'feature stage, 2 Dask workers':<38}{two:>10.1f} audio-s/s   {two / one:.2f}x 1 worker (target >= 1.7)")


if __name__ == "__main__":
    main()
