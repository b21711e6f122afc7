"""`hubert-pipeline diff`: which stages of two runs (or two iterations) were made from different inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.commit import StageRecord, open_run
from tasks.run.layout import STAGE_ORDER, RunLayout, scope_name
from tasks.run.records import RunRecords


@dataclass(frozen=True)
class StageDiff:
    stage: str
    verdict: str  # same | differs | only in A | only in B
    detail: str


def open_records(run_path: str, storage_options: dict[str, Any] | None = None) -> RunRecords:
    """The records of the run at `run_path`; FileNotFoundError where there is no run (no run.json)."""
    store, run = open_run(run_path, storage_options)
    layout = RunLayout(run)
    if not store.exists(layout.run_info):
        raise FileNotFoundError(f"no run at {run_path} (no run.json there)")
    return RunRecords(store, layout)


def scope_records(records: RunRecords, iteration: int | None) -> dict[str, StageRecord]:
    """The records of the corpus scope (None) or of an iteration, by stage."""
    if iteration is None:
        return {"intake": record} if (record := records.get("intake", None)) is not None else {}
    return records.iteration(iteration)


def compare(a: StageRecord, b: StageRecord) -> StageDiff:
    if a.key == b.key:
        same_output = "same output" if a.output_digest == b.output_digest else "OUTPUT DIFFERS (nondeterminism?)"
        return StageDiff(a.stage, "same", f"same config and inputs; {same_output}")
    reasons = []
    if a.config_digest != b.config_digest:
        changed = sorted(key for key in a.config.keys() | b.config.keys() if a.config.get(key) != b.config.get(key))
        reasons.append("config: " + ", ".join(f"{key} {a.config.get(key)!r} -> {b.config.get(key)!r}" for key in changed))
    changed_inputs = sorted(name for name in a.inputs.keys() | b.inputs.keys() if a.inputs.get(name) != b.inputs.get(name))
    if changed_inputs:
        reasons.append("inputs: " + ", ".join(changed_inputs))
    if not reasons:
        reasons.append("stage version")
    return StageDiff(a.stage, "differs", "; ".join(reasons))


def diff_scopes(a: dict[str, StageRecord], b: dict[str, StageRecord]) -> list[StageDiff]:
    rows = []
    for stage in STAGE_ORDER:
        if stage in a and stage in b:
            rows.append(compare(a[stage], b[stage]))
        elif stage in a or stage in b:
            rows.append(StageDiff(stage, "only in A" if stage in a else "only in B", ""))
    return rows


def diff_runs(run_a: str, run_b: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[StageDiff]]:
    """Per scope (corpus, iter-1, ...), the stage-by-stage comparison of two runs."""
    a, b = open_records(run_a, storage_options), open_records(run_b, storage_options)
    scopes = dict.fromkeys([None, *a.iterations_in_store(), *b.iterations_in_store()])
    return {scope_name(scope): diff_scopes(scope_records(a, scope), scope_records(b, scope)) for scope in scopes}


def diff_iterations(
    run_path: str, first: int, second: int, storage_options: dict[str, Any] | None = None
) -> dict[str, list[StageDiff]]:
    """Two iterations of one run, stage by stage; ValueError naming the run's iterations where one is not there."""
    records = open_records(run_path, storage_options)
    held = records.iterations_in_store()
    if missing := [number for number in (first, second) if number not in held]:
        raise ValueError(f"{run_path} has no iteration {missing[0]} (it holds iterations {held or 'none'}, counted from 1)")
    return {
        f"{scope_name(first)} vs {scope_name(second)}": diff_scopes(scope_records(records, first), scope_records(records, second))
    }
