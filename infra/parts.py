"""Chunked stages on Dask: one task per part, a bounded number in flight, progress for people, all-or-report for the stage."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from distributed import Client, Future, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infra.commit import Stage

log = logging.getLogger(__name__)

TASKS_PER_THREAD = 4
MIN_TASKS_IN_FLIGHT = 16
IN_FLIGHT_REFRESH_SECONDS = 5.0


class PartsFailed(RuntimeError):
    """Some parts of a stage failed; the finished ones are kept for the next run to resume from."""

    retryable = True  # a retry resumes from the parts that finished; a part that fails for a reason in the data fails again, cheaply


class InFlightLimit:
    """How many tasks a stage keeps submitted: a few per worker thread, so no worker waits for its
    next task, looked up again every few seconds as an adaptive cluster grows or shrinks."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.checked_at = -IN_FLIGHT_REFRESH_SECONDS
        self.limit = MIN_TASKS_IN_FLIGHT

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.checked_at >= IN_FLIGHT_REFRESH_SECONDS:
            threads = sum(self.client.nthreads().values())
            self.limit, self.checked_at = max(TASKS_PER_THREAD * threads, MIN_TASKS_IN_FLIGHT), now
        return self.limit


def gather_parts(
    client: Client,
    work: Callable[..., Any],
    items: Sequence[Any],
    names: Sequence[str],
    description: str,
    on_result: Callable[[Any], Any] | None = None,
    **arguments: Any,
) -> list[Any]:
    """`work(item, **arguments)` on Dask for each item: the results in completion order, each passed
    through `on_result` if given. Each task's key is its item's name (`names`, e.g. `labels-c00012`)
    and a fresh attempt id: Dask would hand back a failed attempt's result under a reused key.

    Tasks are submitted as earlier ones finish, a few per worker thread at a time
    (`InFlightLimit`), and each result is released once taken: the scheduler (in the driver's
    process on a LocalCluster) and the workers hold a window of tasks, not a corpus' worth of
    task specs and results.

    The first failure stops the stage: no more tasks are submitted, those in flight are
    cancelled (a running one may still finish and mark itself done), and the failures are raised
    together. When the store or the network is down every remaining part would fail the same way,
    each after its own timeouts; stopping at once wastes at most the parts in flight, which a
    retry or re-run resumes around. `on_result` sees each result as it arrives, so a stage can fold
    large per-part results into a running total and keep only what it returns (memory bounded by
    one part, not by the number of parts).
    """
    attempt = uuid.uuid4().hex[:8]
    waiting: Iterator[tuple[str, Any]] = iter(zip(names, items, strict=True))
    limit = InFlightLimit(client)
    in_flight: set[Future] = set()
    completed = as_completed()

    def submit_more() -> None:
        while len(in_flight) < limit():
            entry = next(waiting, None)
            if entry is None:
                return
            name, item = entry
            future = client.submit(work, item, key=f"{name}-{attempt}", **arguments)
            in_flight.add(future)
            completed.add(future)

    results: list[Any] = []
    failures: list[str] = []
    cancelled = 0
    show_bar = sys.stderr.isatty()
    next_log_share = 0.1
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not show_bar, transient=True,
    ) as progress:
        bar = progress.add_task(description, total=len(items))
        submit_more()
        for done, future in enumerate(completed, start=1):
            in_flight.discard(future)
            if future.cancelled() and failures:
                cancelled += 1
            elif future.status == "error" or future.cancelled():
                failures.append(_failure(future))
                for unfinished in in_flight:
                    unfinished.cancel()
            else:
                result = future.result()
                results.append(result if on_result is None else on_result(result))
                if not failures:
                    submit_more()
            future.release()
            progress.advance(bar)
            if not show_bar and done / len(items) >= next_log_share:
                log.info("%s: %d/%d parts done", description, done, len(items))
                next_log_share += 0.1
    if failures:
        stopped = cancelled + sum(1 for _ in waiting)
        listed = "\n  ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise PartsFailed(
            f"{len(failures)} of {len(items)} {description} parts failed, {stopped} stopped unfinished "
            f"(finished parts are kept; run again to resume):\n  {listed}{more}"
        )
    return results


def _failure(future: Future) -> str:
    if future.cancelled():  # by the scheduler: e.g. its inputs were lost with every worker holding them
        return f"{future.key}: cancelled by the Dask scheduler"
    return f"{future.key}: {future.exception()!r}"


class Part(Protocol):
    """A unit of a chunked stage: one Dask task that writes whole chunks and marks itself done."""

    @property
    def part(self) -> str: ...


def run_parts(
    client: Client,
    stage: Stage,
    jobs: Sequence[Part],
    work: Callable[..., dict[str, Any]],
    description: str,
    done: dict[str, dict[str, Any]],
    on_result: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **arguments: Any,
) -> dict[str, dict[str, Any]]:
    """Run `work(job, stage=stage, **arguments)` on Dask for each job not already in `done`.

    `work` writes its part, calls `stage.mark_part(job.part, info)` and returns `info` (perhaps
    with more, which `on_result` takes out; see `gather_parts`). Returns the info of every job's
    part, the resumed ones included.
    """
    todo = [job for job in jobs if job.part not in done]
    if len(todo) < len(jobs):
        log.info("%s: %d of %d parts done before, resuming", description, len(jobs) - len(todo), len(jobs))
    names = [f"{stage.name}-{job.part}" for job in todo]
    results = gather_parts(client, work, todo, names, description, on_result, stage=stage, **arguments)
    return {**done, **{info["part"]: info for info in results}}
