"""The pretraining flow: intake once, then each configured iteration's stages, on one Dask cluster.

Flows only orchestrate: every stage is a task in `tasks/` that reads its inputs from the artifact
store and commits its outputs there. Skipping finished work is decided by the store's stage
records, not by Prefect's state, so wiping Prefect's database costs no finished work.
"""

from __future__ import annotations

import socket

from distributed import default_client
from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from infra.cluster import dask_client
from infra.digest import digest_json
from infra.store import ArtifactStore, StageRecord, current_user, forget_stage, utc_now
from infra.version import code_version
from tasks.config import ITERATION_STAGES, STAGE_ORDER, PretrainConfig, StageName, load_config
from tasks.features import FeatureSource, MfccSource, features_task, hubert_layer_source
from tasks.intake import intake_task, load_manifest
from tasks.kmeans import kmeans_task
from tasks.labels import labels_task
from tasks.report import report_task
from tasks.train import train_task


class StopPoint(BaseModel):
    """Where a run stops: after `stage` of iteration `iteration` (None: the last iteration)."""

    stage: StageName = Field(default="train", description="Last stage to run.")
    iteration: int | None = Field(default=None, ge=1, description="Iteration of that stage; empty: the last.")

    @classmethod
    def parse(cls, text: str) -> StopPoint:
        """`STAGE` (the first iteration; `train` alone means every iteration) or `STAGE@ITER`."""
        stage, _, iteration = text.partition("@")
        if iteration:
            return cls(stage=stage, iteration=int(iteration))
        return cls(stage=stage, iteration=None if stage == "train" else 1)

    def includes(self, stage: StageName, iteration: int, iterations: int) -> bool:
        last = self.iteration or iterations
        if iteration != last:
            return iteration < last
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
            "user": current_user(),
            "host": socket.gethostname(),
        },
    )


def stages_from(start: StopPoint, iterations: int) -> list[tuple[str, str]]:
    """(scope, stage) of `start` and of every stage after it: what `--force` re-runs."""
    ordered = [("corpus", "intake")] + [
        (f"iter-{i}", stage) for i in range(1, iterations + 1) for stage in ITERATION_STAGES
    ]
    first = ("corpus", "intake") if start.stage == "intake" else (f"iter-{start.iteration or 1}", start.stage)
    return ordered[ordered.index(first) :]


def force_stages(store: ArtifactStore, config: PretrainConfig, start: StopPoint) -> list[str]:
    """Forget the records of `start` and everything after it; returns those that existed."""
    return [
        f"{stage}@{scope}"
        for scope, stage in stages_from(start, len(config.iterations))
        if forget_stage(store, config.run, scope, stage)
    ]


def check_stop_point(stop: StopPoint, config: PretrainConfig) -> None:
    if stop.iteration is not None and stop.iteration > len(config.iterations):
        raise ValueError(f"the config has {len(config.iterations)} iteration(s), asked to stop in iteration {stop.iteration}")


def feature_source_for(
    config: PretrainConfig, iteration: int, store: ArtifactStore, previous_train: StageRecord | None
) -> FeatureSource:
    """MFCC, or a layer of the previous iteration's trained model."""
    features = config.iterations[iteration - 1].features
    if features.kind == "mfcc":
        return MfccSource()
    if previous_train is None:
        raise ValueError(f"iteration {iteration} takes model features, but iteration {iteration - 1} has no trained model")
    return hubert_layer_source(store, config.run, iteration - 1, previous_train, features.layer)


@flow(name="iteration", validate_parameters=False)
def iteration_flow(
    config: PretrainConfig, iteration: int, stop: StopPoint, intake: StageRecord, previous_train: StageRecord | None
) -> StageRecord | None:
    """One HuBERT iteration: features -> k-means -> labels -> train; returns the train record.

    Runs inside `pretrain`, on its Dask client.
    """
    store = ArtifactStore(config.store, config.storage_options)
    trained = _iteration_stages(config, iteration, stop, intake, previous_train, store)
    report_task(store, config.run, iteration)
    return trained


def _iteration_stages(
    config: PretrainConfig,
    iteration: int,
    stop: StopPoint,
    intake: StageRecord,
    previous_train: StageRecord | None,
    store: ArtifactStore,
) -> StageRecord | None:
    client = default_client()
    iterations = len(config.iterations)
    utterances = load_manifest(store, config.run)
    source = feature_source_for(config, iteration, store, previous_train)
    features = features_task(config, iteration, store, client, intake, utterances, source)
    if not stop.includes("kmeans", iteration, iterations):
        return None
    kmeans = kmeans_task(config, iteration, store, client, features)
    if not stop.includes("labels", iteration, iterations):
        return None
    labels = labels_task(config, iteration, store, client, features, kmeans, utterances)
    if not stop.includes("train", iteration, iterations):
        return None
    return train_task(config, iteration, store, labels, client)


@flow(name="pretrain", validate_parameters=True)
def pretrain(config: PretrainConfig, stop: StopPoint | None = None, force: StopPoint | None = None) -> str:
    """Run (or resume) a pretraining run; returns the run's path in the artifact store.

    `stop` defaults to every stage of every iteration; `force` re-runs that stage and every one
    after it even where they are committed.
    """
    stop = stop or StopPoint()
    check_stop_point(stop, config)
    logger = get_run_logger()
    store = ArtifactStore(config.store, config.storage_options)
    if force is not None:
        logger.info("forcing %s", ", ".join(force_stages(store, config, force)) or "nothing (no stage committed yet)")
    write_run_info(store, config)
    with dask_client(**config.dask.model_dump()) as client:
        logger.info("Dask scheduler at %s", client.scheduler.address)
        intake = intake_task(config, store, client)
        trained = None
        for iteration in range(1, len(config.iterations) + 1):
            if stop.includes("features", iteration, len(config.iterations)):
                named = iteration_flow.with_options(flow_run_name=f"{config.run}-iter-{iteration}")
                trained = named(config, iteration, stop, intake, trained)
    return store.url(config.run)


@flow(name="pretrain-from-file")
def pretrain_from_file(config_path: str, until: str | None = None) -> str:
    """The deployment entrypoint: a YAML config on the worker's disk (validated as `run` does)."""
    config = load_config(config_path)
    return pretrain(config, StopPoint.parse(until) if until else None)
