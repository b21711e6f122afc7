"""K-means quality and time: the k-means stage's fit against fairseq's MiniBatchKMeans recipe.

    .venv/bin/python bench/kmeans.py [--case mfcc|768|both] [--minutes 90] [--k 100]
                                     [--frames768 200000] [--k768 500] [--workers 2] [--out bench-out]

Cases (issue 13): (a) `mfcc`: MFCC of a synthesized corpus (90 minutes: about 536k x 39 frames)
at k=100, features written by the feature stage; (b) `768`: 200k x 768 frames at k=500. No
768-dim model features exist without a trained BASE model, so (b) uses a fixed nonlinear map of
the same MFCC (5 stacked frames, standardised, through a seeded random 195 x 768 projection and
GELU): frames with speech's temporal correlation and a low intrinsic dimension, as layer
features have, written to a Zarr array chunked as the feature stage would.

For each case, prints the inertia per frame (over every frame, float64) and the wall time of
(a) fairseq's `learn_kmeans.py` settings (MiniBatchKMeans, k-means++, n_init=20, batch 10000,
max_iter=100, tol=0, max_no_improvement=100, reassignment_ratio=0) with every frame loaded into
one process (its own threads: all cores), and (b) the k-means stage's fit (`fit_kmeans`: sample
on the workers, k-means++ on a gathered init sample, Lloyd phases) on a Dask LocalCluster of
`--workers` single-threaded workers; then the ratios (targets: time at most 0.5x, inertia at
most 1.01x). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from sklearn.cluster import MiniBatchKMeans

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.frames.clustering import fit_kmeans
from tasks.frames.store import choose_chunk_frames
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.sections import KMeansConfig
from tasks.stages.catalog import run_plan


def inertia_per_frame(frames: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    c = centroids.astype(np.float64)
    for start in range(0, len(frames), 65536):
        block = frames[start : start + 65536].astype(np.float64)
        distances = (block**2).sum(1)[:, None] - 2 * block @ c.T + (c**2).sum(1)
        total += distances.min(axis=1).clip(min=0).sum()
    return total / len(frames)


def mfcc_features(out: Path, minutes: float, client) -> zarr.Array:
    """The feature stage's MFCC store of a synthesized corpus (made once under `out`)."""
    wav_folder = cached_demo_corpus(out, minutes)
    store_root = out / f"kmeans-bench-store-{minutes:g}min"
    config = PretrainConfig.model_validate(
        {
            "run": "bench",
            "store": str(store_root),
            "corpus": {"source": str(wav_folder)},
            "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 2}, "train": {"model": "tiny"}}],
        }
    )
    store = ArtifactStore(config.store)
    run_plan(config, store, client, "features")
    return store.open_zarr(RunLayout("bench").features_store(1), "r")["features"]


def projected_features(mfcc: np.ndarray, frames: int, dim: int, path: Path) -> zarr.Array:
    """`frames` x `dim` features from MFCC by a seeded nonlinear map (see the module docstring)."""
    standard = (mfcc - mfcc.mean(0)) / mfcc.std(0)
    context = 5
    if standard.shape[0] - context + 1 < frames:
        raise SystemExit(f"--frames768 {frames} needs more MFCC frames than {standard.shape[0]}: raise --minutes")
    stacked = np.concatenate([standard[i : i + frames] for i in range(context)], axis=1).astype(np.float32)
    projection = np.random.default_rng(0).standard_normal((stacked.shape[1], dim)).astype(np.float32)
    projection /= np.float32(np.sqrt(stacked.shape[1]))
    values = torch.nn.functional.gelu(torch.from_numpy(stacked) @ torch.from_numpy(projection)).numpy()
    chunk = choose_chunk_frames(frames, dim)
    array = zarr.create_array(str(path), shape=values.shape, chunks=(chunk, dim), dtype="float32", compressors=None, overwrite=True)
    array[:] = values
    return array


def reference_fit(frames: np.ndarray, k: int) -> tuple[np.ndarray, float, int]:
    """fairseq's `learn_kmeans.py` MiniBatchKMeans: centroids, wall seconds, steps taken."""
    start = time.perf_counter()
    model = MiniBatchKMeans(
        n_clusters=k, init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
        n_init=20, reassignment_ratio=0.0, random_state=0,
    ).fit(frames)
    return model.cluster_centers_.astype(np.float32), time.perf_counter() - start, int(model.n_steps_)


def compare(name: str, client, array: zarr.Array, k: int, workers: int) -> None:
    frames = array[:]
    print(f"\n{name}: {frames.shape[0]} x {frames.shape[1]} frames, k={k}", flush=True)
    start = time.perf_counter()
    fit = fit_kmeans(client, array, KMeansConfig(k=k))
    ours_seconds = time.perf_counter() - start
    ours = inertia_per_frame(frames, fit.lloyd.centroids)
    passes = "+".join(str(count) for count in fit.lloyd.passes)
    print(
        f"  {f'k-means stage fit, {workers} Dask workers':<44} inertia/frame {ours:12.5g}   {ours_seconds:7.1f} s   "
        f"Lloyd passes {passes}",
        flush=True,
    )
    reference_centroids, reference_seconds, steps = reference_fit(frames, k)
    reference = inertia_per_frame(frames, reference_centroids)
    print(f"  {'fairseq MiniBatchKMeans (one process)':<44} inertia/frame {reference:12.5g}   {reference_seconds:7.1f} s   {steps} steps")
    print(
        f"  ratio: inertia {ours / reference:.4f}x (target <= 1.01), time {ours_seconds / reference_seconds:.3f}x "
        f"(target <= 0.5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["mfcc", "768", "both"], default="both")
    parser.add_argument("--minutes", type=float, default=90.0)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--frames768", type=int, default=200_000)
    parser.add_argument("--k768", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    with dask_client(n_workers=args.workers) as client, tempfile.TemporaryDirectory(dir=args.out) as scratch:
        mfcc = mfcc_features(args.out, args.minutes, client)
        if args.case in ("mfcc", "both"):
            compare(f"MFCC ({args.minutes:g} min)", client, mfcc, args.k, args.workers)
        if args.case in ("768", "both"):
            array = projected_features(mfcc[:], args.frames768, 768, Path(scratch) / "features768.zarr")
            compare("768-dim projected MFCC", client, array, args.k768, args.workers)


if __name__ == "__main__":
    main()
