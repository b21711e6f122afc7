"""A run's lease: at most one writer per run, in the store beside the run, local folder and S3 alike.

The lease is one small JSON object naming its holder (host, pid, user, flow run id, since when)
and when it was last renewed. Its holder renews it every `ttl_seconds / 4` from a background
thread; a lease not renewed for `ttl_seconds` belonged to a holder that died (SIGKILL, a lost
machine) and is taken over, with a log line saying so; a holder on this machine whose process is
gone is taken over at once (a killed run re-run on the same machine need not wait out the TTL). Every change is conditional on the version
read (infra/store.py): creating needs the name free, renewing, taking over and releasing need the
object unchanged since it was read, so of two runs that race only one wins.

What is guaranteed, and what is not:
- Local folder: creation is a hard link (refuses an existing name), changes happen under an flock
  of the run's folder. Atomic between processes of one machine (and NFSv4 clients).
- S3: `If-None-Match: *` on create, `If-Match: <ETag>` on renew, takeover and release; SeaweedFS
  4.48 honours both (tests/test_lease.py races 8 writers on it), as does AWS S3. A server that
  ignored the headers would let two creators both write: each reads the lease back after writing
  and only the one whose token is there goes on; two writes landing between the other's write and
  read-back can still both pass. The next renewal (If-Match on its own ETag) then fails for the
  loser, which stops at its next stage boundary.
- Expiry compares the store's `renewed_at` with this machine's clock: machines must agree on the
  time to well within the TTL.
- A holder cut off from the store for longer than the TTL loses the lease while it may still be
  working; it learns so at its next renewal and stops at the next stage boundary, but the part it
  is writing meanwhile can race the new holder's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from types import TracebackType

from pydantic import BaseModel

from infra.store import ArtifactStore, VersionMismatch, current_user, utc_now

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 120.0


class LeaseHolder(BaseModel):
    """What the lease object says."""

    host: str
    pid: int
    user: str
    flow_run_id: str | None = None
    since: datetime
    renewed_at: datetime
    ttl_seconds: float
    token: str

    def expired(self, now: datetime) -> bool:
        return now > self.renewed_at + timedelta(seconds=self.ttl_seconds)

    def gone(self) -> bool:
        """A holder on this machine whose process no longer exists (SIGKILLed, crashed): its lease
        need not wait out the TTL. A process on another machine cannot be checked from here, and a
        pid taken again by another process counts as alive (the TTL then decides)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        flow_run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return (
            f"pid {self.pid} on {self.host} (user {self.user}{flow_run}), holding since {self.since.isoformat()}, "
            f"last renewed {self.renewed_at.isoformat()}, expires {self.ttl_seconds:g} s after that"
        )


class LeaseHeld(RuntimeError):
    """Another live writer holds the run."""

    def __init__(self, url: str, holder: LeaseHolder) -> None:
        super().__init__(f"the run is being written by another process: {holder.describe()} (lease {url})")
        self.holder = holder


class LeaseLost(RuntimeError):
    """This process's lease was taken over or could not be renewed within its TTL."""


