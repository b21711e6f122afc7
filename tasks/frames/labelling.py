"""Labelling frames: each frame's nearest centroid, written chunk by chunk into a labels array on Dask.

The label stage labels a run's features with its k-means (tasks/stages/labels/), and `units`
labels any corpus with an exported bundle's quantizer (tasks/products/units.py): both plan the
same jobs over the chunk grid and run the same task. A job is a run of whole chunks: writers own
whole chunks, so a stage resumes per chunk. Features are read from a features store, or computed
on the fly from a source (`features.keep: sample`, and units); with float16 features, a fixed
sample of chunks is labelled from float32 features too, to measure how many labels they keep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from infra.commit import Stage
from infra.digest import digest_array
from infra.zarr_io import read_row_chunks
from model.kmeans import nearest_centroids
from tasks.corpus.manifest import Manifest, ManifestRows
from tasks.frames.chunks import (
    Chunk,
    NonFiniteValues,
    SpanSource,
    UtteranceSpan,
    check_finite,
    chunk_grid,
    chunk_job,
    manifest_slice,
    resolve_spans,
)
from tasks.frames.sources import FeatureSource, compute_chunk
from tasks.frames.store import as_stored

MAX_CHUNKS_PER_TASK = 8
TASKS_PER_WORKER = 4
TASK_BYTES = 64 * 2**20
FLOAT16_CHECK_FRAMES = 65536
"""Frames (whole chunks, at least one) whose labels from float16 features are compared with float32's."""


@dataclass(frozen=True)
class LabelJob:
    """A run of whole, consecutive chunks: frames [start, stop), chunk edges at `chunk_starts`."""

    chunk_starts: tuple[int, ...]
    first_chunk: int
    stop: int
    source: SpanSource  # the utterances overlapping [start, stop), read on the worker

    @functools.cached_property
    def utterances(self) -> tuple[UtteranceSpan, ...]:
        return resolve_spans(self.source, self.start, self.stop)

    @property
    def start(self) -> int:
        return self.chunk_starts[0]

    @property
    def part(self) -> str:
        return f"chunks-{self.first_chunk:06d}-{self.first_chunk + len(self.chunk_starts) - 1:06d}"

    def chunks(self) -> list[Chunk]:
        """The job's chunks of the grid."""
        edges = [*self.chunk_starts, self.stop]
        return [Chunk(self.first_chunk + n, a, b) for n, (a, b) in enumerate(zip(edges, edges[1:]))]

    def chunk_digests(self, labels: np.ndarray) -> list[str]:
        """One digest per chunk, so the stage's digest does not depend on how chunks were grouped."""
        return [digest_array(labels[chunk.start - self.start : chunk.stop - self.start]) for chunk in self.chunks()]


@dataclass(frozen=True)
class LabelFeatures:
    """Where a label task takes its features, as the features store holds them (`dtype`): read from
    `stored`, or with None (`keep: sample`) computed from `source`. With float16, the grid's
    `checked` chunks are labelled from float32 features too, computed again where they were read."""

    dtype: str
    source: FeatureSource | None
    storage_options: dict[str, Any]
    stored: zarr.Array | None = None
    checked: frozenset[int] = frozenset()

    def read(self, job: LabelJob) -> tuple[np.ndarray, np.ndarray | None]:
        """The job's features in the store's dtype, and their float32 values where they were computed."""
        if self.stored is not None:
            return read_row_chunks(self.stored, job.start, job.stop), None
        computed = compute_chunk(job, self.source, self.storage_options)
        return as_stored(computed, self.dtype, job), computed

    def float16_check(
        self, job: LabelJob, labels: np.ndarray, computed: np.ndarray | None, centroids: np.ndarray
    ) -> dict[str, int] | None:
        """In the job's checked chunks: how many frames, and how many of them float32 features give
        the label the stored float16 ones gave. None for float32 features."""
        if self.dtype == "float32":
            return None
        frames = agreeing = 0
        for chunk in job.chunks():
            if chunk.index not in self.checked:
                continue
            low, high = chunk.start - job.start, chunk.stop - job.start
            exact = computed[low:high] if computed is not None else compute_chunk(
                chunk_job(chunk, job.utterances), self.source, self.storage_options
            )
            agreeing += int(np.count_nonzero(nearest_labels(exact, centroids) == labels[low:high]))
            frames += high - low
        return {"frames": frames, "agreeing": agreeing}


