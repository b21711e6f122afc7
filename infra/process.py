"""Child processes that end with their parent: what keeps a killed run from leaving training behind.

A run that is SIGKILLed (the OOM killer, `kill -9`, a lost Slurm allocation) runs no cleanup, so
its children must notice for themselves. On Linux a process can ask the kernel for a signal when
its parent dies (`prctl(PR_SET_PDEATHSIG)`); `die_with_parent` asks for SIGKILL, and exits at
once if the parent died before the request was in place. Elsewhere it does nothing (the lease
fence still stops a child at its next write).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_PID_ENVIRONMENT = "HUBERT_PIPELINE_PARENT_PID"
"""Set by a parent for its child: the pid the child must still be the child of once it is guarded."""


def die_with_parent(expected_parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has.

    `expected_parent` defaults to the pid the parent put in PARENT_PID_ENVIRONMENT, or else the
    parent this process has now."""
    if not sys.platform.startswith("linux"):
        return
    if expected_parent is None:
        handed_down = os.environ.get(PARENT_PID_ENVIRONMENT)
        expected_parent = int(handed_down) if handed_down else os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (a sandbox): the lease fence is left to stop it
    if os.getppid() != expected_parent:  # the parent died before the request was in place
        os._exit(1)
