"""Where frames sit: utterances concatenated in manifest order, cut into a grid of fixed-size chunks.

Every chunked stage (features, k-means, labels) works on the same grid: chunk i holds frames
[i * chunk_frames, (i + 1) * chunk_frames) of the concatenation, which is also the Zarr chunk
that one Dask task writes and resumes. Frame counts follow from sample counts, so the grid is
known before any audio is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tasks.corpus.manifest import Utterance


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
    """Where one utterance's frames sit in the concatenated frames (`index`: its place in the manifest)."""

    index: int
    id: str
    path: str
    samples_16k: int
    offset: int
    frames: int

    def overlap(self, start: int, stop: int) -> tuple[int, int]:
        """The part of this utterance's frames inside [start, stop), as concatenation indices."""
        return max(start, self.offset), min(stop, self.offset + self.frames)


def frame_offsets(utterances: list[Utterance], num_frames: Callable[[int], int]) -> np.ndarray:
    """[utterances + 1] int64: where each utterance's frames start, given frames per 16 kHz samples."""
    frames = [num_frames(utterance.samples_16k) for utterance in utterances]
    return np.concatenate([[0], np.cumsum(frames, dtype=np.int64)]).astype(np.int64)


def overlapping_utterances(offsets: np.ndarray, start: int, stop: int) -> list[int]:
    """Indices of the utterances with frames in [start, stop), given concatenation offsets."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    return [i for i in range(max(first, 0), last) if offsets[i + 1] > start and offsets[i] < stop]


def utterance_spans(utterances: list[Utterance], offsets: np.ndarray, start: int, stop: int) -> tuple[UtteranceSpan, ...]:
    """The utterances whose frames overlap [start, stop), with where their frames sit."""
    return tuple(
        UtteranceSpan(
            index=i,
            id=utterances[i].id,
            path=utterances[i].path,
            samples_16k=utterances[i].samples_16k,
            offset=int(offsets[i]),
            frames=int(offsets[i + 1] - offsets[i]),
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
    """One chunk of the grid and the utterances whose frames overlap it."""

    chunk: Chunk
    utterances: tuple[UtteranceSpan, ...]

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


def plan_chunks(utterances: list[Utterance], offsets: np.ndarray, chunk_frames: int) -> list[ChunkJob]:
    """One job per chunk of the grid, with the utterances whose frames overlap it."""
    return [
        ChunkJob(chunk, utterance_spans(utterances, offsets, chunk.start, chunk.stop))
        for chunk in chunk_grid(int(offsets[-1]), chunk_frames)
    ]


def valid_frame_ranges(utterances: list[Utterance], offsets: np.ndarray, chunk: Chunk) -> tuple[tuple[int, int], ...]:
    """The frames of validation utterances inside a chunk, as [start, stop) ranges relative to its start."""
    ranges = []
    for i in overlapping_utterances(offsets, chunk.start, chunk.stop):
        if utterances[i].split == "valid":
            low, high = max(chunk.start, int(offsets[i])), min(chunk.stop, int(offsets[i + 1]))
            ranges.append((low - chunk.start, high - chunk.start))
    return tuple(ranges)