def float16_checked_chunks(grid: list[Chunk]) -> frozenset[int]:
    """Evenly spaced chunks of the grid, whole, as many as FLOAT16_CHECK_FRAMES holds (at least one)."""
    count = max(1, min(len(grid), FLOAT16_CHECK_FRAMES // max(grid[0].stop - grid[0].start, 1)))
    return frozenset(int(index) for index in np.linspace(0, len(grid) - 1, count).round())


def nearest_labels(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid as int16, computed in float32 whatever the rows' dtype."""
    return nearest_centroids(rows, centroids)[0].numpy().astype(np.int16)


def checked_nearest_labels(rows: np.ndarray, centroids: np.ndarray, job: LabelJob) -> np.ndarray:
    """`nearest_labels`, refusing rows with NaN or Inf (named by utterance). A non-finite value
    makes its row's products with the centroids non-finite, so those are checked, not every value
    (a pass over the features less); a finite row whose products overflow float32 is refused too."""
    labels, products = nearest_centroids(rows, centroids, distances=False)
    if not bool(torch.isfinite(products).all()):
        what = f"features read for labels {job.part}"
        check_finite(rows, job.start, job.utterances, what)
        raise NonFiniteValues(f"{what}: products with the centroids overflow float32")
    return labels.numpy().astype(np.int16)



def write_label_chunk(
    job: LabelJob, stage: Stage, centroids: np.ndarray, features: LabelFeatures, labels: zarr.Array,
    tally: Callable[[LabelJob, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """One Dask task: label some chunks' features, write the same rows of labels, tally them (with
    `tally`, what the caller measures of them), mark it done.

    A label of MFCC costs little to compute, so on object storage a task per chunk would spend
    most of its time waiting on requests; a task takes several chunks (up to TASK_BYTES of
    features: `chunks_per_task`), which zarr reads and writes concurrently, and writes one marker.
    A task that computes its features takes one chunk. The arrays come opened by the driver (no
    metadata requests per task). The returned info carries the part's tally for the driver to fold in; the
    marker keeps the rest, including the part's first and last label, which join runs of one
    label across part edges.
    """
    torch.set_num_threads(1)
    rows, computed = features.read(job)
    chunk = checked_nearest_labels(rows, centroids, job)
    tallied = None if tally is None else tally(job, chunk)
    labels[job.start : job.stop] = chunk
    info = {
        "part": job.part,
        "digests": job.chunk_digests(chunk),
        "first_label": int(chunk[0]),
        "last_label": int(chunk[-1]),
    }
    if (check := features.float16_check(job, chunk, computed, centroids)) is not None:
        info["float16_check"] = check
    stage.mark_part(job.part, info)
    return {**info, "tally": tallied}


def chunks_per_task(chunks: int, workers: int, chunk_bytes: int = 0) -> int:
    """Enough tasks to keep every worker busy and balanced, as few as that allows, at most 8 chunks
    and about TASK_BYTES of features each (768-dim chunks are each a second of matmul: one a task)."""
    by_bytes = TASK_BYTES // chunk_bytes if chunk_bytes else MAX_CHUNKS_PER_TASK
    return max(1, min(MAX_CHUNKS_PER_TASK, by_bytes, chunks // (TASKS_PER_WORKER * max(workers, 1))))


def plan_label_jobs(rows: ManifestRows | Manifest, offsets: np.ndarray, chunk_frames: int, per_task: int) -> list[LabelJob]:
    """Consecutive runs of `per_task` chunks of the grid; every chunk belongs to exactly one job."""
    grid = chunk_grid(int(offsets[-1]), chunk_frames)
    jobs = []
    for first in range(0, len(grid), per_task):
        chunks = grid[first : first + per_task]
        start, stop = chunks[0].start, chunks[-1].stop
        jobs.append(LabelJob(tuple(chunk.start for chunk in chunks), first, stop, manifest_slice(rows, offsets, start, stop)))
    return jobs

