"""Chunked stages on Dask: one task per part, progress for people, all-or-report for the stage."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from distributed import Client, Future, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infra.store import Stage

log = logging.getLogger(__name__)


class PartsFailed(RuntimeError):
    """Some parts of a stage failed; the finished ones are kept for the next run to resume from."""


def gather_parts(
    futures: Sequence[Future], description: str, on_result: Callable[[Any], Any] | None = None
) -> list[Any]:
    """Results of all futures, in completion order, each passed through `on_result` if given.

    The first failure stops the stage: parts not yet finished are cancelled (a running one may
    still finish and mark itself done), and the failures are raised together. When the store or
    the network is down every remaining part would fail the same way, each after its own
    timeouts; stopping at once wastes at most the parts in flight, which a retry or re-run
    resumes around. `on_result` sees each result as
    it arrives, so a stage can fold large per-part results into a running total and keep only
    what it returns (memory bounded by one part, not by the number of parts).
    """
    results: list[Any] = []
    failures: list[str] = []
    stopped = 0
    show_bar = sys.stderr.isatty()
    next_log_share = 0.1
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not show_bar, transient=True,
    ) as progress:
        bar = progress.add_task(description, total=len(futures))
        for done, future in enumerate(as_completed(futures), start=1):
            if future.cancelled() and failures:
                stopped += 1
            elif future.status == "error" or future.cancelled():
                failures.append(_failure(future))
                for unfinished in futures:
                    if not unfinished.done():
                        unfinished.cancel()
            else:
                result = future.result()
                results.append(result if on_result is None else on_result(result))
            progress.advance(bar)
            if not show_bar and done / len(futures) >= next_log_share:
                log.info("%s: %d/%d parts done", description, done, len(futures))
                next_log_share += 0.1
    if failures:
        listed = "\n  ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise PartsFailed(
            f"{len(failures)} of {len(futures)} {description} parts failed, {stopped} stopped unfinished "
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
    attempt = uuid.uuid4().hex[:8]  # fresh keys: Dask would hand back a failed attempt's result
    futures = client.map(
        work, todo, stage=stage, **arguments, key=[f"{stage.name}-{attempt}-{job.part}" for job in todo]
    )
    finished = {info["part"]: info for info in gather_parts(futures, description, on_result)}
    return {**done, **finished}
