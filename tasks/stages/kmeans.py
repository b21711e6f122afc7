"""Stage: k-means on the features store, distributed on Dask (the algorithm is model/kmeans.py).

The fitting sample never meets in one process: each chunk of features is sampled on a worker
(seeded by the chunk's index, so the sample does not depend on the cluster) and stays there. Only
an initialisation sample of about `init_sample_frames(k, dim)` frames comes to the driver for
k-means++. Lloyd passes then run where the data is (model/kmeans.py: a coarse phase on every
n-th sampled frame, then every frame): one task per worker a pass returns its blocks' per-cluster
sums and counts (k x dim arrays) and the driver adds them in block order.

Why not dask-ml's KMeans: with scikit-learn 1.9 its `k-means||` init found 47 candidates for
k=100 and ended at about 5x the inertia, and its `init='k-means++'` crashes.
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from distributed import Client, Future

from infra.cluster import release_and_trim
from infra.commit import Stage, StageRecord
from infra.digest import digest_array
from model.kmeans import LloydResult, LloydStep, initial_centroids, lloyd, lloyd_partial, lloyd_schedule, merge_partials
from tasks.frames.chunks import Chunk, chunk_grid, valid_frame_ranges
from tasks.frames.store import stored_indices, stored_keep
from tasks.run.keys import key_settings
from tasks.run.layout import CENTROIDS, FIT_REPORT, KMEANS_DIR
from tasks.run.records import load_manifest, read_npy
from tasks.run.sections import KMeansConfig
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

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


def kmeans_key_config(context: StageContext) -> dict[str, Any]:
    return key_settings(context.settings.kmeans)


def kmeans_key_inputs(context: StageContext) -> dict[str, str]:
    return {"features": context.upstream("kmeans", "features").output_digest, **context.split_inputs("kmeans")}


def held_out_frames(context: StageContext, group: zarr.Group) -> list[tuple[tuple[int, int], ...]]:
    """Per block of the features' chunk grid, the frame ranges of validation utterances in it."""
    valid = load_manifest(context.store, context.layout, columns=["split"]).is_valid()[stored_indices(group)]
    offsets, features = group["offsets"][:], group["features"]
    return [valid_frame_ranges(valid, offsets, block) for block in chunk_grid(features.shape[0], features.chunks[0])]


def fitting_settings(settings: KMeansConfig, group: zarr.Group) -> KMeansConfig:
    """The settings to fit with: as configured, or for a store of the k-means sample (`features.keep:
    sample`) every frame it holds, which the feature stage chose with these settings already."""
    if stored_keep(group) == "sample":
        return settings.model_copy(update={"sample_fraction": 1.0, "max_frames": None})
    return settings


def kmeans(context: StageContext, stage: Stage) -> StageResult:
    """Fit the centroids on the training utterances' frames and write them with the fit report."""
    settings = context.settings.kmeans
    group = context.store.open_zarr(context.layout.features_store(context.iteration), mode="r")
    array = group["features"]
    held_out = held_out_frames(context, group) if context.config.corpus.has_valid_split else None
    clock = time.perf_counter()
    fit = fit_kmeans(context.client, array, fitting_settings(settings, group), held_out)
    seconds = time.perf_counter() - clock
    result = fit.lloyd

    buffer = io.BytesIO()
    np.save(buffer, result.centroids)
    context.store.write_bytes(stage.rel(CENTROIDS), buffer.getvalue())
    context.store.write_json(
        stage.rel(FIT_REPORT),
        {
            **settings.model_dump(),
            "frames_fitted": fit.frames,
            "frames_total": int(array.shape[0]),
            "features_keep": stored_keep(group),
            "iterations": result.iterations,
            "passes_per_phase": list(result.passes),
            "converged": result.converged,
            "inertia": result.inertia,
            "inertia_per_frame": result.inertia / fit.frames,
            "empty_clusters_reseeded": result.reseeded,
            "cluster_sizes": result.cluster_sizes,
            "fit_seconds": round(seconds, 3),
        },
    )
    sizes = np.array(result.cluster_sizes)
    return StageResult(
        output_digest=digest_array(result.centroids),
        counts={
            "k": settings.k, "dim": int(result.centroids.shape[1]), "frames_fitted": fit.frames, "iterations": result.iterations,
        },
        metrics={
            "inertia_per_frame": round(result.inertia / fit.frames, 6),
            "converged": result.converged,
            "empty_clusters_reseeded": result.reseeded,
            "used_clusters": int((sizes > 0).sum()),
            "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max()),
        },
    )


def verify_kmeans(committed: CommittedStage) -> str:
    """The centroids' digest, as the stage took it."""
    return digest_array(read_npy(committed.store, committed.rel(CENTROIDS)))


def kmeans_summary(record: StageRecord) -> str:
    return (
        f"k={record.counts['k']}, {record.counts['iterations']} iterations, "
        f"inertia/frame {record.metrics['inertia_per_frame']:.4g}"
    )


KMEANS = StageSpec(
    name="kmeans",
    version=3,
    outputs=(KMEANS_DIR,),
    key_config=kmeans_key_config,
    key_inputs=kmeans_key_inputs,
    work=kmeans,
    summary=kmeans_summary,
    verify_digest=verify_kmeans,
)
