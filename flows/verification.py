"""`hubert-pipeline verify`: every committed stage of a run checked against the objects its record names.

Shallow (the default, seconds): each output's objects are there, none missing (named where the
record lists them or a Zarr group's metadata promises them), byte totals as recorded, nothing
added. `--deep` also recomputes each stage's output digest from what is stored, with the stage's
own digest code (its `StageSpec.verify_digest`), so an object altered in place is found too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.commit import StageRecord, open_run, output_problems, read_record
from infra.store import ArtifactStore
from tasks.layout import ITERATION_STAGES, RunLayout, StageName
from tasks.pipeline import STAGES
from tasks.stage import CommittedStage, stage_label


@dataclass
class StageCheck:
    stage: str
    problems: list[str] = field(default_factory=list)
    digest_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _committed_stages(store: ArtifactStore, layout: RunLayout) -> list[tuple[StageName, int | None, StageRecord]]:
    """(stage, iteration, record) of every stage with a record, in run order."""
    iterations = layout.iterations_in(store.list_names(layout.run))
    candidates = [("intake", None)] + [(stage, number) for number in iterations for stage in ITERATION_STAGES]
    found = [(stage, number, read_record(store, layout.stage_folder(stage, number), stage)) for stage, number in candidates]
    return [(stage, number, record) for stage, number, record in found if record is not None]


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


def verify_run(run_path: str, deep: bool = False) -> list[StageCheck]:
    """One check per committed stage of the run, in stage order; FileNotFoundError if there is no run."""
    store, run = open_run(run_path)
    layout = RunLayout(run)
    if not store.list_names(run):
        raise FileNotFoundError(f"no run at {run_path}")
    return [
        check_stage(store, layout, stage, iteration, record, deep)
        for stage, iteration, record in _committed_stages(store, layout)
    ]
