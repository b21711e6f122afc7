"""k-means on a features store, distributed on Dask (the algorithm is model/kmeans.py).

The fitting sample never meets in one process: each chunk of features is sampled on a worker
(seeded by the chunk's index, so the sample does not depend on the cluster) and stays there. Only
an initialisation sample of about `init_sample_frames(k, dim)` frames comes to the driver for
k-means++. Lloyd passes then run where the data is (model/kmeans.py: a coarse phase on every
n-th sampled frame, then every frame): one task per worker a pass returns its blocks' per-cluster
sums and counts (k x dim arrays) and the driver adds them in block order.

The k-means stage fits an iteration's centroids with it; the reference stage fits the previous
iteration's features at this iteration's k with the same code, so the two are compared like
with like.

Why not dask-ml's KMeans: with scikit-learn 1.9 its `k-means||` init found 47 candidates for
k=100 and ended at about 5x the inertia, and its `init='k-means++'` crashes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client, Future

from infra.cluster import release_and_trim
from model.kmeans import LloydResult, LloydStep, initial_centroids, lloyd, lloyd_partial, lloyd_schedule, merge_partials
from tasks.corpus.manifest import Manifest
from tasks.frames.chunks import Chunk, chunk_grid, valid_frame_ranges
from tasks.frames.store import stored_indices, stored_keep
from tasks.run.sections import KMeansConfig

log = logging.getLogger(__name__)


INIT_FRAMES_PER_CLUSTER = 256
INIT_SAMPLE_VALUES = 2**24
"""The init sample's cap in values (64 MB of float32): greedy k-means++ costs frames x dim x k x
log k, which at 768 dims and k=500 would outweigh the whole Lloyd fit; Lloyd corrects a coarser start."""
MIN_INIT_FRAMES_PER_CLUSTER = 16


def init_sample_frames(k: int, dim: int) -> int:
    """Frames for the k-means++ sample: 256 a cluster, fewer at high dimension (never under 16 a cluster)."""
    return max(MIN_INIT_FRAMES_PER_CLUSTER * k, min(INIT_FRAMES_PER_CLUSTER * k, INIT_SAMPLE_VALUES // dim))


def sample_block(
    block: Chunk, held_out: tuple[tuple[int, int], ...], features: zarr.Array, fraction: float, seed: int
) -> np.ndarray:
    """The block's frames kept for fitting: each with probability `fraction`, seeded by block index,
    never one of the `held_out` ranges (validation utterances' frames, relative to the block).

    The draws are made for every frame of the block, held out or not, so a split only removes
    frames from the sample a run without one takes. `features` is the array as the driver opened
    it (no metadata requests per task); float16 rows come back as float32."""
    rows = features[block.start : block.stop].astype(np.float32, copy=False)
    if fraction >= 1.0 and not held_out:
        return rows
    keep = np.ones(rows.shape[0], dtype=bool)
    if fraction < 1.0:
        keep = np.random.default_rng([seed, block.index]).random(rows.shape[0]) < fraction
    for start, stop in held_out:
        keep[start:stop] = False
    return rows[keep]


def init_rows(rows: np.ndarray, index: int, fraction: float, seed: int) -> np.ndarray:
    keep = np.random.default_rng([seed, index, 1]).random(rows.shape[0]) < fraction
    return rows[keep]


def lloyd_partials(blocks: list[np.ndarray], indices: list[int], centroids: np.ndarray, stride: int) -> dict[str, Any]:
    """One Dask task: the Lloyd partials of the sampled blocks one worker holds, merged into one
    (one task a worker a pass, not one a block: a pass over 500k MFCC frames costs less than 30
    block tasks' overhead; one k x dim partial a worker to the driver, not one a block)."""
    return merge_partials([lloyd_partial(block, centroids, index, stride) for block, index in zip(blocks, indices)])


@dataclass(frozen=True)
class KMeansFit:
    lloyd: LloydResult
    frames: int


def dask_lloyd_step(client: Client, blocks: list[Future]) -> LloydStep:
    """A `LloydStep` over sampled blocks held by Dask workers: one task per worker, on its blocks."""

    def step(centroids: np.ndarray, stride: int) -> list[dict[str, Any]]:
        # A task, not a scatter: if the worker holding it dies, Dask makes it again from the graph.
        shared = client.submit(np.array, centroids, pure=False)
        holders = client.who_has(blocks)
        by_worker: dict[str | None, list[int]] = defaultdict(list)
        for index, block in enumerate(blocks):
            held_by = holders.get(block.key) or [None]
            by_worker[held_by[0]].append(index)
        futures = [
            client.submit(
                lloyd_partials, [blocks[i] for i in indices], indices, shared, stride,
                workers=None if worker is None else [worker], allow_other_workers=True, pure=False,
            )
            for worker, indices in by_worker.items()
        ]
        return client.gather(futures)

    return step


def fit_kmeans(
    client: Client, features: zarr.Array, settings: KMeansConfig, held_out: list[tuple[tuple[int, int], ...]] | None = None
) -> KMeansFit:
    """k-means++ on a small gathered sample, then Lloyd on the distributed fitting sample.

    `held_out`: per block of the grid, the frame ranges never to fit on (the validation split's);
    `max_frames` caps the frames fitted on out of the others."""
    blocks = chunk_grid(features.shape[0], features.chunks[0])
    held_out = held_out or [() for _ in blocks]
    fitting_frames = features.shape[0] - sum(stop - start for ranges in held_out for start, stop in ranges)
    fraction = settings.sample_fraction
    if settings.max_frames is not None:
        fraction = min(fraction, settings.max_frames / fitting_frames)
    sampled = client.map(
        sample_block, blocks, held_out, features=features, fraction=fraction, seed=settings.seed, pure=False
    )
    frames = sum(client.gather(client.map(len, sampled, pure=False)))
    if frames < settings.k:
        raise ValueError(f"k-means: only {frames} frames sampled for k={settings.k}; raise sample_fraction or max_frames")

    init_fraction = min(1.0, init_sample_frames(settings.k, features.shape[1]) / frames)
    init_sample = np.concatenate(
        client.gather(
            client.map(init_rows, sampled, range(len(blocks)), fraction=init_fraction, seed=settings.seed, pure=False)
        )
    )
    centroids = initial_centroids(init_sample, settings.k, settings.init, settings.seed)
    schedule = lloyd_schedule(frames, settings.k)
    log.info(
        "k-means: k=%d on %d frames (%d blocks), init on %d, Lloyd phases %s",
        settings.k, frames, len(blocks), len(init_sample), ", ".join(f"1/{phase.stride}" for phase in schedule),
    )
    result = lloyd(dask_lloyd_step(client, sampled), centroids, settings.max_iter, schedule)
    release_and_trim(client, sampled)
    return KMeansFit(lloyd=result, frames=frames)


def held_out_frames(manifest: Manifest, group: zarr.Group) -> list[tuple[tuple[int, int], ...]]:
    """Per block of the features' chunk grid, the frame ranges of validation utterances in it."""
    valid = manifest.is_valid()[stored_indices(group)]
    offsets, features = group["offsets"][:], group["features"]
    return [valid_frame_ranges(valid, offsets, block) for block in chunk_grid(features.shape[0], features.chunks[0])]


def fitting_settings(settings: KMeansConfig, group: zarr.Group) -> KMeansConfig:
    """The settings to fit with: as configured, or for a store of the k-means sample (`features.keep:
    sample`) every frame it holds, which the feature stage chose with these settings already."""
    if stored_keep(group) == "sample":
        return settings.model_copy(update={"sample_fraction": 1.0, "max_frames": None})
    return settings
