"""The stage skeleton every stage runs on.

A stage is declared, not written out: a `StageSpec` names it, its output-format version, its
outputs, what goes into its key, and its work function. `run_stage` does the rest the same way
for every stage: build the key, skip when the store holds a record with that key, clear what a
different key left behind (keeping an interrupted run's finished parts), do the work, commit the
record (infra/commit.py's protocol), and log both ends. It imports no Prefect: flows/pretrain.py
turns a spec into a Prefect task, and tests and benchmarks call `run_stage` as it is.

`StageContext` is what a pipeline stage's functions are handed: the run, its store and layout,
the Dask client, the iteration, and the upstream records, read from the store (the truth is
there, not in Prefect's state). `run_stage` needs less of a context (`StageScope`: a store, a
folder and a name for each stage), so a product can declare stages of its own over another
folder (tasks/products/units.py).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

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


class StageScope(Protocol):
    """What `run_stage` needs of a context: where a stage's folder is, how to name it, a fresh copy per run."""

    store: ArtifactStore

    def folder(self, stage: str) -> str:
        """The stage's folder, relative to the store root."""
        ...

    def label(self, stage: str) -> str:
        """How logs and errors name the stage (`features@2`)."""
        ...

    def for_one_run(self) -> StageScope:
        """The same context with nothing read yet."""
        ...


Context = TypeVar("Context", bound=StageScope)


@dataclass
class StageContext:
    """What a pipeline stage's key and work functions are handed."""

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

    def folder(self, stage: StageName) -> str:
        return self.layout.stage_folder(stage, self.iteration)

    def label(self, stage: StageName) -> str:
        return stage_label(stage, self.iteration)

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
class StageSpec(Generic[Context]):
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
    - `keep_previous`, if given, says how many earlier keys' work to keep aside rather than
      remove when the key changes (train: its models are too dear to throw away).
    - `recorded_files`, if given, names the files of a record (relative to the stage's folder)
      whose digests it gives beside its output digest (train: its best weights and the
      checkpoints it kept): `verify --deep` recomputes each.
    - `repair`, if given, is called instead of clearing the stage when its record has the current
      key but its outputs changed since (a truncated or lost file): it removes what is damaged,
      and the work then resumes from what is intact (train: from its newest intact checkpoint,
      not from step 0). Without it such a stage runs afresh.
    """

    name: str
    version: int
    outputs: tuple[str, ...]
    key_config: Callable[[Context], dict[str, Any]]
    key_inputs: Callable[[Context], dict[str, str]]
    work: Callable[[Context, Stage], StageResult]
    summary: Callable[[StageRecord], str]
    verify_digest: Callable[[CommittedStage], str]
    check: Callable[[Context], None] | None = None
    after: Callable[[Context, StageRecord], None] | None = None
    keep_previous: Callable[[Context], int] | None = None
    recorded_files: Callable[[StageRecord], dict[str, str]] | None = None
    repair: Callable[[Context, Stage, StageRecord], None] | None = None
    retries: int = 2


def stage_label(name: StageName, iteration: int | None) -> str:
    """`features@2`, or `intake` for the corpus scope: how logs and errors name a stage."""
    iteration = stage_iteration(name, iteration)
    return name if iteration is None else f"{name}@{iteration}"


def open_stage(spec: StageSpec[Context], context: Context) -> Stage:
    """The stage's commit protocol in its folder, with its key."""
    return Stage(
        context.store,
        context.folder(spec.name),
        spec.name,
        version=spec.version,
        config=spec.key_config(context),
        inputs=spec.key_inputs(context),
        outputs=spec.outputs,
        keep_previous=0 if spec.keep_previous is None else spec.keep_previous(context),
    )


def run_stage(spec: StageSpec[Context], context: Context) -> StageRecord:
    """Run (or skip, or resume) one stage and return its committed record."""
    context = context.for_one_run()
    label = context.label(spec.name)
    stage = open_stage(spec, context)
    stage.check_fence()  # a retry of a run that lost its lease stops here, before it reads or clears anything
    if (record := stage.committed()) is not None:
        log.info("%s: committed earlier (%s), skipping", label, spec.summary(record))
    else:
        if spec.check is not None:
            spec.check(context)
        started_at = utc_now()
        damaged = stage.damaged_record()
        if damaged is not None and spec.repair is not None:
            spec.repair(context, stage, damaged)
            stage.prepare(repairing=True)
        else:
            stage.prepare()
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
