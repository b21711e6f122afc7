"""`hubert-pipeline verify`: every committed stage of a run checked against the objects its record names.

Shallow (the default, seconds): each output's objects are there, none missing (named where the
record lists them or a Zarr group's metadata promises them), byte totals as recorded, nothing
added. `--deep` also recomputes each stage's output digest from what is stored, with the stage's
own digest code (its `StageSpec.verify_digest`), and the digest of every other file the record
gives one for (`StageSpec.recorded_files`: train's best weights and kept checkpoints), so an
object altered in place is found too. Temporary files that failed writes left in the run's folder
are reported as well.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from infra.commit import StageRecord, open_run, output_problems
from infra.digest import digest_bytes
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
        check.problems += recorded_file_problems(store, folder, stage, record)
    return check


def recorded_file_problems(store: ArtifactStore, folder: str, stage: StageName, record: StageRecord) -> list[str]:
    """Each file whose digest the record gives beside its output digest, recomputed."""
    recorded = STAGES[stage].recorded_files
    problems = []
    for name, digest in ({} if recorded is None else recorded(record)).items():
        relpath = posixpath.join(folder, name)
        if not store.exists(relpath):
            problems.append(f"{name}: missing")
        elif (found := digest_bytes(store.read_bytes(relpath))) != digest:
            problems.append(f"{name}: digest {found[:16]}..., the record says {digest[:16]}...: altered after the commit")
    return problems


def leftover_temporaries(run_path: str) -> StageCheck:
    """Temporary files of local writes in the run's folder: a failed write's (a full disk, a killed
    process) if no run is writing now."""
    store, run = open_run(run_path)
    found = store.temporaries(run)
    check = StageCheck("temporary files")
    if found:
        listed = ", ".join(sorted(found)[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        check.problems.append(
            f"{len(found)} left by failed writes ({sum(found.values())} bytes; or in flight, if a run is writing): {listed}"
        )
    return check


def verify_run(run_path: str, deep: bool = False, storage_options: dict[str, Any] | None = None) -> list[StageCheck]:
    """One check per committed stage of the run, in stage order; FileNotFoundError if there is no run."""
    store, run = open_run(run_path, storage_options)
    layout = RunLayout(run)
    if not store.list_names(run):
        raise FileNotFoundError(f"no run at {run_path}")
    checks = [
        check_stage(store, layout, stage, iteration, record, deep)
        for stage, iteration, record in RunRecords(store, layout).committed()
    ]
    leftovers = leftover_temporaries(run_path)
    return checks + ([leftovers] if leftovers.problems else [])
