"""The pretraining flow: the plan's stages in order (intake once, then each iteration's), on one Dask cluster.

Flows only orchestrate: every stage is declared in `tasks/stages/`, and here it runs as a Prefect
task (`stage_task`) that reads its inputs from the artifact store and commits its outputs there.
Skipping finished work is decided by the store's stage records, not by Prefect's state, so wiping
Prefect's database costs no finished work.

Two entry points, one body (`run_pretraining`):
- `pretrain(config, until, force)`: the run form. Its parameters are the typed config, so Prefect's
  UI renders every setting with its description; a Python call and the CLI use it too.
- `pretrain_from_file(config_path, until, force)`: a YAML config on the worker's disk.

What a team sees in Prefect, whichever entry point ran:
- a flow run named after the run (`<run>`, its iterations `<run>-iter-N`), tagged with it;
- the pipeline's own log lines (whether each stage ran or was skipped, progress, the lease) in
  the run's logs, and the same lines in the store (`<run>/logs/`, tasks/run/run_log.py);
- per iteration a report artifact that stands alone (plots inline, verdict as its description,
  settings, validation curve), a table of its stages, and the intake's rejections as a table;
- never a credential: they are kept apart from the config (tasks/run/config.py), come from a
  Prefect Secret block or the environment, and are masked in every log line.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from botocore.exceptions import ConnectionError as BotocoreConnectionError
from distributed import default_client
from prefect import Task, flow, get_client, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.runtime import deployment, flow_run

from infra.cluster import dask_client
from infra.lease import RunLease, check_lease
from infra.store import ArtifactStore, utc_now
from tasks.audit.report import build_report, intake_rows, standalone_markdown, summary_rows
from tasks.run.config import ConfigError, PretrainConfig, load_config, split_credentials
from tasks.run.layout import RunLayout, StageName, scope_name
from tasks.run.plan import PlannedStage, PlanStop, StopPoint, plan, stages_from
from tasks.run.records import RunRecords
from tasks.run.run_info import forget_stages, write_run_info
from tasks.run.run_log import RedactSecrets, StoreLogHandler, secret_values
from tasks.run.stage import StageContext, StageSpec, run_stage
from tasks.stages.catalog import STAGES

PIPELINE_LOGGERS = ("tasks", "infra", "flows", "model")
"""The packages whose log lines belong in a run's logs (Prefect's and the store's)."""
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""Prefect's own lines about this run's states, kept in the store's log too."""


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


# -- logs ----------------------------------------------------------------------------------------


class RunLogToPrefect(APILogHandler):
    """Prefect's API log handler, bound to one flow run: a line logged where Prefect has no run
    context (the lease's renewal thread, a data-loader thread) still lands in this run's logs
    instead of raising a warning and being dropped."""

    def __init__(self, flow_run_id: str) -> None:
        super().__init__(level=logging.INFO)
        self.flow_run_id = flow_run_id

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) is None and FlowRunContext.get() is None and TaskRunContext.get() is None:
            record.flow_run_id = self.flow_run_id
        super().emit(record)


@contextmanager
def pipeline_logs(store: ArtifactStore, layout: RunLayout, secrets: list[str]) -> Iterator[StoreLogHandler]:
    """Route the pipeline's loggers (`PIPELINE_LOGGERS`) at INFO into this flow run's logs in
    Prefect and into the run's log file in the store, every line with credentials masked.

    Configured here, in the flow, so that every entry point gets it: the CLI, a Python call, a
    worker running a deployment (which never sees the CLI's settings). A logger that Prefect's
    own `PREFECT_LOGGING_EXTRA_LOGGERS` already routes is not routed twice. The store's file is
    only written once `start_writing` is called (when the lease is held)."""
    invocation = flow_run.id or f"pid{os.getpid()}"
    to_store = StoreLogHandler(store, layout.log(utc_now(), invocation))
    to_prefect = RunLogToPrefect(invocation)
    redact = RedactSecrets(secrets)
    to_store.addFilter(redact)
    to_prefect.addFilter(redact)
    attached: list[tuple[logging.Logger, logging.Handler]] = []
    levels: dict[logging.Logger, int] = {}
    for name in PIPELINE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            levels[logger] = logger.level
            logger.setLevel(logging.INFO)
        attached.append((logger, to_store))
        if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
            attached.append((logger, to_prefect))
    attached += [(logging.getLogger(name), to_store) for name in PREFECT_RUN_LOGGERS]
    for logger, handler in attached:
        logger.addHandler(handler)
    try:
        yield to_store
    except BaseException as error:
        logging.getLogger(__name__).error("run stopped: %s: %s", type(error).__name__, error)
        raise
    finally:
        for logger, handler in attached:
            logger.removeHandler(handler)
        for logger, level in levels.items():
            logger.setLevel(level)
        to_store.close()
        to_prefect.flush()  # sent before the flow run ends: a UI or API reader sees every line at once


