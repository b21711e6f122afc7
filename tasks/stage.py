"""The stage skeleton every stage runs on, and the one way a stage becomes a Prefect task.

A stage is declared, not written out: a `StageSpec` names it, its output-format version, its
outputs, what goes into its key, and its work function. `run_stage` does the rest the same way
for every stage: build the key, skip when the store holds a record with that key, clear what a
different key left behind (keeping an interrupted run's finished parts), do the work, commit the
record (infra/store.py's protocol), and log both ends.

`StageContext` is what a stage's functions are handed: the run, its store and layout, the Dask
client, the iteration, and the upstream records, read from the store (the truth is there, not
in Prefect's state).
"""

from __future__ import annotations

import functools
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from botocore.exceptions import ConnectionError as BotocoreConnectionError
from distributed import Client
from prefect import Task, task
from prefect.cache_policies import NONE

from infra.commit import Stage, StageRecord, read_record
from infra.parts import PartsFailed
from infra.store import ArtifactStore, utc_now
from tasks.config import ConfigError, IterationConfig, PretrainConfig
from tasks.layout import STAGE_INPUTS, RunLayout, StageName, stage_iteration, upstream_iteration
from tasks.manifest import ManifestError
from tasks.verdict import QualityGateFailed

log = logging.getLogger(__name__)


class MissingUpstream(RuntimeError):
    """A stage asked for an input whose producing stage has not committed."""


@dataclass
class StageContext:
    """What a stage's key and work functions are handed."""

    config: PretrainConfig
    store: ArtifactStore
    client: Client | None = None
    iteration: int | None = None
    layout: RunLayout = field(init=False)
    _upstream_records: dict[tuple[StageName, int | None], StageRecord] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layout = RunLayout(self.config.run)
        self._upstream_records = {}

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
        """The committed record of the stage that produces `input_name` for `stage` (tasks/layout.py)."""
        producer = STAGE_INPUTS[stage][input_name]
        iteration = upstream_iteration(producer, self.iteration)
        if (record := self._upstream_records.get((producer.stage, iteration))) is not None:
            return record
        record = read_record(self.store, self.layout.stage_folder(producer.stage, iteration), producer.stage)
        if record is None:
            where = producer.stage if iteration is None else f"{producer.stage}@{iteration}"
            raise MissingUpstream(f"{stage}@{self.iteration} reads {input_name} from {where}, which has not committed")
        self._upstream_records[producer.stage, iteration] = record
        return record


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
    """One stage, declared. `key_config` and `key_inputs` make its key (with `version`, which is
    bumped when a code change alters outputs); `work` writes `outputs` (relative to the stage's
    folder) and calls `stage.mark_part` as parts finish; `summary` is the log line's detail;
    `check`, if given, may refuse the work before anything is prepared (it raises);
    `verify_digest` recomputes the output digest from the stored outputs (`verify --deep`), with
    the same code the stage digests with."""

    name: StageName
    version: int
    outputs: tuple[str, ...]
    key_config: Callable[[StageContext], dict[str, Any]]
    key_inputs: Callable[[StageContext], dict[str, str]]
    work: Callable[[StageContext, Stage], StageResult]
    summary: Callable[[StageRecord], str]
    verify_digest: Callable[[CommittedStage], str]
    check: Callable[[StageContext], None] | None = None
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
        return record
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
    return record


def is_transient(error: BaseException) -> bool:
    """Storage and network errors may pass; errors in the data or the config will not.

    A stage whose parts failed is retried too: the retry resumes from the parts that finished,
    and a part that fails for a reason in the data fails again, cheaply.
    """
    if isinstance(error, (ConfigError, ManifestError, QualityGateFailed, FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError, BotocoreConnectionError, PartsFailed))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False


@functools.cache
def stage_task(spec: StageSpec) -> Task:
    """`run_stage` of this stage as a Prefect task: retried on transient errors only, never cached
    by Prefect (the store's records decide what is done)."""
    return task(
        functools.partial(run_stage, spec),
        name=spec.name,
        retries=spec.retries,
        retry_delay_seconds=10,
        retry_condition_fn=retry_transient,
        cache_policy=NONE,
    )
