"""The pretraining flow: intake once, then each configured iteration's stages, on one Dask cluster.

Flows only orchestrate: every stage is a task in `tasks/` that reads its inputs from the artifact
store and commits its outputs there. Skipping finished work is decided by the store's stage
records, not by Prefect's state, so wiping Prefect's database costs no finished work.
"""

from __future__ import annotations

import getpass
import socket

from distributed import default_client
from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from infra.cluster import dask_client
from infra.digest import digest_json
from infra.store import ArtifactStore, StageRecord, utc_now
from infra.version import code_version
from tasks.config import STAGE_ORDER, PretrainConfig, StageName, load_config
from tasks.features import feature_source, features_task
from tasks.intake import intake_task, load_manifest
from tasks.kmeans import kmeans_task
from tasks.labels import labels_task

IMPLEMENTED_STAGES: tuple[StageName, ...] = ("intake", "features", "kmeans", "labels")


class StopPoint(BaseModel):
    """Where a run stops: after `stage` of iteration `iteration` (intake has no iteration)."""

    stage: StageName = Field(default=IMPLEMENTED_STAGES[-1], description="Last stage to run.")
    iteration: int = Field(default=1, ge=1, description="Iteration of that stage.")

    @classmethod
    def parse(cls, text: str) -> StopPoint:
        """`STAGE` or `STAGE@ITER`, e.g. `features` or `labels@2`."""
        stage, _, iteration = text.partition("@")
        return cls(stage=stage, iteration=int(iteration) if iteration else 1)

    def includes(self, stage: StageName, iteration: int) -> bool:
        if iteration != self.iteration:
            return iteration < self.iteration
        return STAGE_ORDER.index(stage) <= STAGE_ORDER.index(self.stage)


def config_for_the_record(config: PretrainConfig) -> dict:
    """The config as given, with storage option values (possibly secrets) replaced by '***'."""
    dumped = config.model_dump(mode="json")
    dumped["storage_options"] = {key: "***" for key in config.storage_options}
    return dumped


def write_run_info(store: ArtifactStore, config: PretrainConfig) -> None:
    recorded = config_for_the_record(config)
    store.write_json(
        f"{config.run}/run.json",
        {
            "run": config.run,
            "config": recorded,
            "config_digest": digest_json(recorded),
            "code_version": code_version(),
            "started_at": utc_now().isoformat(),
            "user": getpass.getuser(),
            "host": socket.gethostname(),
        },
    )


def check_implemented(stop: StopPoint, config: PretrainConfig) -> None:
    if stop.stage not in IMPLEMENTED_STAGES:
        raise NotImplementedError(
            f"stage '{stop.stage}' is not built yet; this version runs: {', '.join(IMPLEMENTED_STAGES)}"
        )
    if stop.iteration > len(config.iterations):
        raise ValueError(f"the config has {len(config.iterations)} iteration(s), asked to stop in iteration {stop.iteration}")
    if stop.iteration > 1 and stop.stage != "intake":
        raise NotImplementedError("iterations after the first need a trained model: not built yet")


@flow(name="iteration", validate_parameters=False)
def iteration_flow(config: PretrainConfig, iteration: int, stop: StopPoint, intake: StageRecord) -> None:
    """One HuBERT iteration: features -> k-means -> labels (-> train, in a later version).

    Runs inside `pretrain`, on its Dask client.
    """
    client = default_client()
    store = ArtifactStore(config.store, config.storage_options)
    settings = config.iterations[iteration - 1]
    utterances = load_manifest(store, config.run)
    features = features_task(config, iteration, store, client, intake, utterances, feature_source(settings.features))
    if not stop.includes("kmeans", iteration):
        return
    kmeans = kmeans_task(config, iteration, store, client, features)
    if not stop.includes("labels", iteration):
        return
    labels_task(config, iteration, store, client, features, kmeans, utterances)


@flow(name="pretrain", validate_parameters=True)
def pretrain(config: PretrainConfig, stop: StopPoint = StopPoint()) -> str:
    """Run (or resume) a pretraining run; returns the run's path in the artifact store."""
    check_implemented(stop, config)
    logger = get_run_logger()
    store = ArtifactStore(config.store, config.storage_options)
    write_run_info(store, config)
    with dask_client(**config.dask.model_dump()) as client:
        logger.info("Dask scheduler at %s", client.scheduler.address)
        intake = intake_task(config, store, client)
        for iteration in range(1, len(config.iterations) + 1):
            if stop.includes("features", iteration):
                named = iteration_flow.with_options(flow_run_name=f"{config.run}-iter-{iteration}")
                named(config, iteration, stop, intake)
    return store.url(config.run)


@flow(name="pretrain-from-file")
def pretrain_from_file(config_path: str, until: str | None = None) -> str:
    """The deployment entrypoint: a YAML config on the worker's disk (validated as `run` does)."""
    config = load_config(config_path)
    return pretrain(config, StopPoint.parse(until) if until else StopPoint())
