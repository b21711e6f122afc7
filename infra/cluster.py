"""Where Dask work runs: a LocalCluster sized to the machine, or an existing scheduler by address."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(
    address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str = "auto",
) -> Iterator[Client]:
    """A client for one run's Dask work.

    With `address`, connect to that scheduler (its workers may be on other machines: tasks read and
    write through the artifact store, never through a shared disk). Without, start a LocalCluster of
    worker processes, one per core by default, and shut it down on exit.
    """
    if address is not None:
        log.info("connecting to Dask scheduler at %s", address)
        with Client(address) as client:
            yield client
        return
    workers = n_workers or os.cpu_count() or 1
    log.info("starting a Dask LocalCluster: %d worker(s) x %d thread(s)", workers, threads_per_worker)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
