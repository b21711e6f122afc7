"""The run lease (infra/lease.py) on a local folder and on SeaweedFS: one writer, takeover after expiry,
a fence every write checks, liveness by renewal alone, an unreadable lease named and broken."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from infra.commit import Stage, read_record
from infra.lease import LeaseCorrupt, LeaseHeld, LeaseHolder, LeaseLost, RunLease, break_lease, parse_holder, pid_namespace
from infra.store import ArtifactStore, VersionMismatch, utc_now
from tasks.run.layout import RunLayout
from tests.support import RUNS_BUCKET

LEASE = RunLayout("r").lease


def released(store: ArtifactStore) -> bool:
    """Whether the lease is in the store marked released (it stays, keeping its generation)."""
    current = store.read_versioned(LEASE)
    return current is not None and parse_holder(current[0], LEASE).released_at is not None


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    server = request.getfixturevalue("s3")
    return ArtifactStore(f"s3://{RUNS_BUCKET}/lease-{uuid.uuid4().hex[:8]}", server.storage_options())


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(store: ArtifactStore) -> None:
    first = RunLease(store, LEASE, ttl_seconds=60, flow_run_id="flow-1")
    first.acquire()
    with pytest.raises(LeaseHeld) as refused:
        RunLease(store, LEASE, ttl_seconds=60).acquire()
    assert refused.value.holder.token == first.holder.token
    assert f"pid {first.holder.pid} on {first.holder.host}" in str(refused.value)
    assert "flow run flow-1" in str(refused.value)
    first_token = first.holder.token
    first.release()
    assert released(store)
    second = RunLease(store, LEASE, ttl_seconds=60)
    second.acquire()
    assert second.holder.token != first_token
    assert (first.holder, second.holder.generation) == (None, 2)  # released, the generation goes on


def test_an_expired_lease_is_taken_over_with_a_log_line_and_its_old_holder_learns_it(
    store: ArtifactStore, caplog: pytest.LogCaptureFixture
) -> None:
    dead = RunLease(store, LEASE, ttl_seconds=1)
    dead.acquire()  # and never renewed: its holder "died"
    dead_pid = dead.holder.pid
    time.sleep(1.2)
    with caplog.at_level(logging.WARNING, logger="infra.lease"):
        heir = RunLease(store, LEASE, ttl_seconds=30)
        heir.acquire()
    assert any("took over the run's lease" in line and str(dead_pid) in line for line in caplog.messages)
    with pytest.raises(LeaseLost, match="taken over"):
        dead.renew()
    heir.renew()
    heir.release()
    assert released(store)


def test_the_background_renewal_keeps_a_short_lease_alive(store: ArtifactStore) -> None:
    with RunLease(store, LEASE, ttl_seconds=1.5) as held:
        time.sleep(2.5)
        with pytest.raises(LeaseHeld):
            RunLease(store, LEASE, ttl_seconds=1.5).acquire()
        held.check()
    assert released(store)


def test_wait_takes_the_lease_once_its_holder_releases(store: ArtifactStore) -> None:
    holder = RunLease(store, LEASE, ttl_seconds=8)
    holder.acquire()
    threading.Timer(1.0, holder.release).start()
    started = time.monotonic()
    waiter = RunLease(store, LEASE, ttl_seconds=8, wait=True)
    waiter.acquire()
    assert 0.9 < time.monotonic() - started < 6
    waiter.release()


def test_of_racing_writers_exactly_one_wins(store: ArtifactStore) -> None:
    barrier = threading.Barrier(6)

    def contend(_: int) -> bool:
        barrier.wait()
        try:
            RunLease(store, LEASE, ttl_seconds=60).acquire()
        except LeaseHeld:
            return False
        return True

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(contend, range(6))) == 1


def test_conditional_writes_refuse_a_stale_version(store: ArtifactStore) -> None:
    version = store.create_exclusive("c/x.json", b"1")
    with pytest.raises(FileExistsError):
        store.create_exclusive("c/x.json", b"2")
    newer = store.replace_if("c/x.json", b"3", version)
    with pytest.raises(VersionMismatch):
        store.replace_if("c/x.json", b"4", version)
    with pytest.raises(VersionMismatch):
        store.remove_if("c/x.json", version)
    assert store.read_versioned("c/x.json") == (b"3", newer)
    store.remove_if("c/x.json", newer)
    assert store.read_versioned("c/x.json") is None


def test_a_writer_that_lost_its_lease_is_fenced_off_from_parts_and_commits(store: ArtifactStore) -> None:
    """A holder paused past its TTL (here: never renewed) and taken over may write nothing more: its
    part markers and its commit raise LeaseLost, its commit leaves the new holder's record alone."""
    paused = RunLease(store, LEASE, ttl_seconds=1)
    paused.acquire()
    stage = Stage(store, "r/iter-1", "features", version=1, config={}, inputs={}, fence=paused.fence)
    stage.prepare([])
    stage.mark_part("c00000", {"part": "c00000"})
    time.sleep(1.2)
    heir = RunLease(store, LEASE, ttl_seconds=60)
    heir.acquire()
    assert heir.holder.generation == paused.fence.generation + 1
    theirs = Stage(store, "r/iter-1", "features", version=1, config={}, inputs={}, fence=heir.fence)
    theirs.prepare([])
    theirs.commit(outputs=[], output_digest="theirs", started_at=utc_now())
    with pytest.raises(LeaseLost, match="fenced off: the run's lease .* is now generation 2"):
        stage.mark_part("c00001", {"part": "c00001"})
    with pytest.raises(LeaseLost, match="fenced off"):
        stage.commit(outputs=[], output_digest="mine", started_at=utc_now())
    unfenced = Stage(store, "r/iter-1", "features", version=1, config={}, inputs={})
    with pytest.raises(LeaseLost, match="committed by another writer"):  # the record is created, never replaced
        unfenced.commit(outputs=[], output_digest="mine", started_at=utc_now())
    assert read_record(store, "r/iter-1", "features").output_digest == "theirs"
    heir.fence.check()


