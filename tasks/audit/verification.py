"""`hubert-pipeline verify`: every committed stage of a run checked against the objects its record names.

Shallow (the default, seconds): each output's objects are there, none missing (named where the
record lists them or a Zarr group's metadata promises them), byte totals as recorded, nothing
added. `--deep` also recomputes each stage's output digest from what is stored, with the stage's
own digest code (its `StageSpec.verify_digest`), so an object altered in place is found too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.commit import StageRecord, open_run, output_problems
from infra.store import ArtifactStore
from tasks.run.layout import RunLayout, StageName
from tasks.run.records import RunRecords
from tasks.run.stage import CommittedStage, stage_label
from tasks.stages.catalog import STAGES


@dataclass
class StageCheck:
    stage: str
    problems: list[str] = field(default_factory=list)
    digest_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check_stage(
    store: ArtifactStore, layout: RunLayout, stage: StageName, iteration: int | None, record: StageRecord, deep: bool
) -> StageCheck:
    folder = layout.stage_folder(stage, iteration)
    check = StageCheck(stage_label(stage, iteration), output_problems(store, folder, record, strict=True))
    if deep and check.ok:
        try:
            recomputed = STAGES[stage].verify_digest(CommittedStage(store, folder, record))
        except Exception as error:  # noqa: BLE001 - an unreadable output is a finding, not a crash
            check.problems.append(f"outputs could not be read back: {type(error).__name__}: {error}")
        else:
            check.digest_checked = True
            if recomputed != record.output_digest:
                check.problems.append(
                    f"output digest {recomputed[:16]}... recomputed from the stored outputs, the record says "
                    f"{record.output_digest[:16]}...: an output was altered after the commit"
                )
    return check


def verify_run(run_path: str, deep: bool = False, storage_options: dict[str, Any] | None = None) -> list[StageCheck]:
    """One check per committed stage of the run, in stage order; FileNotFoundError if there is no run."""
    store, run = open_run(run_path, storage_options)
    layout = RunLayout(run)
    if not store.list_names(run):
        raise FileNotFoundError(f"no run at {run_path}")
    return [
        check_stage(store, layout, stage, iteration, record, deep)
        for stage, iteration, record in RunRecords(store, layout).committed()
    ]
