"""Where frames sit: utterances concatenated in manifest order, cut into a grid of fixed-size chunks.

Every chunked stage (features, k-means, labels) works on the same grid: chunk i holds frames
[i * chunk_frames, (i + 1) * chunk_frames) of the concatenation, which is also the Zarr chunk
that one Dask task writes and resumes. Frame counts follow from sample counts, so the grid is
known before any audio is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tasks.corpus.manifest import Manifest, ManifestRows, Utterance


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) of the concatenation: chunk `index` of the grid."""

    index: int
    start: int
    stop: int


def chunk_grid(total_frames: int, chunk_frames: int) -> list[Chunk]:
    """The grid: consecutive chunks of `chunk_frames` frames, the last one shorter."""
    return [
        Chunk(index, start, min(start + chunk_frames, total_frames))
        for index, start in enumerate(range(0, total_frames, chunk_frames))
    ]


@dataclass(frozen=True)
class UtteranceSpan:
    """Where one utterance's frames sit in the concatenated frames (`index`: its place in the
    sequence the offsets lay out: the manifest, or a store's sample of it), and its record, from
    which its audio is loaded."""

    index: int
    id: str
    path: str
    samples_16k: int
    offset: int
    frames: int
    utterance: Utterance | None = None

    def overlap(self, start: int, stop: int) -> tuple[int, int]:
        """The part of this utterance's frames inside [start, stop), as concatenation indices."""
        return max(start, self.offset), min(stop, self.offset + self.frames)


def frame_offsets(utterances: np.ndarray | Manifest | Sequence[Utterance], num_frames: Callable) -> np.ndarray:
    """[utterances + 1] int64: where each utterance's frames start, given frames per 16 kHz samples
    (`num_frames`, element-wise: model/frames.py's one formula) and the utterances' 16 kHz lengths
    (an array, or a manifest to take them from)."""
    samples_16k = utterances if isinstance(utterances, np.ndarray) else Manifest.of(utterances).samples_16k()
    frames = num_frames(np.asarray(samples_16k, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(frames, dtype=np.int64)]).astype(np.int64)


