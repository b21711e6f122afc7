"""Where Dask work runs: a LocalCluster sized to the machine, or an existing scheduler by address."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import dask.config
import pyarrow
from distributed import Client, Future, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger(__name__)

# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in workers to return memory to the OS sooner.
# Setting any trim threshold turns off glibc's adaptive mmap threshold, so every buffer over
# 128 KiB is mmapped and page-faulted afresh: MFCC extraction ran 2.2x slower in a worker than in
# a plain process (bench/features.py). Fixed thresholds restore the speed and still hand freed
# memory back; at 64 MiB they cover a chunk of 16,384 768-dim float32 frames (48 MiB), whose read
# took 105 ms at 16 MiB, 13 ms at 64 MiB (reading is then a tenth of labelling it). Trimming
# at 256 MiB: a label task's read briefly holds two chunks' worth, and at 64 MiB freeing them gave
# the heap back, so every other read page-faulted a fresh 48 MiB (12,289 faults, 30-50 ms against
# 5-14 ms; bench/labels.py spent 1-2.3 s of a worker's 8-10 s reading, 0.7-1.1 s now). Two malloc
# arenas, not glibc's 8 a core: zarr's I/O threads each took an arena of their own, whose free
# pages no trim could hand back, and a label worker's peak grew with the corpus (+140 MiB at 64
# hours against +5 at one; +60 with two arenas).
WORKER_MALLOC_ENVIRON = {"MALLOC_TRIM_THRESHOLD_": 256 * 2**20, "MALLOC_MMAP_THRESHOLD_": 64 * 2**20, "MALLOC_ARENA_MAX": 2}

# Dask keeps the last `low-level-log-length` (1000) messages of every batched connection for
# debugging, each whole below 1 MB: the scheduler's connection to each worker held the specs of
# the last thousand tasks sent to it, and so the client's to the scheduler. A stage sends a few
# thousand tasks whose specs grow with the corpus (intake's carry its file listing), so the
# driver, which runs a LocalCluster's scheduler, grew by about 1.4 KB an utterance at intake
# (bench/scale.py). Sixteen messages are enough to debug a hang with.
RECENT_MESSAGES_KEPT = 16


@contextlib.contextmanager
def dask_client(
    address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str = "auto",
) -> Iterator[Client]:
    """A client for one run's Dask work.

    With `address` or `scheduler_file`, connect to that scheduler (its workers may be on other
    machines: tasks read and write through the artifact store, never through a shared disk).
    Without, start a LocalCluster of worker processes, one per core by default, and shut it down on exit.
    """
    few_messages = {"distributed.admin.low-level-log-length": RECENT_MESSAGES_KEPT}
    if address is not None or scheduler_file is not None:
        log.info("connecting to the Dask scheduler at %s", address or f"the address in {scheduler_file}")
        with dask.config.set(few_messages), Client(address, scheduler_file=scheduler_file) as client:
            yield client
        return
    workers = n_workers or os.cpu_count() or 1
    log.info("starting a Dask LocalCluster: %d worker(s) x %d thread(s)", workers, threads_per_worker)
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC_ENVIRON}
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **few_messages}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(FreezeHeapAtTeardown())
        yield client


class FreezeHeapAtTeardown(WorkerPlugin):
    """Freezes a closing worker's heap, so that its interpreter's exit skips the garbage
    collection of everything torch and the rest created at import: with torch loaded that took
    1.5 s of a two-worker LocalCluster's 1.9 s close (0.3 s frozen), paid at the end of every run.
    Nothing the worker still holds needs collecting: the process is ending."""

    def teardown(self, worker: Any) -> None:
        gc.freeze()


@functools.cache
def _glibc_malloc_trim() -> Any | None:
    """glibc's `malloc_trim`, looked up once per process (`find_library` runs `ldconfig -p`); None
    where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)


def trim_memory() -> int:
    """Hand the memory glibc holds free back to the OS (`malloc_trim`): 1 if it released some, 0
    if not, -1 where there is no glibc. Freed arrays under the mmap threshold stay in the heap, in
    the arena of the thread that allocated them, where another stage's tasks may not reuse them."""
    malloc_trim = _glibc_malloc_trim()
    return -1 if malloc_trim is None else int(malloc_trim(0))


def release_memory() -> None:
    """Hand back to the OS what this process freed: Arrow's memory pool (mimalloc keeps freed
    pages for reuse) and glibc's heap. The driver calls it after building and dropping a corpus'
    worth of columns (a listing, a stage's manifest columns), so that its peak is the largest
    step's, not their sum."""
    pyarrow.default_memory_pool().release_unused()
    trim_memory()


def release_and_trim(client: Client, futures: list[Future], timeout: float = 10.0) -> None:
    """Cancel `futures` and, on every worker once it has dropped their results (or after `timeout`
    seconds), `trim_memory`: as Dask's documentation advises once a large working set (k-means'
    sample) is dropped, which would otherwise stay in the workers' heaps through the next stages."""
    client.cancel(futures)
    client.run(_trim_once_dropped, [future.key for future in futures], timeout)


async def _trim_once_dropped(keys: list[Any], timeout: float, dask_worker: Any = None) -> int:
    """On a worker's event loop (asynchronous, so the scheduler's release of `keys` can land)."""
    deadline = time.monotonic() + timeout
    while any(key in dask_worker.data for key in keys) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return trim_memory()
