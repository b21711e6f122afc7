"""The pretraining flow: intake once, then each configured iteration's stages, on one Dask cluster.

Flows only orchestrate: every stage is declared in `tasks/stages/` and runs as a Prefect task
(`tasks.stage.stage_task`) that reads its inputs from the artifact store and commits its outputs
there. Skipping finished work is decided by the store's stage records, not by Prefect's state,
so wiping Prefect's database costs no finished work.
"""

from __future__ import annotations

import socket

from distributed import Client, default_client
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from infra.cluster import dask_client
from infra.commit import forget_stage
from infra.digest import digest_json
from infra.lease import RunLease, check_lease
from infra.store import ArtifactStore, current_user, utc_now
from infra.version import code_version
from tasks.artifacts import load_manifest
from tasks.config import PretrainConfig, load_config
from tasks.layout import ITERATION_STAGES, STAGE_ORDER, RunLayout, StageName, scope_name, stage_iteration
from tasks.pipeline import STAGES, iteration_stages
from tasks.preflight import check_kmeans_frames
from tasks.report import build_report, read_records, summary_rows
from tasks.stage import StageContext, stage_task


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
        RunLayout(config.run).run_info,
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


def stages_from(start: StopPoint, iterations: int) -> list[tuple[StageName, int | None]]:
    """(stage, iteration) of `start` and of every stage after it: what `--force` re-runs."""
    ordered = [("intake", None)] + [(stage, i) for i in range(1, iterations + 1) for stage in ITERATION_STAGES]
    return ordered[ordered.index((start.stage, stage_iteration(start.stage, start.iteration or 1))) :]


def force_stages(store: ArtifactStore, config: PretrainConfig, start: StopPoint) -> list[str]:
    """Forget the records of `start` and everything after it; returns those that existed."""
    layout = RunLayout(config.run)
    return [
        f"{stage}@{scope_name(iteration)}"
        for stage, iteration in stages_from(start, len(config.iterations))
        if forget_stage(store, layout.stage_folder(stage, iteration), stage)
    ]


def check_stop_point(stop: StopPoint, config: PretrainConfig) -> None:
    if stop.iteration is not None and stop.iteration > len(config.iterations):
        raise ValueError(f"the config has {len(config.iterations)} iteration(s), asked to stop in iteration {stop.iteration}")
    if stop.iteration is not None and stop.stage not in iteration_stages(config, stop.iteration):
        raise ValueError(f"iteration {stop.iteration} does not train (its config has no train section)")


def artifact_key(run: str, iteration: int) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(character if character.isalnum() else "-" for character in run.lower())
    return f"{cleaned}-{scope_name(iteration)}"


@task(name="report", cache_policy=NONE)
def publish_report(store: ArtifactStore, layout: RunLayout, iteration: int) -> None:
    """Build the iteration's report and show it in Prefect's UI as a markdown and a table artifact."""
    records = read_records(store, layout, iteration)
    _, markdown = build_report(store, layout, iteration, records)
    key = artifact_key(layout.run, iteration)
    description = f"{layout.run} iteration {iteration}"
    create_markdown_artifact(key=f"{key}-report", markdown=markdown, description=description)
    create_table_artifact(key=f"{key}-stages", table=summary_rows(records), description=description)


@flow(name="iteration", validate_parameters=False)
def iteration_flow(config: PretrainConfig, iteration: int, stop: StopPoint) -> None:
    """One HuBERT iteration: features -> k-means -> labels -> train, then its report.

    Runs inside `pretrain`, on its Dask client.
    """
    context = StageContext(config, ArtifactStore(config.store, config.storage_options), default_client(), iteration)
    for stage in iteration_stages(config, iteration):
        if not stop.includes(stage, iteration, len(config.iterations)):
            break
        check_lease(context.store, context.layout.lease)
        stage_task(STAGES[stage])(context)
    publish_report(context.store, context.layout, iteration)


def run_intake(config: PretrainConfig, store: ArtifactStore, client: Client) -> None:
    """Intake, then the config checks that need the manifest (before any features are computed)."""
    stage_task(STAGES["intake"])(StageContext(config, store, client))
    check_kmeans_frames(config, load_manifest(store, RunLayout(config.run)))


@flow(name="pretrain", validate_parameters=True)
def pretrain(
    config: PretrainConfig, stop: StopPoint | None = None, force: StopPoint | None = None, wait_for_lease: bool = False
) -> str:
    """Run (or resume) a pretraining run; returns the run's path in the artifact store.

    `stop` defaults to every stage of every iteration; `force` re-runs that stage and every one
    after it even where they are committed. The run's lease (infra/lease.py) is taken before
    anything is written and given back at the end, failed or not: a run another live process
    holds raises LeaseHeld, or is waited for with `wait_for_lease`.
    """
    stop = stop or StopPoint()
    check_stop_point(stop, config)
    logger = get_run_logger()
    store = ArtifactStore(config.store, config.storage_options)
    layout = RunLayout(config.run)
    lease = RunLease(store, layout.lease, config.lease.ttl_seconds, flow_run_id=flow_run.id, wait=wait_for_lease)
    with lease:
        if force is not None:
            logger.info("forcing %s", ", ".join(force_stages(store, config, force)) or "nothing (no stage committed yet)")
        write_run_info(store, config)
        with dask_client(**config.dask.model_dump()) as client:
            logger.info("Dask scheduler at %s", client.scheduler.address)
            run_intake(config, store, client)
            for iteration in range(1, len(config.iterations) + 1):
                if stop.includes("features", iteration, len(config.iterations)):
                    check_lease(store, layout.lease)
                    named = iteration_flow.with_options(flow_run_name=f"{config.run}-{scope_name(iteration)}")
                    named(config, iteration, stop)
    return store.url(config.run)


@flow(name="pretrain-from-file")
def pretrain_from_file(config_path: str, until: str | None = None, wait_for_lease: bool = False) -> str:
    """The deployment entrypoint: a YAML config on the worker's disk (validated as `run` does)."""
    config = load_config(config_path)
    return pretrain(config, StopPoint.parse(until) if until else None, wait_for_lease=wait_for_lease)
