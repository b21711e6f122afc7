"""`hubert-pipeline inspect`: what every stage of a run has committed, read from the store alone."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from rich.table import Table

from infra.commit import clock_path, open_run, parts_in_progress
from infra.lease import LeaseHolder, live_holder
from tasks.run.layout import ITERATION_STAGES, RunLayout, StageName
from tasks.run.records import RunRecords
from tasks.run.stage import read_clock, record_seconds
from tasks.stages.catalog import STAGES
from tasks.stages.reference.verdict import iteration_verdict
from tasks.stages.train.rank import StoreCheckpoints


class StageStatus(BaseModel):
    stage: str
    status: str  # done | stale | running | partial | missing | not configured (train, in a last iteration that has none)
    seconds: float | None = None  # a committed stage: all its attempts; a running or partial one: its work so far
    holder: str | None = None  # a running stage: who holds the run's lease
    since: str | None = None  # a running stage: when its current attempt started
    progress: str | None = None  # a running or partial training: the step of its latest checkpoint
    bytes: int | None = None
    finished_at: str | None = None
    summary: str | None = None  # the stage's own one-line summary of its record (tasks/run/stage.py `StageSpec.summary`)
    counts: dict[str, int | float] = {}
    metrics: dict[str, Any] = {}
    parts_done: int | None = None

    def as_json(self) -> dict[str, Any]:
        """Counts and metrics flattened in, so `labels.frames` and `kmeans.inertia_per_frame` read directly."""
        summary = self.model_dump(exclude={"counts", "metrics"}, exclude_none=True)
        return {**summary, **self.counts, **self.metrics}


class RunStatus(BaseModel):
    run: str
    path: str
    code_version: str | None
    logs: list[str] = []  # the run's log files (one per invocation), oldest first
    intake: StageStatus
    iterations: list[dict[str, StageStatus]]
    verdicts: list[dict[str, Any] | None] = []  # per iteration, tasks/stages/labels/verdict.py's, once its labels exist

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "path": self.path,
            "code_version": self.code_version,
            "logs": self.logs,
            "intake": self.intake.as_json(),
            "iterations": [
                {
                    "iteration": number,
                    **{stage: status.as_json() for stage, status in stages.items()},
                    "quality": stages["labels"].metrics.get("quality"),
                    "verdict": verdict,
                }
                for number, (stages, verdict) in enumerate(zip(self.iterations, self.verdicts), start=1)
            ],
        }


NOT_CONFIGURED = "not configured"


def training_progress(records: RunRecords, iteration: int | None, steps: int | None) -> str | None:
    """`step N of M` from the newest checkpoint of an uncommitted training, or None before its first."""
    if iteration is None:
        return None
    kept = StoreCheckpoints(records.store, records.layout.checkpoints(iteration)).steps()
    if not kept:
        return None
    return f"step {kept[-1]}" + (f" of {steps}" if steps else "") + " (latest checkpoint)"


def unfinished_status(
    records: RunRecords, stage: StageName, iteration: int | None, holder: LeaseHolder | None, steps: int | None
) -> StageStatus:
    """An uncommitted stage: `running` where the process holding the run's live lease is the one
    whose attempt the clock counts (a stage runs in the flow's process), with who, since when and
    how far; `partial` where an attempt left parts or time behind; else `missing`."""
    folder = records.layout.stage_folder(stage, iteration)
    parts = parts_in_progress(records.store, folder, stage)
    clock = read_clock(records.store, clock_path(folder, stage))
    progress = training_progress(records, iteration, steps) if stage == "train" and clock is not None else None
    if clock is None and not parts:
        return StageStatus(stage=stage, status="missing")
    running = clock is not None and holder is not None and clock.worked_by(holder.host, holder.pid)
    return StageStatus(
        stage=stage,
        status="running" if running else "partial",
        parts_done=parts or None,
        seconds=None if clock is None else round(clock.seconds, 1),
        holder=holder.describe() if running else None,
        since=clock.started_at if running else None,
        progress=progress,
    )


def stage_status(
    records: RunRecords, stage: StageName, iteration: int | None, holder: LeaseHolder | None = None, steps: int | None = None
) -> StageStatus:
    record = records.get(stage, iteration)
    if record is None:
        return unfinished_status(records, stage, iteration, holder, steps)
    return StageStatus(
        stage=stage,
        status="stale" if records.is_stale(record) else "done",
        summary=STAGES[stage].summary(record),
        seconds=record_seconds(record),
        bytes=sum(record.sizes.values()),
        finished_at=record.finished_at.isoformat(),
        counts=record.counts,
        metrics=record.metrics,
    )


def _configured(stage: StageName, number: int, section: dict[str, Any], corpus: dict[str, Any]) -> bool:
    """Whether iteration `number`'s section of run.json runs `stage`, as the plan decides
    (tasks/run/plan.py `iteration_stages`) from the config as run.json holds it."""
    trains = section.get("train") is not None
    alignments, valid = corpus.get("alignments") is not None, corpus.get("valid") is not None
    wanted = {
        "reference": number > 1 and alignments,
        "train": trains,
        "profile": trains and (section.get("profile") or {}).get("enabled", True),
        "probe": trains and alignments and valid and (section.get("probe") or {}).get("enabled", True),
    }
    return wanted.get(stage, True)


def inspect_run(run_path: str, storage_options: dict[str, Any] | None = None) -> RunStatus:
    """The status of every stage of the run at `run_path` (`<store root>/<run name>`)."""
    store, run = open_run(run_path, storage_options)
    layout = RunLayout(run)
    info = store.read_json(layout.run_info)
    if info is None:
        raise FileNotFoundError(f"no run at {run_path} (no run.json there)")
    configured = info["config"]["iterations"]
    records = RunRecords(store, layout)
    holder = live_holder(store, layout.lease)
    verdicts = [
        iteration_verdict(
            number, records.get("labels", number), records.get("labels", number - 1) if number > 1 else None,
            records.get("reference", number), records.get("probe", number - 1) if number > 1 else None,
        )
        for number in range(1, len(configured) + 1)
    ]
    return RunStatus(
        run=run,
        path=store.url(run),
        code_version=info.get("code_version"),
        logs=[store.url(layout.logs, name) for name in sorted(store.list_names(layout.logs)) if layout.is_log(name)],
        intake=stage_status(records, "intake", None, holder),
        iterations=[
            {
                stage: StageStatus(stage=stage, status=NOT_CONFIGURED)
                if not _configured(stage, number, section, info["config"].get("corpus") or {})
                else stage_status(records, stage, number, holder, (section.get("train") or {}).get("steps"))
                for stage in ITERATION_STAGES
            }
            for number, section in enumerate(configured, start=1)
        ],
        verdicts=[None if verdict is None else {**verdict.as_json(), "summary": verdict.sentence()} for verdict in verdicts],
    )


def _key_metric(status: StageStatus) -> str:
    if status.status in ("running", "partial"):
        done = [status.progress, None if status.parts_done is None else f"{status.parts_done} part(s) finished"]
        said = ", ".join(part for part in done if part) or "started"
        if status.status == "running":
            said += f"; since {status.since[:19]}, lease held by {status.holder}"
        return said
    return status.summary or ""


def _human_bytes(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def render_table(status: RunStatus) -> Table:
    caption = f"log of the latest invocation: {status.logs[-1]}" if status.logs else None
    table = Table(title=f"run {status.run}  ({status.path})", caption=caption, caption_justify="left")
    for column in ("iteration", "stage", "status", "key metric", "duration", "size"):
        table.add_column(column)
    rows = [("-", status.intake)] + [
        (str(number), stage) for number, stages in enumerate(status.iterations, start=1) for stage in stages.values()
    ]
    colours = {"done": "green", "stale": "yellow", "running": "cyan", "partial": "yellow", "missing": "dim", NOT_CONFIGURED: "dim"}
    verdict_colours = {"better": "green", "worse": "bold red", "unchanged": "yellow", "unmeasured": "yellow"}
    for position, (iteration, stage) in enumerate(rows):
        table.add_row(
            iteration,
            stage.stage,
            f"[{colours[stage.status]}]{stage.status}[/]",
            _key_metric(stage),
            "" if stage.seconds is None else f"{stage.seconds:.1f} s",
            _human_bytes(stage.bytes),
        )
        # The verdict follows the last of labels and the reference that the iteration has.
        following = rows[position + 1][1] if position + 1 < len(rows) else None
        last_measure = stage.stage == "reference" or (
            stage.stage == "labels" and (following is None or following.stage != "reference" or following.status == NOT_CONFIGURED)
        )
        verdict = status.verdicts[int(iteration) - 1] if iteration != "-" and last_measure else None
        if verdict is not None and verdict["verdict"] in verdict_colours:
            colour = verdict_colours[verdict["verdict"]]
            table.add_row(iteration, "verdict", f"[{colour}]{verdict['verdict']}[/]", verdict["summary"].split(": ", 2)[-1], "", "")
    return table
