"""`hubert-pipeline inspect`: what every stage of a run has committed, read from the store alone."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from infra.commit import StageRecord, open_run, parts_in_progress, read_record
from infra.store import ArtifactStore
from tasks.artifacts import published_digests
from tasks.layout import ITERATION_STAGES, STAGE_INPUTS, RunLayout, StageName, scope_iteration, upstream_iteration
from tasks.verdict import iteration_verdict


class StageStatus(BaseModel):
    stage: str
    status: str  # done | stale | partial | missing | not configured (train, in a last iteration that has none)
    seconds: float | None = None
    bytes: int | None = None
    finished_at: str | None = None
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
    intake: StageStatus
    iterations: list[dict[str, StageStatus]]
    verdicts: list[dict[str, Any] | None] = []  # per iteration, tasks/verdict.py's, once its labels exist

    def as_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "path": self.path,
            "code_version": self.code_version,
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

RecordReader = Callable[[StageName, int | None], StageRecord | None]
"""(stage, iteration) -> that stage's record, or None."""


def _is_stale(read: RecordReader, record: StageRecord) -> bool:
    """A record whose inputs no longer match what its upstream stages committed."""
    for name, digest in record.inputs.items():
        producer = STAGE_INPUTS[record.stage].get(name)
        if producer is None:
            continue
        upstream = read(producer.stage, upstream_iteration(producer, scope_iteration(record.scope)))
        if upstream is None or digest not in published_digests(upstream):
            return True
    return False


def stage_status(store: ArtifactStore, layout: RunLayout, stage: StageName, iteration: int | None, read: RecordReader) -> StageStatus:
    record = read(stage, iteration)
    if record is None:
        if parts := parts_in_progress(store, layout.stage_folder(stage, iteration), stage):
            return StageStatus(stage=stage, status="partial", parts_done=parts)
        return StageStatus(stage=stage, status="missing")
    return StageStatus(
        stage=stage,
        status="stale" if _is_stale(read, record) else "done",
        seconds=record.seconds,
        bytes=sum(record.sizes.values()),
        finished_at=record.finished_at.isoformat(),
        counts=record.counts,
        metrics=record.metrics,
    )


def inspect_run(run_path: str, storage_options: dict[str, Any] | None = None) -> RunStatus:
    """The status of every stage of the run at `run_path` (`<store root>/<run name>`)."""
    store, run = open_run(run_path, storage_options)
    layout = RunLayout(run)
    info = store.read_json(layout.run_info)
    if info is None:
        raise FileNotFoundError(f"no run at {run_path} (no run.json there)")
    configured = info["config"]["iterations"]

    @functools.cache
    def read(stage: StageName, iteration: int | None) -> StageRecord | None:  # each record once
        return read_record(store, layout.stage_folder(stage, iteration), stage)

    verdicts = [
        iteration_verdict(number, read("labels", number), read("labels", number - 1) if number > 1 else None)
        for number in range(1, len(configured) + 1)
    ]
    return RunStatus(
        run=run,
        path=store.url(run),
        code_version=info.get("code_version"),
        intake=stage_status(store, layout, "intake", None, read),
        iterations=[
            {
                stage: StageStatus(stage=stage, status=NOT_CONFIGURED)
                if stage == "train" and section.get("train") is None
                else stage_status(store, layout, stage, number, read)
                for stage in ITERATION_STAGES
            }
            for number, section in enumerate(configured, start=1)
        ],
        verdicts=[None if verdict is None else {**verdict.as_json(), "summary": verdict.sentence()} for verdict in verdicts],
    )


def _key_metric(status: StageStatus) -> str:
    counts, metrics = status.counts, status.metrics
    if status.status == "partial":
        return f"{status.parts_done} part(s) finished"
    if status.stage == "intake" and counts:
        return f"{counts['utterances']} utts, {counts['hours']:.2f} h, {counts['rejected']} rej."
    if status.stage == "features" and counts:
        kept = f" of {counts['corpus_frames']}" if "corpus_frames" in counts else ""
        dtype = "" if metrics.get("dtype", "float32") == "float32" else f" {metrics['dtype']}"
        return f"{counts['frames']}{kept} x {counts['dim']}{dtype} @ {metrics.get('frame_rate', 0):g}/s"
    if status.stage == "kmeans" and "inertia_per_frame" in metrics:
        return f"k={counts['k']}, inertia/fr {metrics['inertia_per_frame']:.4g}"
    if status.stage == "labels" and counts:
        quality = metrics.get("quality")
        if quality:
            return f"PNMI {quality['pnmi']:.3f}, purity {quality['phone_purity']:.3f}"
        return f"{counts['frames']} labels, {metrics.get('used_clusters', 0)} used"
    if status.stage == "train" and "final_loss" in metrics:
        profile = metrics.get("layer_profile") or {}
        best = next((row for row in profile.get("layers", []) if row["layer"] == profile.get("best_layer")), None)
        return f"loss {metrics['final_loss']:.3f}" + ("" if best is None else f", best layer {best['layer']} PNMI {best['pnmi']:.3f}")
    return ""


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
    table = Table(title=f"run {status.run}  ({status.path})")
    for column in ("iteration", "stage", "status", "key metric", "duration", "size"):
        table.add_column(column)
    rows = [("-", status.intake)] + [
        (str(number), stage) for number, stages in enumerate(status.iterations, start=1) for stage in stages.values()
    ]
    colours = {"done": "green", "stale": "yellow", "partial": "yellow", "missing": "dim", NOT_CONFIGURED: "dim"}
    verdict_colours = {"better": "green", "worse": "bold red", "unchanged": "yellow", "unmeasured": "yellow"}
    for iteration, stage in rows:
        table.add_row(
            iteration,
            stage.stage,
            f"[{colours[stage.status]}]{stage.status}[/]",
            _key_metric(stage),
            "" if stage.seconds is None else f"{stage.seconds:.1f} s",
            _human_bytes(stage.bytes),
        )
        verdict = status.verdicts[int(iteration) - 1] if iteration != "-" and stage.stage == "labels" else None
        if verdict is not None and verdict["verdict"] in verdict_colours:
            colour = verdict_colours[verdict["verdict"]]
            table.add_row(iteration, "verdict", f"[{colour}]{verdict['verdict']}[/]", verdict["summary"].split(": ", 2)[-1], "", "")
    return table
