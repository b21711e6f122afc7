"""Waiting on many Dask futures: progress for people, all-or-report for the stage."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

from distributed import Future, as_completed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
