"""`hubert-pipeline diff`: which stages of two runs (or two iterations) were made from different inputs."""

from __future__ import annotations

from dataclasses import dataclass

from infra.commit import StageRecord, open_run, read_record
from tasks.layout import STAGE_ORDER, RunLayout, scope_name


@dataclass(frozen=True)
class StageDiff:
    stage: str
    verdict: str  # same | differs | only in A | only in B
    detail: str


def read_scope(run_path: str, iteration: int | None) -> dict[str, StageRecord]:
    """The records of the corpus scope (None) or of an iteration, by stage."""
    store, run = open_run(run_path)
    folder = RunLayout(run).scope(iteration)
    records = {stage: read_record(store, folder, stage) for stage in STAGE_ORDER}
    return {stage: record for stage, record in records.items() if record is not None}


def scopes(run_path: str) -> list[int | None]:
    """The corpus scope (None) and the iterations the run's folder holds."""
    store, run = open_run(run_path)
    return [None, *RunLayout(run).iterations_in(store.list_names(run))]


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


def diff_runs(run_a: str, run_b: str) -> dict[str, list[StageDiff]]:
    """Per scope (corpus, iter-1, ...), the stage-by-stage comparison of two runs."""
    return {
        scope_name(scope): diff_scopes(read_scope(run_a, scope), read_scope(run_b, scope))
        for scope in dict.fromkeys(scopes(run_a) + scopes(run_b))
    }


def diff_iterations(run_path: str, first: int, second: int) -> dict[str, list[StageDiff]]:
    return {
        f"{scope_name(first)} vs {scope_name(second)}": diff_scopes(read_scope(run_path, first), read_scope(run_path, second))
    }
