"""The pretraining flow: the plan's stages in order (intake once, then each iteration's), on one Dask cluster.

Flows only orchestrate: every stage is declared in `tasks/stages/`, and here it runs as a Prefect
task (`stage_task`) that reads its inputs from the artifact store and commits its outputs there.
Skipping finished work is decided by the store's stage records, not by Prefect's state, so wiping
Prefect's database costs no finished work.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from botocore.exceptions import ConnectionError as BotocoreConnectionError
from distributed import default_client
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from infra.cluster import dask_client
from infra.lease import RunLease, check_lease
from infra.store import ArtifactStore
from tasks.audit.report import build_report, summary_rows
from tasks.run.config import PretrainConfig, load_config
from tasks.run.layout import RunLayout, StageName, scope_name
from tasks.run.plan import PlannedStage, StopPoint, plan, stages_from
from tasks.run.records import RunRecords
from tasks.run.run_info import forget_stages, write_run_info
from tasks.run.stage import StageContext, StageSpec, run_stage
from tasks.stages.catalog import STAGES


def is_transient(error: BaseException) -> bool:
    """Storage and network errors may pass; errors in the data or the config will not.

    An error that knows says so itself (`retryable`); a missing file or a refused permission is
    not retried; other OS and connection errors are."""
    if (said := getattr(error, "retryable", None)) is not None:
        return bool(said)
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError, BotocoreConnectionError))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False


@functools.cache
def stage_task(spec: StageSpec) -> Task:
    """`run_stage` of this stage as a Prefect task: retried on transient errors only, never cached
    by Prefect (the store's records decide what is done)."""
    return task(
        functools.partial(run_stage, spec),
        name=spec.name,
        retries=spec.retries,
        retry_delay_seconds=10,
        retry_condition_fn=retry_transient,
        cache_policy=NONE,
    )


def artifact_key(run: str, iteration: int) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(character if character.isalnum() else "-" for character in run.lower())
    return f"{cleaned}-{scope_name(iteration)}"


@task(name="report", cache_policy=NONE)
def publish_report(store: ArtifactStore, layout: RunLayout, iteration: int) -> None:
    """Build the iteration's report and show it in Prefect's UI as a markdown and a table artifact."""
    records = RunRecords(store, layout)
    _, markdown = build_report(records, iteration)
    key = artifact_key(layout.run, iteration)
    description = f"{layout.run} iteration {iteration}"
    create_markdown_artifact(key=f"{key}-report", markdown=markdown, description=description)
    create_table_artifact(key=f"{key}-stages", table=summary_rows(records.iteration(iteration)), description=description)


@flow(name="iteration", validate_parameters=False)
def iteration_flow(config: PretrainConfig, iteration: int, stages: list[StageName]) -> None:
    """One HuBERT iteration's planned stages (features -> k-means -> labels -> train -> profile),
    then its report. Runs inside `pretrain`, on its Dask client."""
    context = StageContext(config, ArtifactStore(config.store, config.fsspec_options), default_client(), iteration)
    for stage in stages:
        check_lease(context.store, context.layout.lease)
        stage_task(STAGES[stage])(context)
    publish_report(context.store, context.layout, iteration)


def by_scope(steps: list[PlannedStage]) -> list[tuple[int | None, list[StageName]]]:
    """The plan cut where its iteration changes: (None, [intake]), (1, [features, ...]), ..."""
    return [(iteration, [stage for stage, _ in group]) for iteration, group in itertools.groupby(steps, key=lambda step: step[1])]


@flow(name="pretrain", validate_parameters=True)
def pretrain(
    config: PretrainConfig, stop: StopPoint | None = None, force: StopPoint | None = None, wait_for_lease: bool = False
) -> str:
    """Run (or resume) a pretraining run; returns the run's path in the artifact store.

    `stop` defaults to every stage of the plan; `force` re-runs that stage and every one after it
    even where they are committed. The run's lease (infra/lease.py) is taken before anything is
    written and given back at the end, failed or not: a run another live process holds raises
    LeaseHeld, or is waited for with `wait_for_lease`.
    """
    steps = plan(config, stop)
    logger = get_run_logger()
    store = ArtifactStore(config.store, config.fsspec_options)
    layout = RunLayout(config.run)
    lease = RunLease(store, layout.lease, config.lease.ttl_seconds, flow_run_id=flow_run.id, wait=wait_for_lease)
    with lease:
        if force is not None:
            forgotten = forget_stages(store, layout, stages_from(config, force))
            logger.info("forcing %s", ", ".join(forgotten) or "nothing (no stage committed yet)")
        write_run_info(store, config)
        with dask_client(**config.dask.model_dump()) as client:
            logger.info("Dask scheduler at %s", client.scheduler.address)
            for iteration, stages in by_scope(steps):
                check_lease(store, layout.lease)
                if iteration is None:
                    for stage in stages:
                        stage_task(STAGES[stage])(StageContext(config, store, client))
                else:
                    named = iteration_flow.with_options(flow_run_name=f"{config.run}-{scope_name(iteration)}")
                    named(config, iteration, stages)
    return store.url(config.run)


@flow(name="pretrain-from-file")
def pretrain_from_file(config_path: str, until: str | None = None, wait_for_lease: bool = False) -> str:
    """The deployment entrypoint: a YAML config on the worker's disk (validated as `run` does)."""
    config = load_config(config_path)
    return pretrain(config, StopPoint.parse(until) if until else None, wait_for_lease=wait_for_lease)
