"""Probing audio: decoded whole once, accepted as utterances (spans of it, with `corpus.segment`) or
rejected with a reason. What a probe task on a worker does, whatever the source format: a batch
of listed files (`CandidateBatch`), or a shard of a sharded corpus (tasks/corpus/formats/).

A problem with one file becomes a `Rejection`; a problem with the storage raises (and the part is
retried).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import soundfile
from pydantic import BaseModel

from infra.paths import read_whole
from tasks.corpus.audio import AudioError, check_samples, decode_audio, decode_span
from tasks.corpus.manifest import Candidate, Utterance, utterances_table
from tasks.corpus.places import misplaced
from tasks.corpus.segments import SegmentSettings, cut_spans

DURATION_TOLERANCE_SECONDS = 0.05


class ProbeSettings(Protocol):
    """The corpus section's limits and segmenting (tasks/run/config.py `CorpusConfig` is one)."""

    min_seconds: float
    max_seconds: float | None
    segment: SegmentSettings | None


class Rejection(BaseModel):
    id: str
    path: str
    origin: str
    reason: str
    detail: str


@dataclass
class Probed:
    """What one probe task found: its accepted utterances as manifest rows, in source order, and its rejections."""

    table: pa.Table = field(default_factory=lambda: utterances_table([]))
    rejections: list[Rejection] = field(default_factory=list)

    def add(self, other: Probed) -> None:
        """Append what a later part of the task found."""
        self.table = pa.concat_tables([self.table, other.table])
        self.rejections.extend(other.rejections)


@dataclass(frozen=True)
class Shard:
    """A probe task of a sharded source: one shard file at `path`, read whole by the format's `probe`."""

    name: str
    path: str


@dataclass(frozen=True)
class Expected:
    """What a source says of a file's length, checked against what it holds."""

    samples: int | None = None
    seconds: float | None = None


def _check_expected(expected: Expected, samples: int, sample_rate: int) -> None:
    if expected.samples is not None and expected.samples != samples:
        raise AudioError("manifest mismatch", f"manifest says {expected.samples} samples, file holds {samples}")
    seconds = samples / sample_rate
    if expected.seconds is not None and abs(expected.seconds - seconds) > DURATION_TOLERANCE_SECONDS:
        raise AudioError("manifest mismatch", f"manifest says {expected.seconds:.3f} s, file holds {seconds:.3f} s")


def _check_length(seconds: float, settings: ProbeSettings) -> None:
    if seconds < settings.min_seconds:
        raise AudioError("too short", f"{seconds:.3f} s < corpus.min_seconds {settings.min_seconds}")
    if settings.max_seconds is not None and seconds > settings.max_seconds:
        raise AudioError("too long", f"{seconds:.3f} s > corpus.max_seconds {settings.max_seconds}")


def rejection(utterance: Utterance, origin: str, error: AudioError) -> Rejection:
    return Rejection(id=utterance.id, path=utterance.where, origin=origin, reason=error.reason, detail=error.detail)


def accept(
    base: Utterance, samples: np.ndarray, origin: str, settings: ProbeSettings, expected: Expected = Expected()
) -> tuple[list[Utterance], list[Rejection]]:
    """A decoded piece of audio (`base` describes where it is; `samples` [samples, channels] float32)
    as the utterances it gives: itself, or with `corpus.segment` the spans a long recording is cut
    into (ids `<id>-00000`, `<id>-00001`, ...), each checked against the length limits."""
    try:
        if base.is_span:  # a whole file was checked as it was decoded
            check_samples(samples)
        _check_expected(expected, samples.shape[0], base.sample_rate)
    except AudioError as error:
        return [], [rejection(base, origin, error)]
    segment = settings.segment
    if segment is None or samples.shape[0] <= segment.max_seconds * base.sample_rate:
        pieces = [(base, samples)]
    else:
        spans = cut_spans(samples.mean(axis=1), base.sample_rate, segment)
        pieces = [
            (
                base.model_copy(
                    update={
                        "id": f"{base.id}-{index:05d}", "start": base.start + start, "samples": stop - start,
                        "recording": base.recording or base.id,
                    }
                ),
                samples[start:stop],
            )
            for index, (start, stop) in enumerate(spans)
        ]
    accepted, rejected = [], []
    for utterance, own in pieces:
        try:
            if own is not samples:
                check_samples(own)
            _check_length(utterance.seconds, settings)
            accepted.append(utterance)
        except AudioError as error:
            rejected.append(rejection(utterance, origin, error))
    return accepted, rejected


