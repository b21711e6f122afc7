"""One training process under torchrun: `python -m torch.distributed.run ... -m tasks.train_worker`.

The train stage starts it; it reads the run config from the file the stage wrote and trains its
rank with gloo (CPU) or NCCL (GPU).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.config import PretrainConfig
from tasks.training import train_rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the run config as JSON")
    args = parser.parse_args()
    # force: a library imported on the way may have configured the root logger already.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pid %(process)d %(name)s: %(message)s", force=True)
    config = PretrainConfig.model_validate_json(args.config.read_text())
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        train_rank(config, args.iteration, rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
