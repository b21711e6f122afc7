"""Stage: k-means on the features store, distributed on Dask.

The fitting sample never meets in one process: each Zarr chunk of features is sampled on a worker
(seeded by the chunk's index, so the sample does not depend on the cluster) and stays there. Only
an initialisation sample of at most `INIT_FRAMES_PER_CLUSTER * k` frames comes to the driver for
k-means++ (scikit-learn's `kmeans_plusplus`). Lloyd iterations then run where the data is: each
block returns per-cluster sums and counts (a k x dim array) and the driver averages them, adding
the blocks in a fixed order so that a seed always gives the same centroids. A cluster left empty
is re-seeded with the frame farthest from its centroid, not left dead.

Why not dask-ml's KMeans: with scikit-learn 1.9 its `k-means||` init found 47 candidates for
k=100 and ended at about 5x the inertia, and its `init='k-means++'` crashes.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client, Future, wait
from prefect import task
from prefect.cache_policies import NONE
from sklearn.cluster import kmeans_plusplus

from infra.digest import digest_bytes
from infra.store import ArtifactStore, Stage, StageRecord, utc_now
from tasks.config import KMeansConfig, PretrainConfig
from tasks.features import FEATURES_STORE
from tasks.retry import retry_transient

log = logging.getLogger(__name__)

KMEANS_VERSION = 1
CENTROIDS = "kmeans/centroids.npy"
FIT_REPORT = "kmeans/report.json"
INIT_FRAMES_PER_CLUSTER = 256
RELATIVE_TOLERANCE = 1e-4
FARTHEST_CANDIDATES = 16


@dataclass(frozen=True)
class FeatureBlock:
    """Rows [start, stop) of a features store (one Zarr chunk)."""

    index: int
    start: int
    stop: int


def feature_blocks(total_frames: int, chunk_frames: int) -> list[FeatureBlock]:
    return [
        FeatureBlock(index, start, min(start + chunk_frames, total_frames))
        for index, start in enumerate(range(0, total_frames, chunk_frames))
    ]


def sample_block(block: FeatureBlock, features: zarr.Array, fraction: float, seed: int) -> np.ndarray:
    """The block's frames kept for fitting: each with probability `fraction`, seeded by block index.

    `features` is the array as the driver opened it (no metadata requests per task)."""
    rows = features[block.start : block.stop]
    if fraction >= 1.0:
        return rows
    keep = np.random.default_rng([seed, block.index]).random(rows.shape[0]) < fraction
    return rows[keep]


def block_moments(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, sum and sum of squares per dimension (float64), for the data's variance."""
    as64 = rows.astype(np.float64)
    return rows.shape[0], as64.sum(axis=0), np.square(as64).sum(axis=0)


def init_rows(rows: np.ndarray, index: int, fraction: float, seed: int) -> np.ndarray:
    keep = np.random.default_rng([seed, index, 1]).random(rows.shape[0]) < fraction
    return rows[keep]


