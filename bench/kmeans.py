"""K-means quality and time: our Dask stage against fairseq's scikit-learn MiniBatchKMeans recipe.

    .venv/bin/python bench/kmeans.py [--minutes 30] [--k 100] [--workers 2]

On MFCC features of a synthesized corpus, prints the inertia per frame (over every frame) and the
fit time of (a) fairseq's `learn_kmeans.py` settings (MiniBatchKMeans, k-means++, n_init=20,
batch 10000, max_iter=100, tol=0, max_no_improvement=100, reassignment_ratio=0) with every frame
loaded into one process, and (b) the k-means stage on a Dask LocalCluster, with the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.artifacts import load_centroids
from tasks.config import PretrainConfig
from tasks.layout import RunLayout
from tasks.pipeline import STAGES, run_through
from tasks.stage import StageContext, run_stage


def inertia_per_frame(frames: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    for start in range(0, len(frames), 65536):
        block = frames[start : start + 65536].astype(np.float64)
        distances = (block**2).sum(1)[:, None] - 2 * block @ centroids.T.astype(np.float64) + (centroids.astype(np.float64) ** 2).sum(1)
        total += distances.min(axis=1).clip(min=0).sum()
    return total / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    wav_folder = cached_demo_corpus(args.out, args.minutes)
    args.out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as scratch, dask_client(n_workers=args.workers) as client:
        config = PretrainConfig.model_validate(
            {
                "run": "bench",
                "store": scratch,
                "corpus": {"source": str(wav_folder)},
                "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": args.k}, "train": {"model": "tiny"}}],
            }
        )
        store, layout = ArtifactStore(config.store), RunLayout("bench")
        run_through(config, store, client, "features")
        start = time.perf_counter()
        run_stage(STAGES["kmeans"], StageContext(config, store, client, 1))
        ours_seconds = time.perf_counter() - start
        frames = store.open_zarr(layout.features_store(1), "r")["features"][:]
        ours = inertia_per_frame(frames, load_centroids(store, layout, 1))

    start = time.perf_counter()
    reference_model = MiniBatchKMeans(
        n_clusters=args.k, init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
        n_init=20, reassignment_ratio=0.0, random_state=0,
    ).fit(frames)
    reference_seconds = time.perf_counter() - start
    reference = inertia_per_frame(frames, reference_model.cluster_centers_)

    print(f"{len(frames)} MFCC frames ({args.minutes:g} min), k={args.k}")
    print(f"{'fairseq MiniBatchKMeans (one process)':<40} inertia/frame {reference:10.2f}   {reference_seconds:6.1f} s")
    print(
        f"{f'k-means stage, {args.workers} Dask workers':<40} inertia/frame {ours:10.2f}   {ours_seconds:6.1f} s"
        f"   inertia {ours / reference:.3f}x, time {ours_seconds / reference_seconds:.2f}x the reference"
    )


if __name__ == "__main__":
    main()
