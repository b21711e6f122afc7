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

from distributed import Client
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel

from infra.digest import digest_bytes
from infra.parts import gather_parts
from infra.paths import fingerprint_source
from infra.store import ArtifactStore, Stage, StageRecord, utc_now
from tasks.audio import AudioError, probe_audio, read_bytes
from tasks.config import CorpusConfig, PretrainConfig
from tasks.manifest import (
    AUDIO_SUFFIXES,
    Candidate,
    ManifestError,
    Utterance,
    check_unique_ids,
    list_candidates,
    manifest_from_jsonl,
    manifest_to_jsonl,
)
from tasks.retry import retry_transient

log = logging.getLogger(__name__)

INTAKE_VERSION = 1
MANIFEST = "manifest.jsonl"
REPORT = "intake_report.json"
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


def intake_stage(config: PretrainConfig, store: ArtifactStore) -> Stage:
    corpus = config.corpus
    return Stage(
        store, config.run, "corpus", "intake",
        version=INTAKE_VERSION,
        config=corpus.model_dump(include={"source", "min_seconds", "max_seconds"}),
        inputs={"source": fingerprint_source(corpus.source, AUDIO_SUFFIXES, config.storage_options)},
    )


def run_intake(config: PretrainConfig, store: ArtifactStore, client: Client) -> StageRecord:
    """Probe the corpus and commit `corpus/manifest.jsonl` (skipped if already committed)."""
    stage = intake_stage(config, store)
    if (record := stage.committed()) is not None:
        log.info("intake: committed earlier (%d utterances), skipping", record.counts.get("utterances", 0))
        return record
    started_at = utc_now()
    candidates = list_candidates(config.corpus.source, config.storage_options)
    if not candidates:
        raise ManifestError(f"no .wav or .flac files in corpus source {config.corpus.source}")
    check_unique_ids(candidates)
    stage.prepare([MANIFEST, REPORT])
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
        stage.rel(REPORT),
        {"rejected": [rejection.model_dump() for rejection in rejections], "rejected_by_reason": dict(reasons)},
    )
    if not utterances:
        raise ManifestError(
            f"no usable audio in {config.corpus.source}: all {len(rejections)} files rejected "
            f"(see {store.url(stage.rel(REPORT))})"
        )
    manifest_text = manifest_to_jsonl(utterances)
    store.write_text(stage.rel(MANIFEST), manifest_text)
    hours = sum(utterance.seconds for utterance in utterances) / 3600
    record = stage.commit(
        outputs=[MANIFEST, REPORT],
        output_digest=digest_bytes(manifest_text.encode()),
        started_at=started_at,
        counts={
            "utterances": len(utterances),
            "rejected": len(rejections),
            "hours": round(hours, 4),
            "speakers": len({u.speaker for u in utterances if u.speaker is not None}),
        },
        metrics={"rejected_by_reason": dict(reasons)},
    )
    log.info("intake: %d utterances (%.2f h), %d rejected", len(utterances), hours, len(rejections))
    return record


def load_manifest(store: ArtifactStore, run: str) -> list[Utterance]:
    return manifest_from_jsonl(store.read_text(f"{run}/corpus/{MANIFEST}"))


intake_task = task(run_intake, name="intake", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NONE)
