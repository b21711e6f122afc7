"""Chunked stages' task runner (infra/parts.py) on a real Dask cluster: a bounded window of tasks, the first failure stops the rest."""

import gc
import time

import pytest
from distributed import Client

from infra.cluster import RECENT_MESSAGES_KEPT
from infra.parts import MIN_TASKS_IN_FLIGHT, PartsFailed, gather_parts

ITEMS = 60


def slow_square(item: int, fail_at: int | None = None, seconds: float = 0.01) -> int:
    """item squared after `seconds`; the `fail_at` item fails at once."""
    if item == fail_at:
        raise ValueError(f"item {item} is bad")
    time.sleep(seconds)
    return item * item


def tasks_on_scheduler(client: Client, prefix: str = "square-") -> int:
    """This test's tasks the scheduler holds (the session's cluster may hold other tests' too)."""
    return client.run_on_scheduler(
        lambda dask_scheduler: sum(str(key).startswith(prefix) for key in dask_scheduler.tasks)
    )


def forgotten_within(client: Client, seconds: float) -> bool:
    """Whether the scheduler forgets every one of this test's tasks within `seconds` (a release
    travels to it asynchronously)."""
    deadline = time.monotonic() + seconds
    while tasks_on_scheduler(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    return tasks_on_scheduler(client) == 0


def test_tasks_are_submitted_a_window_at_a_time_and_every_result_comes_back(client: Client) -> None:
    held = []

    def note(result: int) -> int:
        held.append(tasks_on_scheduler(client))
        return result

    results = gather_parts(client, slow_square, list(range(ITEMS)), [f"square-{i}" for i in range(ITEMS)], "squares", note)
    assert sorted(results) == [i * i for i in range(ITEMS)]
    # 2 single-threaded workers: the window is the minimum; a result just released may not be forgotten yet.
    assert max(held) <= MIN_TASKS_IN_FLIGHT + 2, held
    assert forgotten_within(client, 10), f"{tasks_on_scheduler(client)} tasks still held after every result was taken"


def test_the_first_failure_stops_the_stage_and_counts_what_never_ran(client: Client) -> None:
    # The first item fails at once and the others take 50 ms: the parts that finish before the
    # driver sees the failure stay few even on a loaded machine (with 10 ms parts and the failure
    # fourth, a slow driver let 17 finish).
    with pytest.raises(PartsFailed) as failed:
        gather_parts(
            client, slow_square, list(range(ITEMS)), [f"square-{i}" for i in range(ITEMS)], "squares", fail_at=0, seconds=0.05
        )
    message = str(failed.value)
    assert message.startswith("1 of 60 squares parts failed, ") and "square-0-" in message and "item 0 is bad" in message
    stopped = int(message.split("failed, ")[1].split(" stopped")[0])
    assert ITEMS - MIN_TASKS_IN_FLIGHT <= stopped <= ITEMS - 1, message


class Spec:
    """A task argument the size of a large probe batch's listing (the scheduler deserializes its own copy)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.payload = bytes(100_000)


def index_of(spec: Spec) -> int:
    return spec.index


def test_the_scheduler_keeps_no_corpus_worth_of_task_specs_once_they_ran(client: Client) -> None:
    """Dask keeps recent messages of every connection for debugging; with its default (1000 each)
    the scheduler, in the driver's process on a LocalCluster, kept the spec of every task of a
    stage whose tasks are a few thousand (infra/cluster.py `RECENT_MESSAGES_KEPT`)."""
    specs = 300
    results = gather_parts(client, index_of, [Spec(i) for i in range(specs)], [f"spec-{i}" for i in range(specs)], "specs")
    assert sorted(results) == list(range(specs))
    gc.collect()
    alive = sum(isinstance(thing, Spec) for thing in gc.get_objects())
    assert alive <= 4 * RECENT_MESSAGES_KEPT, f"{alive} of {specs} task specs are still held in the driver's process"