def probe_bytes(base: Utterance, data: bytes, origin: str, settings: ProbeSettings, expected: Expected = Expected()) -> Probed:
    """Probe encoded audio held in memory (a shard's member or row): `base` says where it lives."""
    try:
        if base.is_span:
            samples, sample_rate = decode_span(io.BytesIO(data), base.start, base.samples)
        else:
            samples, sample_rate = decode_audio(data)
    except AudioError as error:
        return Probed(rejections=[rejection(base, origin, error)])
    described = base.model_copy(update={"samples": samples.shape[0], "sample_rate": sample_rate, "channels": samples.shape[1]})
    accepted, rejected = accept(described, samples, origin, settings, expected)
    return Probed(utterances_table(accepted), rejected)


def _decode_candidate(candidate: Candidate, storage_options: dict[str, Any]) -> tuple[Utterance, np.ndarray]:
    if candidate.start_seconds is None:
        samples, sample_rate = decode_audio(read_whole(candidate.path, storage_options))
        start = 0
    else:
        fs, stripped = fsspec.core.url_to_fs(candidate.path, **storage_options)
        with fs.open(stripped, "rb") as handle:
            sample_rate = soundfile.info(handle).samplerate
            handle.seek(0)
            start = int(round(candidate.start_seconds * sample_rate))
            frames = int(round((candidate.duration_seconds or 0.0) * sample_rate))
            samples, sample_rate = decode_span(handle, start, frames)
    if candidate.channel is not None:
        if candidate.channel >= samples.shape[1]:
            raise AudioError("unreadable", f"the source names channel {candidate.channel}, the file has {samples.shape[1]}")
        samples = samples[:, candidate.channel : candidate.channel + 1]
    utterance = Utterance(
        id=candidate.id, path=candidate.path, samples=samples.shape[0], sample_rate=sample_rate,
        channels=samples.shape[1], speaker=candidate.speaker, start=start, channel=candidate.channel,
        recording=None if candidate.start_seconds is None else (candidate.recording or candidate.id),
    )
    return utterance, samples


def probe_candidate(candidate: Candidate, settings: ProbeSettings, storage_options: dict[str, Any]) -> tuple[list[Utterance], list[Rejection]]:
    """Probe one listed file (or span of one); a problem with the file becomes a Rejection, a problem with the storage raises."""
    placeholder = Utterance(id=candidate.id, path=candidate.path, samples=0, sample_rate=1, channels=0)
    try:
        utterance, samples = _decode_candidate(candidate, storage_options)
    except AudioError as error:
        return [], [rejection(placeholder, candidate.origin, error)]
    except FileNotFoundError:
        return [], [rejection(placeholder, candidate.origin, AudioError("missing", "no such file"))]
    except (IsADirectoryError, PermissionError) as error:
        return [], [rejection(placeholder, candidate.origin, AudioError("unreadable", str(error)))]
    expected = Expected(candidate.expected_samples, candidate.expected_seconds)
    return accept(utterance, samples, candidate.origin, settings, expected)


@dataclass(frozen=True)
class CandidateBatch:
    """A probe task of a listed source: a few files, probed one after another (batching keeps the
    task overhead small for short files)."""

    name: str
    candidates: tuple[Candidate, ...]
    allowed_roots: tuple[str, ...] = ()

    def probe(self, settings: ProbeSettings, storage_options: dict[str, Any]) -> Probed:
        accepted: list[Utterance] = []
        rejected: list[Rejection] = []
        for candidate in self.candidates:
            if (problem := misplaced(candidate, self.allowed_roots)) is not None:
                reason, detail = problem  # rejected unread: the path is never fetched
                rejected.append(Rejection(id=candidate.id, path=candidate.path, origin=candidate.origin, reason=reason, detail=detail))
                continue
            good, bad = probe_candidate(candidate, settings, storage_options)
            accepted += good
            rejected += bad
        return Probed(utterances_table(accepted), rejected)