def write_holder(store: ArtifactStore, **changes: object) -> LeaseHolder:
    """A lease in the store as another process would have written it (this host, a dead pid)."""
    now = utc_now()
    holder = LeaseHolder(
        host=socket.gethostname(), pid=dead_pid(), user="someone", since=now, renewed_at=now, ttl_seconds=60,
        token=uuid.uuid4().hex, generation=4, pid_namespace=pid_namespace(),
    ).model_copy(update=changes)
    store.write_bytes(LEASE, holder.model_dump_json().encode())
    return holder


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_liveness_is_the_renewal_and_a_pid_counts_only_in_this_pid_namespace(store: ArtifactStore) -> None:
    """A holder with this host's name whose pid is gone: taken over at once only when it was in this
    PID namespace; from another one (a container with the host's network) it is alive until its TTL."""
    write_holder(store, pid_namespace="0000/pid:[4026531836-elsewhere]")
    with pytest.raises(LeaseHeld, match="generation 4"):
        RunLease(store, LEASE, ttl_seconds=60).acquire()
    write_holder(store, pid_namespace=None)  # a lease that does not say where its pid lives
    with pytest.raises(LeaseHeld):
        RunLease(store, LEASE, ttl_seconds=60).acquire()
    write_holder(store)
    taker = RunLease(store, LEASE, ttl_seconds=60)
    taker.acquire()
    assert taker.holder.generation == 5


def test_a_lease_from_the_future_says_so(store: ArtifactStore) -> None:
    write_holder(store, renewed_at=utc_now() + timedelta(days=1), pid=os.getpid())
    with pytest.raises(LeaseHeld, match=r"renewal time is \d+ s ahead of this machine's clock.*lease break"):
        RunLease(store, LEASE, ttl_seconds=60).acquire()


def test_an_unreadable_lease_is_named_and_broken_only_when_nobody_renews_it(store: ArtifactStore) -> None:
    store.write_bytes(LEASE, b"")
    with pytest.raises(LeaseCorrupt, match=r"lease .*lease.json is unreadable \(empty\).*lease break"):
        RunLease(store, LEASE, ttl_seconds=60).acquire()
    assert "removed an unreadable lease" in break_lease(store, LEASE, watch_seconds=0.5)
    with RunLease(store, LEASE, ttl_seconds=1.2):  # renewed every 0.3 s
        with pytest.raises(LeaseHeld):
            break_lease(store, LEASE, watch_seconds=1.0)
    assert "nothing to break" in break_lease(store, LEASE, watch_seconds=0.1)  # released