def overlapping_range(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """[first, last) of the utterances whose frames could fall in [start, stop) (those with none
    inside it at the edges: zero-frame ones among them are left to the caller)."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    return max(first, 0), last


def overlapping_utterances(offsets: np.ndarray, start: int, stop: int) -> list[int]:
    """Indices of the utterances with frames in [start, stop), given concatenation offsets."""
    first, last = overlapping_range(offsets, start, stop)
    return [i for i in range(first, last) if offsets[i + 1] > start and offsets[i] < stop]


@dataclass(frozen=True, eq=False)
class ManifestSlice:
    """The utterances of a job, as the driver plans it and a worker reads it: positions
    [first, first + len(offsets) - 1) of a sequence laid out by `offsets` (a view of its offsets),
    whose rows the worker reads from the manifest (`indices`: the manifest index of each position,
    for a store of a sample; None where position and manifest index agree). Small to pickle."""

    rows: ManifestRows | Manifest
    first: int
    offsets: np.ndarray
    indices: np.ndarray | None = None

    def spans(self, start: int, stop: int) -> tuple[UtteranceSpan, ...]:
        """The utterances whose frames overlap [start, stop), with where their frames sit, read from the manifest."""
        local = [i for i in range(len(self.offsets) - 1) if self.offsets[i + 1] > start and self.offsets[i] < stop]
        positions = np.array([self.first + i for i in local], dtype=np.int64)
        records = self.rows.read(positions if self.indices is None else self.indices[local])
        return tuple(
            UtteranceSpan(
                index=self.first + i, id=record.id, path=record.where, samples_16k=record.samples_16k,
                offset=int(self.offsets[i]), frames=int(self.offsets[i + 1] - self.offsets[i]), utterance=record,
            )
            for i, record in zip(local, records)
        )


def manifest_slice(rows: ManifestRows | Manifest, offsets: np.ndarray, start: int, stop: int, indices: np.ndarray | None = None) -> ManifestSlice:
    """The slice of utterances whose frames may overlap [start, stop)."""
    first, last = overlapping_range(offsets, start, stop)
    return ManifestSlice(rows, first, offsets[first : last + 1], None if indices is None else indices[first:last])


def utterance_spans(utterances: Sequence[Utterance], offsets: np.ndarray, start: int, stop: int) -> tuple[UtteranceSpan, ...]:
    """The utterances (records at hand: a few) whose frames overlap [start, stop), with where their frames sit."""
    return tuple(
        UtteranceSpan(
            index=i, id=utterances[i].id, path=utterances[i].where, samples_16k=utterances[i].samples_16k,
            offset=int(offsets[i]), frames=int(offsets[i + 1] - offsets[i]), utterance=utterances[i],
        )
        for i in overlapping_utterances(offsets, start, stop)
    )


class NonFiniteValues(ValueError):
    """A part computed or read NaN or Inf values; names the utterances they belong to."""

    retryable = False  # a retry computes the same values


def check_finite(block: np.ndarray, start: int, spans: tuple[UtteranceSpan, ...], what: str) -> None:
    """Raise NonFiniteValues if rows [start, start + len(block)) of the concatenation hold NaN or Inf,
    naming the utterances those rows belong to: nothing non-finite may reach k-means or the labels."""
    bad_rows = np.flatnonzero(~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)) + start
    if bad_rows.size == 0:
        return
    named = [
        f"{span.id} ({span.path})"
        for span in spans
        if np.any((bad_rows >= span.offset) & (bad_rows < span.offset + span.frames))
    ]
    raise NonFiniteValues(
        f"{what}: {bad_rows.size} frame(s) with NaN or Inf values, of utterance(s) {', '.join(named) or '(none listed)'}"
    )


def inside_an_utterance(offsets: np.ndarray, frame: int) -> bool:
    """Whether a chunk edge at `frame` falls inside an utterance rather than between two."""
    utterance = int(np.searchsorted(offsets, frame, side="right")) - 1
    return bool(offsets[utterance] < frame < offsets[utterance + 1])


SpanSource = ManifestSlice | tuple[UtteranceSpan, ...]
"""A job's utterances: to read from the manifest on the worker, or at hand (a few, in tests)."""


def resolve_spans(source: SpanSource, start: int, stop: int) -> tuple[UtteranceSpan, ...]:
    return source if isinstance(source, tuple) else source.spans(start, stop)


class FramesJob(Protocol):
    """A task's frames [start, stop) of the concatenation, the utterances overlapping them, and its part's name."""

    @property
    def start(self) -> int: ...

    @property
    def stop(self) -> int: ...

    @property
    def utterances(self) -> tuple[UtteranceSpan, ...]: ...

    @property
    def part(self) -> str: ...


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of the grid and the utterances whose frames overlap it (read on the worker)."""

    chunk: Chunk
    source: SpanSource

    @functools.cached_property
    def utterances(self) -> tuple[UtteranceSpan, ...]:
        return resolve_spans(self.source, self.start, self.stop)

    @property
    def start(self) -> int:
        return self.chunk.start

    @property
    def stop(self) -> int:
        return self.chunk.stop

    @property
    def part(self) -> str:
        return f"chunk-{self.chunk.index:06d}"


def chunk_job(chunk: Chunk, spans: tuple[UtteranceSpan, ...]) -> ChunkJob:
    """The job of one chunk, given spans that include every utterance overlapping it."""
    return ChunkJob(chunk, tuple(span for span in spans if span.offset < chunk.stop and span.offset + span.frames > chunk.start))


def plan_chunks(rows: ManifestRows | Manifest, offsets: np.ndarray, chunk_frames: int, indices: np.ndarray | None = None) -> list[ChunkJob]:
    """One job per chunk of the grid, with the slice of utterances whose frames overlap it."""
    return [
        ChunkJob(chunk, manifest_slice(rows, offsets, chunk.start, chunk.stop, indices))
        for chunk in chunk_grid(int(offsets[-1]), chunk_frames)
    ]


def valid_frame_ranges(valid: np.ndarray, offsets: np.ndarray, chunk: Chunk) -> tuple[tuple[int, int], ...]:
    """The frames of validation utterances (`valid`: [utterances] bool) inside a chunk, as [start,
    stop) ranges relative to its start."""
    first, last = overlapping_range(offsets, chunk.start, chunk.stop)
    chosen = first + np.flatnonzero(valid[first:last])
    low = np.maximum(offsets[chosen], chunk.start) - chunk.start
    high = np.minimum(offsets[chosen + 1], chunk.stop) - chunk.start
    keep = high > low
    return tuple((int(a), int(b)) for a, b in zip(low[keep], high[keep]))
