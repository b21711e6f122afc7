"""`torchrun` that dies with the run that started it: `python -m tasks.stages.train.guarded_torchrun ARGS`.

The kernel sends it SIGKILL when the run's process dies (infra/process.py), and it hands its own
pid down, so that each rank it starts (tasks/stages/train/worker.py) dies with it in turn: a run
killed with SIGKILL leaves no training behind.
"""

from __future__ import annotations

import os
import sys

from infra.process import PARENT_PID_ENVIRONMENT, die_with_parent


def main() -> None:
    die_with_parent()
    os.environ[PARENT_PID_ENVIRONMENT] = str(os.getpid())  # the ranks' parent is this process
    from torch.distributed.run import main as torchrun

    torchrun(sys.argv[1:])


if __name__ == "__main__":
    main()