class RunLease:
    """The lease at `relpath` of `store`. Use as a context manager: acquire, renew in the background, release.

    `wait=True` waits for a live holder to release (or to expire) instead of raising LeaseHeld.
    """

    def __init__(
        self,
        store: ArtifactStore,
        relpath: str,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        flow_run_id: str | None = None,
        wait: bool = False,
    ) -> None:
        self.store = store
        self.relpath = relpath
        self.ttl_seconds = ttl_seconds
        self.flow_run_id = flow_run_id
        self.wait = wait
        self.url = store.url(relpath)
        self.holder: LeaseHolder | None = None
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- taking and giving back --------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease: create it, or take over an expired one; LeaseHeld (or wait) otherwise."""
        announced_wait = False
        while True:
            current = self.store.read_versioned(self.relpath)
            if current is None:
                if self._try_create():
                    return
                continue
            data, version = current
            holder = LeaseHolder.model_validate(json.loads(data))
            if holder.expired(utc_now()) or holder.gone():
                if self._try_take_over(holder, version):
                    return
                continue
            if not self.wait:
                raise LeaseHeld(self.url, holder)
            if not announced_wait:
                log.info("waiting for the run's lease, held by %s", holder.describe())
                announced_wait = True
            time.sleep(self.poll_seconds)

    @property
    def poll_seconds(self) -> float:
        return min(self.ttl_seconds / 4, 5.0)

    def _new_holder(self) -> LeaseHolder:
        now = utc_now()
        return LeaseHolder(
            host=socket.gethostname(), pid=os.getpid(), user=current_user(), flow_run_id=self.flow_run_id,
            since=now, renewed_at=now, ttl_seconds=self.ttl_seconds, token=uuid.uuid4().hex,
        )

    def _try_create(self) -> bool:
        holder = self._new_holder()
        try:
            self.store.create_exclusive(self.relpath, _encode(holder))
        except FileExistsError:
            return False
        return self._confirm(holder)

    def _try_take_over(self, stale: LeaseHolder, version: str) -> bool:
        holder = self._new_holder()
        try:
            self.store.replace_if(self.relpath, _encode(holder), version)
        except VersionMismatch:
            return False
        reason = "its process is gone" if stale.gone() else f"not renewed for over {stale.ttl_seconds:g} s"
        log.warning("took over the run's lease from %s: %s (lease %s)", stale.describe(), reason, self.url)
        return self._confirm(holder)

    def _confirm(self, holder: LeaseHolder) -> bool:
        """Read the lease back: ours only if our token is there (see the module's note on S3)."""
        current = self.store.read_versioned(self.relpath)
        if current is None or LeaseHolder.model_validate(json.loads(current[0])).token != holder.token:
            return False
        self.holder, self._version = holder, current[1]
        log.info("holding the run's lease %s (ttl %g s)", self.url, self.ttl_seconds)
        return True

    def renew(self) -> None:
        """Move `renewed_at` to now; LeaseLost if someone else has the lease now."""
        if self.holder is None or self._version is None:
            raise LeaseLost(f"lease {self.url} is not held")
        renewed = self.holder.model_copy(update={"renewed_at": utc_now()})
        try:
            self._version = self.store.replace_if(self.relpath, _encode(renewed), self._version)
        except VersionMismatch as error:
            raise LeaseLost(f"lease {self.url} was taken over by another process") from error
        self.holder = renewed

    def release(self) -> None:
        """Give the lease back (delete it, if it is still ours)."""
        if self.holder is None or self._version is None:
            return
        try:
            self.store.remove_if(self.relpath, self._version)
        except VersionMismatch:
            log.warning("lease %s was no longer ours at release; left as it is", self.url)
        self.holder = self._version = None

    # -- renewing in the background ------------------------------------------------------------

    def check(self) -> None:
        """Raise LeaseLost if the background renewal lost the lease."""
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def _renew_until_stopped(self) -> None:
        period = self.ttl_seconds / 4
        last_renewed = time.monotonic()
        while not self._stop.wait(period):
            try:
                self.renew()
                last_renewed = time.monotonic()
            except LeaseLost as error:
                self._lost = str(error)
                log.error("%s; this run stops at its next stage", error)
                return
            except Exception as error:  # noqa: BLE001 - a store outage: keep trying until the TTL runs out
                log.warning("could not renew lease %s: %r", self.url, error)
                if time.monotonic() - last_renewed > self.ttl_seconds:
                    self._lost = f"lease {self.url} could not be renewed for {self.ttl_seconds:g} s ({error!r})"
                    log.error("%s; this run stops at its next stage", self._lost)
                    return

    def __enter__(self) -> RunLease:
        self.acquire()
        _HELD[self.url] = self
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="lease-renewal", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        _HELD.pop(self.url, None)
        if self._lost is None:
            self.release()


_HELD: dict[str, RunLease] = {}  # the leases this process holds, by URL


def check_lease(store: ArtifactStore, relpath: str) -> None:
    """Raise LeaseLost if this process held the lease at `relpath` and lost it (a no-op where it
    holds none: stages run by tests and benchmarks without a lease)."""
    lease = _HELD.get(store.url(relpath))
    if lease is not None:
        lease.check()


def live_holder(store: ArtifactStore, relpath: str) -> LeaseHolder | None:
    """Who holds the lease at `relpath` now, or None where nobody does (no lease, or one that
    expired or whose process is gone, which the next writer takes over). One read: a caller can
    refuse a second writer at once, before it starts anything (the CLI does, before Prefect)."""
    current = store.read_versioned(relpath)
    if current is None:
        return None
    holder = LeaseHolder.model_validate(json.loads(current[0]))
    return None if holder.expired(utc_now()) or holder.gone() else holder


def _encode(holder: LeaseHolder) -> bytes:
    return json.dumps(holder.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
