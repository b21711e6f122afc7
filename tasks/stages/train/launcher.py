"""Launching the train stage's processes with `torchrun`: on this machine, or on several through Dask.

One machine (`train.nnodes: 1`, `nproc > 1`):

    python -m torch.distributed.run --standalone --nproc-per-node=NPROC -m tasks.stages.train.worker ...

Several machines (`nnodes > 1`): the stage picks `nnodes` workers of the external Dask cluster
that declare the `train_node` resource, one per training machine, and runs on each of them, as a
Dask task pinned to that worker,

    python -m torch.distributed.run --nnodes=NNODES --nproc-per-node=NPROC --rdzv-backend=c10d \\
        --rdzv-endpoint=FIRST_WORKER_HOST:RDZV_PORT --rdzv-id=STAGE_ATTEMPT -m tasks.stages.train.worker ...

The machines agree on ranks through the rendezvous and read labels, audio and checkpoints from
the artifact store (which must therefore be one they all reach: S3, or a shared file system).
The run config and its storage options travel in the child's environment, never in a file or on
a command line: they may hold storage credentials (the config's JSON never holds them). torchrun runs under `guarded_torchrun`, so that it and its ranks die
with the process that started them (SIGKILL included), and the ranks get the run's lease fence
(infra/lease.py), so that a training whose run lost its lease, or stopped renewing it, writes
nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

from distributed import Client

from infra.lease import held_fence
from infra.process import PARENT_PID_ENVIRONMENT
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.stages.train.worker import CONFIG_ENVIRONMENT, STORAGE_OPTIONS_ENVIRONMENT

log = logging.getLogger(__name__)

TRAIN_NODE_RESOURCE = "train_node"
"""The Dask worker resource that marks a training machine (one such worker per machine)."""


class TrainingFailed(RuntimeError):
    """A torchrun launch exited non-zero; the checkpoints written so far are kept for resume."""


def launch_torchrun(config: PretrainConfig, iteration: int, launch_arguments: list[str], fence: dict[str, str] | None = None) -> int:
    """Run torchrun over `tasks.stages.train.worker` here and return its exit status.

    `fence` is the environment that hands the ranks the run's lease fence (`LeaseFence.environment`)."""
    command = [
        sys.executable, "-m", "tasks.stages.train.guarded_torchrun", *launch_arguments,
        "-m", "tasks.stages.train.worker", "--iteration", str(iteration),
    ]
    log.info("train@%d: %s", iteration, " ".join(command))
    environment = {
        **os.environ, **(fence or {}), PARENT_PID_ENVIRONMENT: str(os.getpid()),
        CONFIG_ENVIRONMENT: config.model_dump_json(), STORAGE_OPTIONS_ENVIRONMENT: json.dumps(config.fsspec_options),
    }
    return subprocess.run(command, env=environment).returncode


def fence_environment(config: PretrainConfig, iteration: int) -> dict[str, str]:
    """The run's lease fence for the ranks, where this process holds the lease (none in tests without one)."""
    store = ArtifactStore(config.store, config.fsspec_options)
    fence = held_fence(store, RunLayout(config.run).scope(iteration))
    return {} if fence is None else fence.environment()


def run_standalone(config: PretrainConfig, iteration: int) -> None:
    """`nproc` processes on this machine."""
    nproc = config.iterations[iteration - 1].train.launch.nproc
    status = launch_torchrun(
        config, iteration, ["--standalone", f"--nproc-per-node={nproc}"], fence_environment(config, iteration)
    )
    if status != 0:
        raise TrainingFailed(f"train@{iteration}: torchrun exited with {status}; checkpoints so far are kept for resume")


def training_workers(client: Client, nnodes: int) -> list[str]:
    """The addresses of `nnodes` workers with the train_node resource, on distinct hosts where possible."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    candidates = sorted(
        address for address, info in workers.items() if info.get("resources", {}).get(TRAIN_NODE_RESOURCE, 0) >= 1
    )
    if len(candidates) < nnodes:
        raise TrainingFailed(
            f"train.nnodes is {nnodes} but the Dask cluster has {len(candidates)} worker(s) with the "
            f"'{TRAIN_NODE_RESOURCE}' resource; start one `dask worker SCHEDULER --nworkers 1 "
            f"--resources {TRAIN_NODE_RESOURCE}=1` per training machine (README, Scaling out)"
        )
    by_host: dict[str, list[str]] = {}
    for address in candidates:
        by_host.setdefault(urlsplit(address).hostname or address, []).append(address)
    one_per_host = [group[0] for group in by_host.values()]
    the_rest = [address for group in by_host.values() for address in group[1:]]
    return (one_per_host + the_rest)[:nnodes]


def run_multinode(config: PretrainConfig, client: Client, iteration: int, stage_key: str) -> None:
    """One torchrun per training machine, each a Dask task pinned to that machine's train_node worker."""
    launch = config.iterations[iteration - 1].train.launch
    workers = training_workers(client, launch.nnodes)
    endpoint = f"{urlsplit(workers[0]).hostname}:{launch.rdzv_port}"
    rendezvous = f"{stage_key[:16]}-{uuid.uuid4().hex[:8]}"  # a fresh one per attempt
    arguments = [
        f"--nnodes={launch.nnodes}", f"--nproc-per-node={launch.nproc}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rendezvous}", "--max-restarts=0",
    ]
    log.info("train@%d: %d machines (%s), rendezvous at %s", iteration, launch.nnodes, ", ".join(workers), endpoint)
    fence = fence_environment(config, iteration)
    launches = [
        client.submit(
            launch_torchrun, config, iteration, arguments, fence,
            key=f"train-{iteration}-node-{node}-{rendezvous}", workers=[address], allow_other_workers=False,
            resources={TRAIN_NODE_RESOURCE: 1}, pure=False,
        )
        for node, address in enumerate(workers)
    ]
    statuses = client.gather(launches)
    failed = {address: status for address, status in zip(workers, statuses) if status != 0}
    if failed:
        raise TrainingFailed(
            f"train@{iteration}: torchrun failed on {len(failed)} of {len(workers)} machines "
            f"(exit status by worker: {failed}); checkpoints so far are kept for resume"
        )