def nearest_centroids(rows: np.ndarray, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for each row."""
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    distances = (x * x).sum(dim=1, keepdim=True) - 2 * x @ c.T + (c * c).sum(dim=1)
    best, labels = distances.min(dim=1)
    return labels, best.clamp_min_(0)


def lloyd_partial(rows: np.ndarray, centroids: np.ndarray, index: int) -> dict[str, Any]:
    """One block's share of a Lloyd step: per-cluster sums and counts, inertia, farthest frames."""
    torch.set_num_threads(1)
    k, dim = centroids.shape
    labels, distances = nearest_centroids(rows, centroids)
    sums = torch.zeros((k, dim), dtype=torch.float64).index_add_(0, labels, torch.from_numpy(rows).double())
    counts = torch.bincount(labels, minlength=k)
    far = torch.argsort(distances, descending=True, stable=True)[:FARTHEST_CANDIDATES]
    return {
        "index": index,
        "sums": sums.numpy(),
        "counts": counts.numpy(),
        "inertia": float(distances.double().sum()),
        "far_distances": distances[far].numpy(),
        "far_rows": rows[far.numpy()],
    }


@dataclass(frozen=True)
class KMeansFit:
    centroids: np.ndarray
    inertia: float
    frames: int
    iterations: int
    converged: bool
    cluster_sizes: list[int]
    reseeded: int


def _lloyd_step(client: Client, blocks: list[Future], centroids: np.ndarray) -> list[dict[str, Any]]:
    # A task, not a scatter: if the worker holding it dies, Dask makes it again from the graph.
    shared = client.submit(np.array, centroids, pure=False)
    futures = [client.submit(lloyd_partial, block, shared, index, pure=False) for index, block in enumerate(blocks)]
    return sorted(client.gather(futures), key=lambda partial: partial["index"])


def _reduce(partials: list[dict[str, Any]], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """New centroids from the blocks' sums; empty clusters take the farthest frames seen."""
    sums = np.sum([p["sums"] for p in partials], axis=0)
    counts = np.sum([p["counts"] for p in partials], axis=0)
    inertia = float(sum(p["inertia"] for p in partials))
    updated = centroids.astype(np.float64).copy()
    filled = counts > 0
    updated[filled] = sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if empty.size:
        distances = np.concatenate([p["far_distances"] for p in partials])
        rows = np.concatenate([p["far_rows"] for p in partials])
        order = np.argsort(-distances, kind="stable")[: empty.size]
        updated[empty[: order.size]] = rows[order]
    return updated.astype(np.float32), counts, inertia, int(empty.size)


def fit_kmeans(client: Client, features: zarr.Array, settings: KMeansConfig) -> KMeansFit:
    """k-means++ on a small gathered sample, then Lloyd on the distributed fitting sample."""
    total_frames = features.shape[0]
    fraction = settings.sample_fraction
    if settings.max_frames is not None:
        fraction = min(fraction, settings.max_frames / total_frames)
    blocks = feature_blocks(total_frames, features.chunks[0])
    sampled = client.map(sample_block, blocks, features=features, fraction=fraction, seed=settings.seed, pure=False)
    wait(sampled)
    moments = client.gather(client.map(block_moments, sampled, pure=False))
    frames = sum(count for count, _, _ in moments)
    if frames < settings.k:
        raise ValueError(f"k-means: only {frames} frames sampled for k={settings.k}; raise sample_fraction or max_frames")
    mean = sum(total for _, total, _ in moments) / frames
    variance = float((sum(squares for _, _, squares in moments) / frames - mean**2).mean())

    init_fraction = min(1.0, INIT_FRAMES_PER_CLUSTER * settings.k / frames)
    init_sample = np.concatenate(
        client.gather(
            client.map(init_rows, sampled, range(len(blocks)), fraction=init_fraction, seed=settings.seed, pure=False)
        )
    )
    if settings.init == "k-means++":
        centroids, _ = kmeans_plusplus(init_sample, settings.k, random_state=settings.seed)
    else:
        choice = np.random.default_rng(settings.seed).choice(init_sample.shape[0], settings.k, replace=False)
        centroids = init_sample[choice]
    centroids = centroids.astype(np.float32)
    log.info("k-means: k=%d on %d frames (%d blocks), init on %d", settings.k, frames, len(blocks), len(init_sample))

    converged, reseeded, iterations = False, 0, 0
    for iterations in range(1, settings.max_iter + 1):
        updated, _, inertia, empty = _reduce(_lloyd_step(client, sampled, centroids), centroids)
        reseeded += empty
        shift = float(np.square(updated.astype(np.float64) - centroids).sum())
        centroids = updated
        if empty == 0 and shift <= RELATIVE_TOLERANCE * variance:
            converged = True
            break
    final = _lloyd_step(client, sampled, centroids)
    counts = np.sum([p["counts"] for p in final], axis=0)
    inertia = float(sum(p["inertia"] for p in final))
    client.cancel(sampled)
    return KMeansFit(
        centroids=centroids,
        inertia=inertia,
        frames=frames,
        iterations=iterations,
        converged=converged,
        cluster_sizes=[int(c) for c in counts],
        reseeded=reseeded,
    )


def kmeans_stage(config: PretrainConfig, iteration: int, store: ArtifactStore, features: StageRecord) -> Stage:
    return Stage(
        store, config.run, f"iter-{iteration}", "kmeans",
        version=KMEANS_VERSION,
        config=config.iterations[iteration - 1].kmeans.model_dump(),
        inputs={"features": features.output_digest},
    )


def run_kmeans(
    config: PretrainConfig, iteration: int, store: ArtifactStore, client: Client, features: StageRecord
) -> StageRecord:
    """Fit and commit `iter-N/kmeans/centroids.npy` and its fit report (skipped if committed)."""
    stage = kmeans_stage(config, iteration, store, features)
    if (record := stage.committed()) is not None:
        log.info("kmeans@%d: committed earlier (k=%d), skipping", iteration, record.counts["k"])
        return record
    started_at = utc_now()
    stage.prepare(["kmeans"])
    settings = config.iterations[iteration - 1].kmeans
    array = store.open_zarr(stage.rel(FEATURES_STORE), mode="r")["features"]
    clock = time.perf_counter()
    fit = fit_kmeans(client, array, settings)
    seconds = time.perf_counter() - clock

    buffer = io.BytesIO()
    np.save(buffer, fit.centroids)
    store.write_bytes(stage.rel(CENTROIDS), buffer.getvalue())
    report = {
        **settings.model_dump(),
        "frames_fitted": fit.frames,
        "frames_total": int(array.shape[0]),
        "iterations": fit.iterations,
        "converged": fit.converged,
        "inertia": fit.inertia,
        "inertia_per_frame": fit.inertia / fit.frames,
        "empty_clusters_reseeded": fit.reseeded,
        "cluster_sizes": fit.cluster_sizes,
        "fit_seconds": round(seconds, 3),
    }
    store.write_json(stage.rel(FIT_REPORT), report)
    sizes = np.array(fit.cluster_sizes)
    record = stage.commit(
        outputs=["kmeans"],
        output_digest=digest_bytes(fit.centroids.tobytes()),
        started_at=started_at,
        counts={"k": settings.k, "dim": int(fit.centroids.shape[1]), "frames_fitted": fit.frames, "iterations": fit.iterations},
        metrics={
            "inertia_per_frame": round(fit.inertia / fit.frames, 6),
            "converged": fit.converged,
            "empty_clusters_reseeded": fit.reseeded,
            "used_clusters": int((sizes > 0).sum()),
            "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max()),
        },
    )
    log.info(
        "kmeans@%d: k=%d, %d iterations, inertia/frame %.4g in %.1f s",
        iteration, settings.k, fit.iterations, fit.inertia / fit.frames, seconds,
    )
    return record


def load_centroids(store: ArtifactStore, run: str, iteration: int) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(f"{run}/iter-{iteration}/{CENTROIDS}")))


kmeans_task = task(run_kmeans, name="kmeans", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NONE)
