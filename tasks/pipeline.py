"""The stages in the order a run goes through them (the layout's STAGE_ORDER), and running them without Prefect."""

from __future__ import annotations

from distributed import Client

from infra.commit import StageRecord
from infra.store import ArtifactStore
from tasks.artifacts import load_manifest
from tasks.config import PretrainConfig
from tasks.layout import ITERATION_STAGES, STAGE_ORDER, RunLayout, StageName, stage_iteration
from tasks.preflight import check_kmeans_frames
from tasks.stage import StageContext, StageSpec, run_stage
from tasks.stages.features import FEATURES
from tasks.stages.intake import INTAKE
from tasks.stages.kmeans import KMEANS
from tasks.stages.labels import LABELS
from tasks.stages.train import TRAIN

STAGES: dict[StageName, StageSpec] = {spec.name: spec for spec in (INTAKE, FEATURES, KMEANS, LABELS, TRAIN)}
assert tuple(STAGES) == STAGE_ORDER, "every stage of the layout has exactly one declaration"


def iteration_stages(config: PretrainConfig, iteration: int) -> tuple[StageName, ...]:
    """The stages an iteration runs, in order: all of them, less train where the config leaves it out
    (the last iteration may, to end a run with its previous model's units)."""
    configured = config.iterations[iteration - 1].train is not None
    return tuple(stage for stage in ITERATION_STAGES if configured or stage != "train")


def run_through(
    config: PretrainConfig, store: ArtifactStore, client: Client, last: StageName, iteration: int = 1
) -> dict[tuple[StageName, int | None], StageRecord]:
    """Every stage up to `last` of `iteration` (earlier iterations whole), in this process without
    Prefect (benchmarks, tests, notebooks); returns the records by (stage, iteration)."""
    records: dict[tuple[StageName, int | None], StageRecord] = {}
    for number in range(1, iteration + 1):
        for stage in ("intake",) * (number == 1) + iteration_stages(config, number):
            at = stage_iteration(stage, number)
            records[(stage, at)] = run_stage(STAGES[stage], StageContext(config, store, client, at))
            if stage == "intake":
                check_kmeans_frames(config, load_manifest(store, RunLayout(config.run)))
            if number == iteration and stage == last:
                return records
    return records
