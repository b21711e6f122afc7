"""Stage: corpus intake. Lists the source, probes every file in parallel on Dask, writes the manifest.

One bad file never stops a corpus: unreadable, empty, truncated, too short or mismatching files
go into `corpus/intake_report.json` with their reason and the run goes on without them. Two files
with the same utterance id stop intake before any probing, naming both paths.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import Any

from pydantic import BaseModel

from infra.digest import digest_bytes
from infra.parts import gather_parts
from infra.paths import fingerprint_source
from infra.store import Stage, StageRecord
from tasks.audio import AudioError, probe_audio, read_bytes
from tasks.config import CorpusConfig
from tasks.layout import INTAKE_REPORT, MANIFEST
from tasks.manifest import (
    AUDIO_SUFFIXES,
    Candidate,
    ManifestError,
    Utterance,
    check_unique_ids,
    list_candidates,
    manifest_to_jsonl,
)
from tasks.splits import assign_splits
from tasks.stage import StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)

PROBE_BATCH = 32
DURATION_TOLERANCE_SECONDS = 0.05


class Rejection(BaseModel):
    id: str
    path: str
    origin: str
    reason: str
    detail: str


def _check_length(candidate: Candidate, utterance: Utterance, corpus: CorpusConfig) -> None:
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
    candidate: Candidate, corpus: CorpusConfig, storage_options: dict[str, Any]
) -> Utterance | Rejection:
    """Probe one file; a problem with the file becomes a Rejection, a problem with the storage raises."""
    try:
        info = probe_audio(read_bytes(candidate.path, storage_options))
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
    candidates: list[Candidate], corpus: CorpusConfig, storage_options: dict[str, Any]
) -> list[Utterance | Rejection]:
    """One Dask task: probe a batch of files (batching keeps task overhead small for short files)."""
    return [probe_candidate(candidate, corpus, storage_options) for candidate in candidates]


def intake_key_config(context: StageContext) -> dict[str, Any]:
    """The validation split enters the key only when there is one, so runs without keep their keys."""
    corpus = context.config.corpus
    split = {"valid", "valid_seed"} if corpus.has_valid_split else set()
    return corpus.model_dump(include={"source", "min_seconds", "max_seconds", *split})


def intake_key_inputs(context: StageContext) -> dict[str, str]:
    corpus, storage_options = context.config.corpus, context.config.storage_options
    inputs = {"source": fingerprint_source(corpus.source, AUDIO_SUFFIXES, storage_options)}
    if isinstance(corpus.valid, str):
        try:
            inputs["valid"] = digest_bytes(read_bytes(corpus.valid, storage_options))
        except FileNotFoundError as error:
            raise ManifestError(f"corpus.valid: the listing of validation ids {corpus.valid} does not exist") from error
    return inputs


def intake(context: StageContext, stage: Stage) -> StageResult:
    """Probe every file of the corpus source on Dask and write the manifest and the intake report."""
    config, store, client = context.config, context.store, context.client
    candidates = list_candidates(config.corpus.source, config.storage_options)
    if not candidates:
        raise ManifestError(f"no .wav or .flac files in corpus source {config.corpus.source}")
    check_unique_ids(candidates)
    log.info("intake: probing %d files on %d Dask worker(s)", len(candidates), len(client.scheduler_info()["workers"]))

    batches = [candidates[start : start + PROBE_BATCH] for start in range(0, len(candidates), PROBE_BATCH)]
    attempt = uuid.uuid4().hex[:8]  # fresh keys: Dask would hand back a failed attempt's result
    futures = client.map(
        probe_batch, batches, corpus=config.corpus, storage_options=config.storage_options,
        key=[f"probe-{attempt}-{index}" for index in range(len(batches))],
    )
    by_id = {result.id: result for batch in gather_parts(futures, "intake") for result in batch}
    results = [by_id[candidate.id] for candidate in candidates]
    utterances = [result for result in results if isinstance(result, Utterance)]
    rejections = [result for result in results if isinstance(result, Rejection)]
    for rejection in rejections:
        log.warning("intake: skipping %s (%s): %s", rejection.path, rejection.reason, rejection.detail)
    reasons = Counter(rejection.reason for rejection in rejections)
    store.write_json(
        stage.rel(INTAKE_REPORT),
        {"rejected": [rejection.model_dump() for rejection in rejections], "rejected_by_reason": dict(reasons)},
    )
    if not utterances:
        raise ManifestError(
            f"no usable audio in {config.corpus.source}: all {len(rejections)} files rejected "
            f"(see {store.url(stage.rel(INTAKE_REPORT))})"
        )
    utterances = assign_splits(utterances, config.corpus, config.storage_options)
    manifest_text = manifest_to_jsonl(utterances)
    store.write_text(stage.rel(MANIFEST), manifest_text)
    return StageResult(
        output_digest=digest_bytes(manifest_text.encode()),
        counts={
            "utterances": len(utterances),
            "valid_utterances": sum(utterance.split == "valid" for utterance in utterances),
            "rejected": len(rejections),
            "hours": round(sum(utterance.seconds for utterance in utterances) / 3600, 4),
            "speakers": len({u.speaker for u in utterances if u.speaker is not None}),
        },
        metrics={"rejected_by_reason": dict(reasons)},
    )


def intake_summary(record: StageRecord) -> str:
    counts = record.counts
    valid = f" ({counts['valid_utterances']} for validation)" if counts.get("valid_utterances") else ""
    return f"{counts['utterances']} utterances{valid}, {counts['hours']:.2f} h, {counts['rejected']} rejected"


INTAKE = StageSpec(
    name="intake",
    version=1,
    outputs=(MANIFEST, INTAKE_REPORT),
    key_config=intake_key_config,
    key_inputs=intake_key_inputs,
    work=intake,
    summary=intake_summary,
)
