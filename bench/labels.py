"""Label throughput against the float32 matmul roofline, and a label worker's memory at 1x and 4x the frames.

    .venv/bin/python bench/labels.py [--frames 1000000] [--dim 768] [--k 500] [--workers 2]
                                     [--rss-multiple 4] [--repeats 3] [--out bench-out]

Writes `--frames` x `--dim` float32 features (seeded Gaussian rows: the values do not change the
arithmetic) to a Zarr array on local disk, chunked as the feature stage chunks them, and labels
them with the label stage's own task (`write_label_chunk` through `run_parts`: read a run of
chunks, check they are finite, nearest centroid, write int16 labels, tally, mark the part) on a
Dask LocalCluster of `--workers` single-threaded workers. Jobs carry no utterance spans, so the
tally is the label counts only (the run and phone tallies are per utterance and small).

Prints frames/s of the labelling and the roofline, and the share of it reached (target: at
least 70%). The labelling is run `--repeats` times over the same features and the best pass
counts, as the other benches take the best of their runs; every pass is printed (the same pass
varies by 15-25% from one minute to the next on this machine, and the first, the first to read
the freshly written features, is often the slowest). The roofline is the float32 matmul
throughput of the same workers in the same run: each worker multiplies (rows x dim) by (dim x k)
at once for 3 s, with the better of torch's and numpy's matmul at the best of 1024 to 16384 rows,
before and after the labellings (averaged: the rate drifts), divided by the 2*dim*k flops a frame
costs. The timer starts on workers that have loaded the label stage's code (as in a pipeline run,
where earlier stages did) after the features' write-back is flushed. Then the same on
`--rss-multiple` times the frames on a fresh cluster, and each worker's peak RSS in both runs
(target: equal within 10%: memory follows the chunk, not the corpus). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from infra.cluster import dask_client
from infra.commit import Stage
from infra.parts import run_parts
from infra.store import ArtifactStore
from model.frames import FrameGeometry
from tasks.frames.chunks import chunk_grid
from tasks.frames.labelling import LabelFeatures, LabelJob, chunks_per_task, write_label_chunk
from tasks.frames.store import choose_chunk_frames
from tasks.stages.labels.stage import Measuring

MATMUL_SECONDS = 3.0
ROOFLINE_ROWS = (1024, 2048, 4096, 16384)


def write_features(path: Path, frames: int, dim: int) -> zarr.Array:
    chunk = choose_chunk_frames(frames, dim)
    array = zarr.create_array(str(path), shape=(frames, dim), chunks=(chunk, dim), dtype="float32", compressors=None, overwrite=True)
    rng = np.random.default_rng(0)
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        array[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return array


def matmul_flops(dim: int, k: int, seconds: float = MATMUL_SECONDS) -> float:
    """Sustained float32 flop/s of one thread multiplying (rows x dim) by (dim x k) for `seconds`,
    with the better of torch's matmul (MKL) and numpy's (OpenBLAS) at the best of ROOFLINE_ROWS
    (each pairing tried for a tenth of that): the roofline is the machine's, not the library or
    the blocking our labelling chose, and not the luckiest second of a noisy one. (Dask's nanny
    starts workers with one BLAS thread; torch's is set here.)"""
    torch.set_num_threads(1)
    centroids = torch.randn(k, dim)
    weights = np.ascontiguousarray(centroids.numpy().T)
    by_library = {
        "torch": lambda block: block @ centroids.T,
        "numpy": lambda block: block.numpy() @ weights,
    }

    def rate(library: str, rows: int, duration: float) -> float:
        block, multiply = torch.randn(rows, dim), by_library[library]
        for _ in range(3):
            multiply(block)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            multiply(block)
            count += 1
        return 2.0 * rows * dim * k * count / (time.perf_counter() - start)

    pairings = [(library, rows) for library in by_library for rows in ROOFLINE_ROWS]
    best = max(pairings, key=lambda pairing: rate(*pairing, seconds / 10))
    return rate(*best, seconds)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def label_all(client, store: ArtifactStore, features: zarr.Array, k: int, folder: str) -> float:
    """Label every frame with the label stage's task; returns the wall seconds."""
    frames, chunk = features.shape[0], features.chunks[0]
    labels = zarr.create_array(
        store.path(f"{folder}/labels.zarr"), shape=(frames,), chunks=(chunk,), dtype="int16", overwrite=True
    )
    grid = chunk_grid(frames, chunk)
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    per_task = chunks_per_task(len(grid), workers, chunk * features.shape[1] * features.dtype.itemsize)
    jobs = [
        LabelJob(tuple(c.start for c in grid[i : i + per_task]), i, grid[i : i + per_task][-1].stop, ())
        for i in range(0, len(grid), per_task)
    ]
    stage = Stage(store, folder, "labels", version=1, config={}, inputs={})
    centroids = np.random.default_rng(1).standard_normal((k, features.shape[1]), dtype=np.float32)
    shared = client.submit(np.array, centroids, pure=False)
    measuring = Measuring(k, FrameGeometry(hop=320, window=400), None, {})
    start = time.perf_counter()
    run_parts(client, stage, jobs, write_label_chunk, "labels", {}, centroids=shared, tally=measuring,
              features=LabelFeatures("float32", None, {}, stored=features), labels=labels)
    return time.perf_counter() - start


def measured_run(
    out: Path, frames: int, dim: int, k: int, workers: int, repeats: int
) -> tuple[list[float], list[float], list[float]]:
    """(label seconds of each of `repeats` labellings of the same features, roofline flop/s of the
    workers together before and after them, each worker's peak RSS in MiB) for `frames` frames on
    a fresh cluster."""
    folder = out / f"labels-bench-{frames}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    features = write_features(folder / "features.zarr", frames, dim)
    os.sync()  # the features' write-back would otherwise run on the cores during the labelling
    store = ArtifactStore(str(folder))
    with dask_client(n_workers=workers) as client:
        client.run(importlib.import_module, "tasks.stages.labels")  # as in a pipeline, where earlier stages loaded it
        client.run(matmul_flops, dim, k, 0.5)  # warm up torch on every worker
        before = sum(client.run(matmul_flops, dim, k).values())
        seconds = [label_all(client, store, features, k, f"run-{repeat}") for repeat in range(repeats)]
        rss = list(client.run(peak_rss_mib).values())
        after = sum(client.run(matmul_flops, dim, k).values())
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, [before, after], rss


def passes(frames: int, seconds: list[float]) -> str:
    return ", ".join(f"{frames / each:,.0f}" for each in seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rss-multiple", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="labellings of the same features; the best counts (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    flops_per_frame = 2 * args.dim * args.k
    seconds, rooflines, rss = measured_run(args.out, args.frames, args.dim, args.k, args.workers, args.repeats)
    roofline = sum(rooflines) / 2
    rate, roofline_rate = args.frames / min(seconds), roofline / flops_per_frame
    print(f"{args.frames} x {args.dim} float32 frames, k={args.k}, {args.workers} single-threaded Dask workers")
    print(
        f"  roofline: float32 matmul {roofline / 1e9:.1f} GFLOP/s over the workers "
        f"({rooflines[0] / 1e9:.1f} before, {rooflines[1] / 1e9:.1f} after) = {roofline_rate:,.0f} frames/s"
    )
    print(
        f"  label stage task, best of {args.repeats}: {min(seconds):.1f} s = {rate:,.0f} frames/s = "
        f"{rate / roofline_rate:.1%} of the roofline (target >= 70%); each pass: {passes(args.frames, seconds)} frames/s"
    )
    big = args.frames * args.rss_multiple
    big_seconds, big_rooflines, big_rss = measured_run(args.out, big, args.dim, args.k, args.workers, args.repeats)
    big_rate, big_roofline = big / min(big_seconds), sum(big_rooflines) / 2
    print(
        f"  the same on {big} frames ({args.rss_multiple}x, its own roofline): {big_rate:,.0f} frames/s = "
        f"{big_rate / (big_roofline / flops_per_frame):.1%} of the roofline (the start-up and last task spread over more); "
        f"each pass: {passes(big, big_seconds)} frames/s"
    )
    print(f"  peak worker RSS, {args.frames} frames: {', '.join(f'{m:.0f}' for m in rss)} MiB")
    print(f"  peak worker RSS, {big} frames ({args.rss_multiple}x): {', '.join(f'{m:.0f}' for m in big_rss)} MiB")
    print(f"  ratio of the largest peaks: {max(big_rss) / max(rss):.3f}x (target within 10%)")


if __name__ == "__main__":
    main()
