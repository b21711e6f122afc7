"""Every stage by name, and running a plan of them without Prefect (tests, benchmarks, notebooks).

The Prefect flow (flows/pretrain.py) walks the same plan (tasks/run/plan.py) with the same
declarations, so what runs here is what the CLI runs.
"""

from __future__ import annotations

from distributed import Client

from infra.commit import StageRecord
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import STAGE_ORDER, StageName
from tasks.run.plan import PlannedStage, StopPoint, plan
from tasks.run.stage import StageContext, StageSpec, run_stage
from tasks.stages.features import FEATURES
from tasks.stages.intake import INTAKE
from tasks.stages.kmeans import KMEANS
from tasks.stages.labels.stage import LABELS
from tasks.stages.probe import PROBE_STAGE
from tasks.stages.profile import PROFILE
from tasks.stages.reference.stage import REFERENCE_STAGE
from tasks.stages.train.stage import TRAIN

STAGES: dict[StageName, StageSpec] = {spec.name: spec for spec in (INTAKE, FEATURES, KMEANS, LABELS, REFERENCE_STAGE, TRAIN, PROFILE, PROBE_STAGE)}
assert tuple(STAGES) == STAGE_ORDER, "every stage of the layout has exactly one declaration"


def run_plan(
    config: PretrainConfig, store: ArtifactStore, client: Client | None, stop: StopPoint | str | None = None
) -> dict[PlannedStage, StageRecord]:
    """Every stage of the plan up to `stop` (a StopPoint, or as `--until` takes it: "labels@2"),
    here, in order; the records by (stage, iteration)."""
    if isinstance(stop, str):
        stop = StopPoint.parse(stop)
    return {
        (stage, iteration): run_stage(STAGES[stage], StageContext(config, store, client, iteration))
        for stage, iteration in plan(config, stop)
    }
