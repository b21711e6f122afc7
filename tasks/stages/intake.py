"""Stage: corpus intake. Lists the source, probes every file in parallel on Dask (tasks/corpus/checks.py), writes the manifest.

One bad file never stops a corpus: unreadable, empty, truncated, non-finite (NaN or Inf samples),
silent, too short or mismatching files go into `corpus/intake_report.json` with their reason and
the run goes on without them; so do, never read, manifest entries outside the source's root and
`corpus.allowed_roots`, and file names with a tab or a line break. Two files
with the same utterance id stop intake before any probing, naming both paths.
"""

from __future__ import annotations

import logging
from typing import Any

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.paths import fingerprint_source, read_whole
from tasks.corpus.checks import take_in
from tasks.corpus.manifest import AUDIO_SUFFIXES, ManifestError, manifest_to_jsonl
from tasks.corpus.splits import assign_splits
from tasks.run.keys import key_settings
from tasks.run.layout import INTAKE_REPORT, MANIFEST
from tasks.run.preflight import check_kmeans_frames
from tasks.run.records import load_manifest
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)


def intake_key_config(context: StageContext) -> dict[str, Any]:
    """The corpus section as its settings' marks keep it (tasks/run/keys.py)."""
    return key_settings(context.config.corpus)


def intake_key_inputs(context: StageContext) -> dict[str, str]:
    corpus, storage_options = context.config.corpus, context.config.fsspec_options
    inputs = {"source": fingerprint_source(corpus.source, AUDIO_SUFFIXES, storage_options)}
    if isinstance(corpus.valid, str):
        try:
            inputs["valid"] = digest_bytes(read_whole(corpus.valid, storage_options))
        except FileNotFoundError as error:
            raise ManifestError(f"corpus.valid: the listing of validation ids {corpus.valid} does not exist") from error
    return inputs


def intake(context: StageContext, stage: Stage) -> StageResult:
    """Probe every file of the corpus source on Dask and write the manifest and the intake report."""
    config, store = context.config, context.store
    taken = take_in(
        context.client, config.corpus.source, config.corpus, config.fsspec_options, "intake", config.corpus.allowed_roots
    )
    store.write_json(stage.rel(INTAKE_REPORT), taken.report())
    utterances, rejections = taken.utterances, taken.rejections
    if not utterances:
        raise ManifestError(
            f"no usable audio in {config.corpus.source}: all {len(rejections)} files rejected "
            f"(see {store.url(stage.rel(INTAKE_REPORT))})"
        )
    utterances = assign_splits(utterances, config.corpus, config.fsspec_options)
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
        metrics={"rejected_by_reason": taken.report()["rejected_by_reason"]},
    )


def verify_intake(committed: CommittedStage) -> str:
    """The manifest's digest, as the stage took it."""
    return digest_bytes(committed.store.read_bytes(committed.rel(MANIFEST)))


def intake_summary(record: StageRecord) -> str:
    counts = record.counts
    valid = f" ({counts['valid_utterances']} for validation)" if counts.get("valid_utterances") else ""
    return f"{counts['utterances']} utterances{valid}, {counts['hours']:.2f} h, {counts['rejected']} rejected"


def check_k_against_the_corpus(context: StageContext, record: StageRecord) -> None:
    """Right after intake, before any features: every iteration's k within the frames the corpus gives."""
    check_kmeans_frames(context.config, load_manifest(context.store, context.layout))


INTAKE = StageSpec(
    name="intake",
    version=1,
    outputs=(MANIFEST, INTAKE_REPORT),
    key_config=intake_key_config,
    key_inputs=intake_key_inputs,
    work=intake,
    summary=intake_summary,
    verify_digest=verify_intake,
    after=check_k_against_the_corpus,
)
