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
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from distributed import Client
from pydantic import BaseModel

from infra.cluster import release_memory
from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
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


def file_digest(name: str) -> Callable[[CommittedStage], str]:
    """A `verify_digest` for a stage whose output digest is the digest of one file's bytes."""

    def verify(committed: CommittedStage) -> str:
        return digest_bytes(committed.store.read_bytes(committed.rel(name)))

    return verify


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


def record_seconds(record: StageRecord) -> float:
    """How long a committed stage worked: all its attempts under its key (a resumed stage), or its one."""
    return record.metrics.get("seconds_all_attempts", record.seconds)


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


class ClockReading(BaseModel):
    """What a running stage's clock file says: its attempts under the current key, oldest first."""

    attempts: list[dict[str, Any]] = []  # {"started_at": ISO time, "seconds": worked so far, "host", "pid"}
    updated_at: datetime | None = None

    @property
    def seconds(self) -> float:
        return sum(attempt["seconds"] for attempt in self.attempts)

    @property
    def started_at(self) -> str | None:
        """When the latest attempt started."""
        return self.attempts[-1]["started_at"] if self.attempts else None

    def worked_by(self, host: str, pid: int) -> bool:
        """Whether the latest attempt is this process's."""
        return bool(self.attempts) and (self.attempts[-1].get("host"), self.attempts[-1].get("pid")) == (host, pid)


def read_clock(store: ArtifactStore, relpath: str) -> ClockReading | None:
    raw = store.read_json(relpath)
    return None if raw is None else ClockReading.model_validate(raw)


class StageClock:
    """The time a stage works under its key, across attempts: a resumed stage's record says how
    long all its attempts took, not only the last one's (`metrics.seconds_all_attempts`).

    The clock is a small file in the stage's progress folder (infra/commit.py `clock_path`),
    rewritten every `tick_seconds` from a background thread while the stage works and once more
    when the attempt ends, so a failed attempt counts in full and a killed one up to its last
    tick, and `inspect` can say since when a stage runs. A new key clears the progress folder and
    with it the clock; the commit removes it."""

    def __init__(self, store: ArtifactStore, relpath: str, tick_seconds: float = 30.0) -> None:
        self.store = store
        self.relpath = relpath
        self.tick_seconds = tick_seconds
        self.earlier = read_clock(store, relpath) or ClockReading()
        self.started_at = utc_now()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_until_stopped, name="stage-clock", daemon=True)

    @property
    def seconds_now(self) -> float:
        return time.monotonic() - self._started

    def _write(self) -> None:
        attempt = {"started_at": self.started_at.isoformat(), "seconds": round(self.seconds_now, 3),
                   "host": socket.gethostname(), "pid": os.getpid()}
        reading = ClockReading(attempts=[*self.earlier.attempts, attempt], updated_at=utc_now())
        try:
            self.store.write_json(self.relpath, reading.model_dump(mode="json"))
        except Exception as error:  # noqa: BLE001 - a missed tick costs a few seconds of the count, not the stage
            log.debug("could not write the stage clock %s: %r", self.relpath, error)

    def _tick_until_stopped(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            self._write()

    def __enter__(self) -> StageClock:
        self._write()
        self._ticker.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop ticking and write the attempt's time (a failed attempt's counts in full; only a
        killed one loses the seconds since its last tick)."""
        self._stop.set()
        self._ticker.join()
        self._write()

    def metrics(self, seconds: float) -> dict[str, Any]:
        """What the record adds when earlier attempts worked on this key too (nothing otherwise,
        so an uninterrupted stage's record is what it always was)."""
        if not self.earlier.attempts:
            return {}
        return {"attempts": len(self.earlier.attempts) + 1, "seconds_all_attempts": round(self.earlier.seconds + seconds, 3)}


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
        with StageClock(context.store, stage.clock_path) as clock:
            if clock.earlier.attempts:
                log.info("%s: resuming (%d earlier attempt(s), %.1f s of work kept)", label, len(clock.earlier.attempts), clock.earlier.seconds)
            else:
                log.info("%s: running", label)
            result = spec.work(context, stage)
        release_memory()  # the stage's columns are dropped: the next stage starts from the driver's base, not this one's peak
        record = stage.commit(  # the clock has stopped: nothing writes to the progress folder the commit removes
            outputs=list(spec.outputs),
            output_digest=result.output_digest,
            started_at=started_at,
            counts=result.counts,
            metrics={**result.metrics, **clock.metrics(clock.seconds_now)},
        )
        log.info("%s: committed (%s) in %.1f s", label, spec.summary(record), record_seconds(record))
    if spec.after is not None:
        spec.after(context, record)
    return record
