"""The run lease (infra/lease.py) on a local folder and on SeaweedFS: one writer, takeover after expiry."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.lease import LeaseHeld, LeaseLost, RunLease
from infra.store import ArtifactStore, VersionMismatch
from tasks.run.layout import RunLayout
from tests.support import RUNS_BUCKET

LEASE = RunLayout("r").lease


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
    assert store.read_versioned(LEASE) is None
    second = RunLease(store, LEASE, ttl_seconds=60)
    second.acquire()
    assert second.holder.token != first_token


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
    assert store.read_versioned(LEASE) is None


def test_the_background_renewal_keeps_a_short_lease_alive(store: ArtifactStore) -> None:
    with RunLease(store, LEASE, ttl_seconds=1.5) as held:
        time.sleep(2.5)
        with pytest.raises(LeaseHeld):
            RunLease(store, LEASE, ttl_seconds=1.5).acquire()
        held.check()
    assert store.read_versioned(LEASE) is None


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