# -- Prefect's view of the run ---------------------------------------------------------------------


def name_and_tag_this_flow_run(run: str) -> None:
    """Name this flow run after the run (not Prefect's random `messy-caracara`) and tag it with
    it, so the UI lists a run's cycles together; subflows and tasks get the tag from `tags()`."""
    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=run, tags=sorted({*flow_run.tags, run}))


def with_stored_credentials(config: PretrainConfig) -> PretrainConfig:
    """The config with the storage credentials of its Secret block (`storage_credentials_block`),
    read here, on the machine that runs the flow; unchanged without one (the environment's then)."""
    name = config.storage_credentials_block
    if name is None:
        return config
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as error:
        raise ConfigError(f"storage_credentials_block: no Prefect Secret block named {name!r} ({error})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"storage_credentials_block: the Secret {name!r} must hold a JSON object of storage options "
            '(e.g. {"key": ..., "secret": ...})'
        )
    return config.with_credentials(value)


def artifact_key(run: str, *parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    cleaned = "".join(character if character.isalnum() else "-" for character in run.lower())
    return "-".join([cleaned, *parts])


@task(name="intake-report", cache_policy=NONE)
def publish_intake(store: ArtifactStore, layout: RunLayout) -> None:
    """The files intake rejected, with their reasons, as a table artifact."""
    rows, description = intake_rows(RunRecords(store, layout))
    create_table_artifact(key=artifact_key(layout.run, "intake"), table=rows, description=description)


@task(name="report", cache_policy=NONE)
def publish_report(store: ArtifactStore, layout: RunLayout, iteration: int, weights_for_next: str | None) -> None:
    """Build the iteration's report (report.md, plots, report.json in the store) and show it in
    Prefect's UI: a markdown artifact that stands alone (its plots inline, the verdict as its
    description) and a table of the iteration's stages."""
    records = RunRecords(store, layout)
    built = build_report(records, iteration, weights_for_next)
    key = artifact_key(layout.run, scope_name(iteration))
    description = f"{layout.run} iteration {iteration}: {built.verdict_line}"
    create_markdown_artifact(key=f"{key}-report", markdown=standalone_markdown(built), description=description)
    create_table_artifact(key=f"{key}-stages", table=summary_rows(records.iteration(iteration)), description=description)


# -- the flows ---------------------------------------------------------------------------------------


@flow(name="iteration", validate_parameters=False)
def iteration_flow(config: PretrainConfig, iteration: int, stages: list[StageName]) -> None:
    """One HuBERT iteration's planned stages (features -> k-means -> labels -> train -> profile),
    then its report. Runs inside `pretrain`, on its Dask client."""
    context = StageContext(config, ArtifactStore(config.store, config.fsspec_options), default_client(), iteration)
    for stage in stages:
        check_lease(context.store, context.layout.lease)
        stage_task(STAGES[stage])(context)
    train = config.iterations[iteration - 1].train
    publish_report(context.store, context.layout, iteration, None if train is None else config.weights_for_next(iteration))


def by_scope(steps: list[PlannedStage]) -> list[tuple[int | None, list[StageName]]]:
    """The plan cut where its iteration changes: (None, [intake]), (1, [features, ...]), ..."""
    return [(iteration, [stage for stage, _ in group]) for iteration, group in itertools.groupby(steps, key=lambda step: step[1])]


def run_pretraining(config: PretrainConfig, until: str | None, force: str | None, wait_for_lease: bool) -> str:
    """The body both flows run: name the flow run, route the logs, take the run's lease, run the
    plan up to `until` (forcing `force` and what follows; both `STAGE@ITER`), publish the
    reports; returns the run's path in the artifact store."""
    config = with_stored_credentials(config)
    steps = plan(config, StopPoint.parse(until) if until else None)
    forced = stages_from(config, StopPoint.parse(force)) if force else None
    name_and_tag_this_flow_run(config.run)
    logger = get_run_logger()
    store = ArtifactStore(config.store, config.fsspec_options)
    layout = RunLayout(config.run)
    lease = RunLease(store, layout.lease, config.lease.ttl_seconds, flow_run_id=flow_run.id, wait=wait_for_lease)
    with pipeline_logs(store, layout, secret_values(config.fsspec_options)) as run_log, tags(config.run), lease:
        run_log.start_writing()
        logger.info("this invocation's log: %s", run_log.url)
        if config.storage_credentials_block is not None:
            logger.info(
                "storage credentials from the Prefect Secret block %r: %s",
                config.storage_credentials_block, ", ".join(sorted(split_credentials(config.fsspec_options)[1])),
            )
        if forced is not None:
            forgotten = forget_stages(store, layout, forced)
            logger.info("forcing %s", ", ".join(forgotten) or "nothing (no stage committed yet)")
        write_run_info(store, config)
        with dask_client(**config.dask.model_dump()) as client:
            logger.info("Dask scheduler at %s", client.scheduler.address)
            for iteration, stages in by_scope(steps):
                check_lease(store, layout.lease)
                if iteration is None:
                    for stage in stages:
                        stage_task(STAGES[stage])(StageContext(config, store, client))
                    publish_intake(store, layout)
                else:
                    named = iteration_flow.with_options(flow_run_name=f"{config.run}-{scope_name(iteration)}")
                    named(config, iteration, stages)
    return store.url(config.run)


@flow(name="pretrain", validate_parameters=True)
def pretrain(
    config: PretrainConfig,
    until: PlanStop | None = None,
    force: PlanStop | None = None,
    wait_for_lease: bool = False,
) -> str:
    """Run (or resume) a pretraining run; returns the run's path in the artifact store.

    Every stage is skipped where the store holds its record. Storage credentials never come as
    parameters (Prefect keeps parameters in its database): they come from the Secret block named
    by `config.storage_credentials_block`, or from the worker's environment.

    Args:
        config: The run: where its store and corpus are, and each iteration's settings.
        until: Stop after this stage of the plan (empty: run every stage).
        force: Run this stage and every stage after it again, even where committed.
        wait_for_lease: If another process is writing this run, wait for it instead of failing.
    """
    if deployment.id is not None and config.has_credentials:
        raise ConfigError(
            "storage_options of this deployment run hold credentials, which Prefect stores with the run's parameters: "
            "put them in a Prefect Secret block named by storage_credentials_block, or in the worker's environment"
        )
    return run_pretraining(config, until, force, wait_for_lease)


@flow(name="pretrain-from-file", validate_parameters=True)
def pretrain_from_file(
    config_path: str,
    until: PlanStop | None = None,
    force: PlanStop | None = None,
    wait_for_lease: bool = False,
) -> str:
    """Run (or resume) the pretraining run of a YAML config on the worker's disk, validated as
    `hubert-pipeline run` validates it.

    Args:
        config_path: A YAML run config on the worker's disk (relative paths in it are relative to the file).
        until: Stop after this stage of the plan (empty: run every stage).
        force: Run this stage and every stage after it again, even where committed.
        wait_for_lease: If another process is writing this run, wait for it instead of failing.
    """
    return run_pretraining(load_config(config_path), until, force, wait_for_lease)
