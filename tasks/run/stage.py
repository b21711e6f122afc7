"""The stage skeleton every stage runs on.

A stage is declared, not written out: a `StageSpec` names it, its output-format version, its
outputs, what goes into its key, and its work function. `run_stage` does the rest the same way
for every stage: build the key, skip when the store holds a record with that key, clear what a
different key left behind (keeping an interrupted run's finished parts), do the work, commit the
record (infra/commit.py's protocol), and log both ends. It imports no Prefect: flows/pretrain.py
turns a spec into a Prefect task, and tests and benchmarks call `run_stage` as it is.

`StageContext` is what a stage's functions are handed: the run, its store and layout, the Dask
client, the iteration, and the upstream records, read from the store (the truth is there, not
in Prefect's state).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from distributed import Client

from infra.commit import Stage, StageRecord
from infra.store import ArtifactStore, utc_now
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout, StageName, stage_iteration
from tasks.run.records import RunRecords
from tasks.run.sections import IterationConfig

log = logging.getLogger(__name__)


class MissingUpstream(RuntimeError):
    """A stage asked for an input whose producing stage has not committed."""

    retryable = False


@dataclass
class StageContext:
    """What a stage's key and work functions are handed."""

    config: PretrainConfig
    store: ArtifactStore
    client: Client | None = None
    iteration: int | None = None
    layout: RunLayout = field(init=False)
    records: RunRecords = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layout = RunLayout(self.config.run)
        self.records = RunRecords(self.store, self.layout)

    def for_one_run(self) -> StageContext:
        """The same context with nothing read yet: `run_stage` works on one of these per call, so
        that an upstream record is read once per stage run (its key, then its work), and a rerun
        reads it afresh."""
        return replace(self)

    @property
    def settings(self) -> IterationConfig:
        """This iteration's section of the config."""
        if self.iteration is None:
            raise ValueError("the corpus scope has no iteration settings")
        return self.config.iterations[self.iteration - 1]

    def upstream(self, stage: StageName, input_name: str) -> StageRecord:
        """The committed record of the stage that produces `input_name` for `stage` (tasks/run/layout.py)."""
        record, producer = self.records.upstream(stage, input_name, self.iteration)
        if record is None:
            raise MissingUpstream(f"{stage}@{self.iteration} reads {input_name} from {producer}, which has not committed")
        return record

    def split_inputs(self, stage: StageName) -> dict[str, str]:
        """`{"manifest": digest}` for a stage whose output depends on the validation split, when there is one.

        k-means, labels and training read the split from the manifest, but their other inputs (the
        features' digest covers values, offsets and ids, not splits) would not change with it; without
        a split the input is left out, so those runs keep their keys.
        """
        if not self.config.corpus.has_valid_split:
            return {}
        return {"manifest": self.upstream(stage, "manifest").output_digest}


@dataclass(frozen=True)
class StageResult:
    """What a stage's work returns for its record (outputs are the spec's)."""

    output_digest: str
    counts: dict[str, int | float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommittedStage:
    """A stage's committed record and where its outputs are: what a deep check recomputes from."""

    store: ArtifactStore
    folder: str
    record: StageRecord

    def rel(self, *parts: str) -> str:
        """Path relative to the store root of something in the stage's folder."""
        return posixpath.join(self.folder, *parts)


@dataclass(frozen=True)
class StageSpec:
    """One stage, declared.

    - `key_config` and `key_inputs` make its key (with `version`, bumped when a code change alters
      outputs); `work` writes `outputs` (relative to the stage's folder) and calls
      `stage.mark_part` as parts finish.
    - `summary` is the one line that says what a record holds: the log, the report and `inspect`
      all show it.
    - `check`, if given, may refuse the work before anything is prepared (it raises).
    - `after`, if given, runs once the stage is committed, whether it ran now or earlier: a check
      that needs the stage's output and may stop the run there (intake: every iteration's k
      against the corpus; labels: the quality gate).
    - `verify_digest` recomputes the output digest from the stored outputs (`verify --deep`),
      with the same code the stage digests with.
    """

    name: StageName
    version: int
    outputs: tuple[str, ...]
    key_config: Callable[[StageContext], dict[str, Any]]
    key_inputs: Callable[[StageContext], dict[str, str]]
    work: Callable[[StageContext, Stage], StageResult]
    summary: Callable[[StageRecord], str]
    verify_digest: Callable[[CommittedStage], str]
    check: Callable[[StageContext], None] | None = None
    after: Callable[[StageContext, StageRecord], None] | None = None
    retries: int = 2


def stage_label(name: StageName, iteration: int | None) -> str:
    """`features@2`, or `intake` for the corpus scope: how logs and errors name a stage."""
    iteration = stage_iteration(name, iteration)
    return name if iteration is None else f"{name}@{iteration}"


def open_stage(spec: StageSpec, context: StageContext) -> Stage:
    """The stage's commit protocol in its folder, with its key."""
    return Stage(
        context.store,
        context.layout.stage_folder(spec.name, context.iteration),
        spec.name,
        version=spec.version,
        config=spec.key_config(context),
        inputs=spec.key_inputs(context),
    )


def run_stage(spec: StageSpec, context: StageContext) -> StageRecord:
    """Run (or skip, or resume) one stage and return its committed record."""
    context = context.for_one_run()
    label = stage_label(spec.name, context.iteration)
    stage = open_stage(spec, context)
    if (record := stage.committed()) is not None:
        log.info("%s: committed earlier (%s), skipping", label, spec.summary(record))
    else:
        if spec.check is not None:
            spec.check(context)
        started_at = utc_now()
        stage.prepare(spec.outputs)
        result = spec.work(context, stage)
        record = stage.commit(
            outputs=list(spec.outputs),
            output_digest=result.output_digest,
            started_at=started_at,
            counts=result.counts,
            metrics=result.metrics,
        )
        log.info("%s: committed (%s) in %.1f s", label, spec.summary(record), record.seconds)
    if spec.after is not None:
        spec.after(context, record)
    return record
