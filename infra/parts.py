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


def gather_parts(futures: Sequence[Future], description: str) -> list[Any]:
    """Results of all futures, in completion order.

    Every future is waited for even after one fails, so that every part that can finish does
    (and is marked done); then the failures are raised together.
    """
    results: list[Any] = []
    failures: list[str] = []
    show_bar = sys.stderr.isatty()
    next_log_share = 0.1
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not show_bar, transient=True,
    ) as progress:
        bar = progress.add_task(description, total=len(futures))
        for done, future in enumerate(as_completed(futures), start=1):
            if future.status == "error":
                failures.append(f"{future.key}: {future.exception()!r}")
            else:
                results.append(future.result())
            progress.advance(bar)
            if not show_bar and done / len(futures) >= next_log_share:
                log.info("%s: %d/%d parts done", description, done, len(futures))
                next_log_share += 0.1
    if failures:
        listed = "\n  ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise PartsFailed(
            f"{len(failures)} of {len(futures)} {description} parts failed "
            f"(finished parts are kept; run again to resume):\n  {listed}{more}"
        )
    return results


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
    **arguments: Any,
) -> dict[str, dict[str, Any]]:
    """Run `work(job, stage=stage, **arguments)` on Dask for each job not already in `done`.

    `work` writes its part, calls `stage.mark_part(job.part, info)` and returns that `info`.
    Returns the info of every job's part, the resumed ones included.
    """
    todo = [job for job in jobs if job.part not in done]
    if len(todo) < len(jobs):
        log.info("%s: %d of %d parts done before, resuming", description, len(jobs) - len(todo), len(jobs))
    attempt = uuid.uuid4().hex[:8]  # fresh keys: Dask would hand back a failed attempt's result
    futures = client.map(
        work, todo, stage=stage, **arguments, key=[f"{stage.name}-{attempt}-{job.part}" for job in todo]
    )
    finished = {info["part"]: info for info in gather_parts(futures, description)}
    return {**done, **finished}
