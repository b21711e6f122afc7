"""Probing corpus files on Dask: each file decoded whole, accepted as an Utterance or rejected with its reason.

Shared by intake (which writes the manifest) and `hubert-pipeline units` (which applies a bundle to
any corpus), so both take and refuse the same files for the same reasons. One bad file never
stops a corpus; a problem with the storage itself raises.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from distributed import Client
from pydantic import BaseModel

from infra.parts import gather_parts
from infra.paths import read_whole
from tasks.corpus.audio import AudioError, probe_audio
from tasks.corpus.manifest import Candidate, ManifestError, Utterance, check_unique_ids, list_candidates, misplaced

log = logging.getLogger(__name__)

PROBE_BATCH = 32
DURATION_TOLERANCE_SECONDS = 0.05


class LengthLimits(Protocol):
    """The corpus section's length limits (tasks/run/config.py `CorpusConfig` is one)."""

    min_seconds: float
    max_seconds: float | None


class Rejection(BaseModel):
    id: str
    path: str
    origin: str
    reason: str
    detail: str


def _check_length(candidate: Candidate, utterance: Utterance, corpus: LengthLimits) -> None:
    if candidate.expected_samples is not None and candidate.expected_samples != utterance.samples:
        raise AudioError(
            "manifest mismatch", f"manifest says {candidate.expected_samples} samples, file holds {utterance.samples}"
        )
    if (
        candidate.expected_seconds is not None
        and abs(candidate.expected_seconds - utterance.seconds) > DURATION_TOLERANCE_SECONDS
    ):
        raise AudioError(
            "manifest mismatch",
            f"manifest says {candidate.expected_seconds:.3f} s, file holds {utterance.seconds:.3f} s",
        )
    if utterance.seconds < corpus.min_seconds:
        raise AudioError("too short", f"{utterance.seconds:.3f} s < corpus.min_seconds {corpus.min_seconds}")
    if corpus.max_seconds is not None and utterance.seconds > corpus.max_seconds:
        raise AudioError("too long", f"{utterance.seconds:.3f} s > corpus.max_seconds {corpus.max_seconds}")


def probe_candidate(
    candidate: Candidate, corpus: LengthLimits, storage_options: dict[str, Any]
) -> Utterance | Rejection:
    """Probe one file; a problem with the file becomes a Rejection, a problem with the storage raises."""
    try:
        info = probe_audio(read_whole(candidate.path, storage_options))
        utterance = Utterance(
            id=candidate.id,
            path=candidate.path,
            samples=info.samples,
            sample_rate=info.sample_rate,
            channels=info.channels,
            speaker=candidate.speaker,
        )
        _check_length(candidate, utterance, corpus)
        return utterance
    except AudioError as error:
        reason, detail = error.reason, error.detail
    except FileNotFoundError:
        reason, detail = "missing", "no such file"
    except (IsADirectoryError, PermissionError) as error:
        reason, detail = "unreadable", str(error)
    return Rejection(id=candidate.id, path=candidate.path, origin=candidate.origin, reason=reason, detail=detail)


def probe_batch(
    candidates: list[Candidate], corpus: LengthLimits, storage_options: dict[str, Any]
) -> list[Utterance | Rejection]:
    """One Dask task: probe a batch of files (batching keeps task overhead small for short files)."""
    return [probe_candidate(candidate, corpus, storage_options) for candidate in candidates]


def probe_candidates(
    client: Client, candidates: list[Candidate], corpus: LengthLimits, storage_options: dict[str, Any], description: str
) -> tuple[list[Utterance], list[Rejection]]:
    """Every candidate probed on Dask, in batches: the usable ones and the rejected ones, in source order."""
    batches = [candidates[start : start + PROBE_BATCH] for start in range(0, len(candidates), PROBE_BATCH)]
    names = [f"probe-{index}" for index in range(len(batches))]
    probed = gather_parts(client, probe_batch, batches, names, description, corpus=corpus, storage_options=storage_options)
    by_id = {result.id: result for batch in probed for result in batch}
    results = [by_id[candidate.id] for candidate in candidates]
    return (
        [result for result in results if isinstance(result, Utterance)],
        [result for result in results if isinstance(result, Rejection)],
    )


@dataclass(frozen=True)
class TakenIn:
    """A corpus source probed: its usable utterances and its rejected files (with their reasons), in source order."""

    utterances: list[Utterance]
    rejections: list[Rejection]

    def report(self) -> dict[str, Any]:
        """The intake report: every rejected file with its reason, and the count by reason."""
        return {
            "rejected": [rejection.model_dump() for rejection in self.rejections],
            "rejected_by_reason": dict(Counter(rejection.reason for rejection in self.rejections)),
        }


def screen_candidates(candidates: list[Candidate], allowed_roots: list[str]) -> tuple[list[Candidate], list[Rejection]]:
    """The candidates that may be read, and those rejected unread (outside the source and the
    allowed roots, or with a name a .tsv cannot hold), in source order."""
    kept, rejected = [], []
    for candidate in candidates:
        if (problem := misplaced(candidate, allowed_roots)) is None:
            kept.append(candidate)
        else:
            reason, detail = problem
            rejected.append(Rejection(id=candidate.id, path=candidate.path, origin=candidate.origin, reason=reason, detail=detail))
    return kept, rejected


def take_in(
    client: Client, source: str, limits: LengthLimits, storage_options: dict[str, Any], description: str,
    allowed_roots: list[str] | None = None,
) -> TakenIn:
    """List a corpus source, reject unread the entries outside it (and `allowed_roots`), refuse
    clashing ids, probe every other file on Dask; rejections are logged.

    ManifestError when the source lists no audio file (every file rejected is the caller's to judge,
    after it has written the report)."""
    listed = list_candidates(source, storage_options)
    if not listed:
        raise ManifestError(f"no .wav or .flac files in corpus source {source}")
    candidates, unread = screen_candidates(listed, list(allowed_roots or []))
    check_unique_ids(candidates)
    log.info("%s: probing %d files on %d Dask worker(s)", description, len(candidates), len(client.scheduler_info()["workers"]))
    utterances, probed = probe_candidates(client, candidates, limits, storage_options, description) if candidates else ([], [])
    order = {candidate.origin: index for index, candidate in enumerate(listed)}
    rejections = sorted(unread + probed, key=lambda rejection: order[rejection.origin])
    for rejection in rejections:
        log.warning("%s: skipping %s (%s): %s", description, rejection.path, rejection.reason, rejection.detail)
    return TakenIn(utterances, rejections)
