"""Stage: corpus intake. Lists the source, probes every file or shard in parallel on Dask (tasks/corpus/checks.py), writes the manifest.

One bad file never stops a corpus: unreadable, empty, truncated, non-finite (NaN or Inf samples),
silent, too short or mismatching files go into the intake report with their reason (every one in
`corpus/intake_report.parquet`; the JSON one counts them by reason and lists the first thousand) and
the run goes on without them; so do, never read, manifest entries outside the source's root and
`corpus.allowed_roots`, and file names with a tab or a line break. Two files with the same
utterance id stop intake, naming both.

The manifest is Parquet (`corpus/manifest.parquet`, tasks/corpus/manifest.py), written a row group
at a time as the probe tasks' results arrive (tasks/corpus/checks.py): the driver holds neither a
Python object per utterance nor the manifest's rows. Its digest (of the file's bytes) is the
stage's output digest. A store made before it holds `manifest.jsonl`, which the stages after read
as it is; intake run again there writes the Parquet one and removes the old.
"""

from __future__ import annotations

import logging
from typing import Any

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.paths import read_whole
from tasks.corpus.checks import take_in
from tasks.corpus.formats import fingerprint
from tasks.corpus.manifest import ManifestError
from tasks.corpus.splits import ValidSplit
from tasks.run.keys import key_settings
from tasks.run.layout import INTAKE_REJECTIONS, INTAKE_REPORT, LEGACY_MANIFEST, MANIFEST
from tasks.run.preflight import check_kmeans_frames
from tasks.run.records import load_manifest
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)


def intake_key_config(context: StageContext) -> dict[str, Any]:
    """The corpus section as its settings' marks keep it (tasks/run/keys.py)."""
    return key_settings(context.config.corpus)


def intake_key_inputs(context: StageContext) -> dict[str, str]:
    corpus, storage_options = context.config.corpus, context.config.fsspec_options
    inputs = {"source": fingerprint(corpus, storage_options)}
    if isinstance(corpus.valid, str):
        try:
            inputs["valid"] = digest_bytes(read_whole(corpus.valid, storage_options))
        except FileNotFoundError as error:
            raise ManifestError(f"corpus.valid: the listing of validation ids {corpus.valid} does not exist") from error
    return inputs


def intake(context: StageContext, stage: Stage) -> StageResult:
    """Probe every file of the corpus source on Dask and write the manifest and the intake report."""
    config, store = context.config, context.store
    store.remove(stage.rel(LEGACY_MANIFEST))
    split = None if config.corpus.valid is None else ValidSplit(config.corpus, config.fsspec_options)
    taken = take_in(context.client, config.corpus, config.fsspec_options, "intake", split)
    report = taken.report()
    store.write_json(stage.rel(INTAKE_REPORT), report)
    store.write_bytes(stage.rel(INTAKE_REJECTIONS), taken.rejections)
    counts = taken.counts
    if not counts["utterances"]:
        raise ManifestError(
            f"no usable audio in {config.corpus.source}: all {counts['rejected']} files rejected "
            f"(see {store.url(stage.rel(INTAKE_REPORT))})"
        )
    if split is not None:
        split.check(counts["utterances"], counts["valid_utterances"])
    store.write_bytes(stage.rel(MANIFEST), taken.manifest)
    return StageResult(
        output_digest=digest_bytes(taken.manifest),
        counts=counts,
        metrics={"rejected_by_reason": report["rejected_by_reason"], "format": taken.format, "id_rule": taken.id_rule},
    )


def verify_intake(committed: CommittedStage) -> str:
    """The manifest's digest, as the stage took it (a store made before the columnar manifest: its JSON lines)."""
    name = LEGACY_MANIFEST if any(output.endswith(LEGACY_MANIFEST) for output in committed.record.outputs) else MANIFEST
    return digest_bytes(committed.store.read_bytes(committed.rel(name)))


def intake_summary(record: StageRecord) -> str:
    counts = record.counts
    valid = f" ({counts['valid_utterances']} for validation)" if counts.get("valid_utterances") else ""
    cut = f", cut from {counts['recordings_cut']} long recordings" if counts.get("recordings_cut") else ""
    return f"{counts['utterances']} utterances{valid}{cut}, {counts['hours']:.2f} h, {counts['rejected']} rejected"


def check_k_against_the_corpus(context: StageContext, record: StageRecord) -> None:
    """Right after intake, before any features: every iteration's k within the frames the corpus gives."""
    check_kmeans_frames(context.config, load_manifest(context.store, context.layout, columns=["samples", "sample_rate"]))


INTAKE = StageSpec(
    name="intake",
    version=1,
    outputs=(MANIFEST, INTAKE_REPORT, INTAKE_REJECTIONS),
    key_config=intake_key_config,
    key_inputs=intake_key_inputs,
    work=intake,
    summary=intake_summary,
    verify_digest=verify_intake,
    after=check_k_against_the_corpus,
)
