"""One training process under torchrun: `python -m torch.distributed.run ... -m tasks.stages.train.worker`.

The train stage starts it (launcher.py); it reads the run config from its environment (never a
file: it may hold storage credentials), dies with the torchrun that started it, and trains its
rank with gloo (CPU) or NCCL (GPU).

A rank that has trained ends with `os._exit`, after flushing its logs: everything it writes is
written synchronously by then, and Python's interpreter finalization is where torch's native
threads (gloo's, and the Python threads that ran torch ops to load batches) can abort the process
("terminate called without an active exception", pytorch/pytorch#117762), and torchrun would then
fail a stage whose training had finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from infra.process import die_with_parent
from tasks.run.config import PretrainConfig
from tasks.stages.train.rank import train_rank

CONFIG_ENVIRONMENT = "HUBERT_PIPELINE_RUN_CONFIG"
"""The variable that hands a rank the run config as JSON (storage options masked, as JSON has them)."""
STORAGE_OPTIONS_ENVIRONMENT = "HUBERT_PIPELINE_STORAGE_OPTIONS"
"""The variable that hands a rank the storage options (they may hold credentials: never a file)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    args = parser.parse_args()
    die_with_parent()
    # force: a library imported on the way may have configured the root logger already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pid %(process)d %(name)s: %(message)s", force=True)
    config = PretrainConfig.model_validate_json(os.environ[CONFIG_ENVIRONMENT]).with_credentials(
        json.loads(os.environ[STORAGE_OPTIONS_ENVIRONMENT])
    )
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        train_rank(config, args.iteration, rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        dist.destroy_process_group()
    exit_without_finalization()


def exit_without_finalization() -> None:
    """Exit 0 now, skipping the interpreter's teardown (module docstring)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
