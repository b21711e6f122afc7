"""A run's lease: at most one writer per run, fenced to its commits, in the store beside the run.

The lease is one small JSON object naming its holder (host, pid, user, flow run id, since when),
when it was last renewed, and its generation: a fencing token, one more than the generation of
the lease it replaced. Its holder renews it every `ttl_seconds / 4` from a background thread; a
lease not renewed for `ttl_seconds` belonged to a holder that died (SIGKILL, a lost machine) or
stopped (SIGSTOP, a machine cut off) and is taken over, with a log line saying so. Released, it
stays in the store marked so, keeping its generation, so that generations only ever grow.
Every change is conditional on the version read (infra/store.py): creating needs the name free,
renewing, taking over and releasing need the object unchanged since it was read, so of two runs
that race only one wins.

Fencing: a holder that lost its lease (it was paused past its TTL and another run took over)
must not write over the new holder's work. Every stage commit, part marker and checkpoint checks
the lease (`LeaseFence.check`: a read, comparing the token and generation) before it writes, and
a stage's record is created only where none exists (a conditional write), so the old holder stops
at its next write with LeaseLost and its run exits non-zero; training ranks under torchrun get
the fence through their environment.

Liveness is the renewal alone. A holder's pid is consulted only where it is certainly a process
of this kernel and PID namespace (same host name, boot and namespace): then a dead holder (a
killed run re-run on the same machine) need not wait out the TTL. A holder in a container with
the host's network (the same host name, another PID namespace) is never judged by pid.

What is guaranteed, and what is not:
- Local folder: creation is a hard link (refuses an existing name), changes happen under an flock
  of the run's folder, and lease writes are synced to disk (a lost machine leaves a whole lease
  or none). Atomic between processes of one machine (and NFSv4 clients).
- S3: `If-None-Match: *` on create, `If-Match: <ETag>` on renew, takeover and release; SeaweedFS
  4.48 honours both (tests/test_lease.py races 6 writers on it), as does AWS S3. A server that
  ignored the headers would let two creators both write: each reads the lease back after writing
  and only the one whose token is there goes on.
- Expiry compares the store's `renewed_at` with this machine's clock: machines must agree on the
  time to well within the TTL. A lease renewed "in the future" by this clock is reported as such.
- The fence is a read before a write, not an atomic compare-and-write across two objects: a
  holder paused between its check and its write can still land that one write. Records are
  created conditionally, so that write is never a second commit of a stage.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from types import TracebackType

from pydantic import BaseModel, ValidationError

from infra.store import ArtifactStore, VersionMismatch, current_user, utc_now

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 120.0
CLOCK_TOLERANCE_SECONDS = 5.0
"""How far ahead of this machine's clock a lease's renewal time may be before it is called "from the future"."""
FENCE_ENVIRONMENT = "HUBERT_PIPELINE_LEASE_FENCE"
"""The environment variable that hands a child process (a torchrun rank) its run's fence."""


@cache
def pid_namespace() -> str | None:
    """This process's kernel boot and PID namespace (`<boot id>/pid:[<inode>]`); None where it
    cannot be told (not Linux). Two processes with equal values see the same pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


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
    generation: int = 0  # leases from before fencing have none
    pid_namespace: str | None = None
    released_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return now > self.renewed_at + timedelta(seconds=self.ttl_seconds)

    def free(self, now: datetime) -> bool:
        """Whether the lease may be taken: released, not renewed for its TTL, or its holder gone."""
        return self.released_at is not None or self.expired(now) or self.gone()

    def gone(self) -> bool:
        """A holder that is certainly a process of this kernel and PID namespace, and no longer
        exists (SIGKILLed, crashed): its lease need not wait out the TTL. Anywhere else (another
        machine, a container sharing the host name, a lease from before the namespace was
        recorded) the pid says nothing, and a pid taken again by another process counts as alive:
        the TTL decides."""
        if self.host != socket.gethostname() or self.pid_namespace is None or self.pid_namespace != pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def seconds_ahead(self, now: datetime) -> float:
        """How far the renewal time is ahead of `now` (0 when it is not)."""
        return max(0.0, (self.renewed_at - now).total_seconds())

    def describe(self) -> str:
        flow_run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        text = (
            f"pid {self.pid} on {self.host} (user {self.user}{flow_run}), holding since {self.since.isoformat()}, "
            f"last renewed {self.renewed_at.isoformat()}, expires {self.ttl_seconds:g} s after that, generation {self.generation}"
        )
        ahead = self.seconds_ahead(utc_now())
        if ahead > CLOCK_TOLERANCE_SECONDS:
            text += (
                f"; its renewal time is {ahead:.0f} s ahead of this machine's clock: the clocks disagree, or it was written "
                "with a wrong clock (if no process is writing this run, `hubert-pipeline lease break RUN_PATH` clears it)"
            )
        return text


class LeaseHeld(RuntimeError):
    """Another live writer holds the run."""

    def __init__(self, url: str, holder: LeaseHolder) -> None:
        super().__init__(f"the run is being written by another process: {holder.describe()} (lease {url})")
        self.holder = holder


class LeaseLost(RuntimeError):
    """This process's lease was taken over or could not be renewed within its TTL: it may write no more."""

    retryable = False  # a retry would find the lease someone else's just the same


class LeaseCorrupt(RuntimeError):
    """The lease object is not a lease (empty, cut short, not JSON): nobody can tell who holds the run."""

    retryable = False

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(
            f"the run's lease {url} is unreadable ({problem}); no holder can be told from it. If no process is writing "
            f"this run, clear it with `hubert-pipeline lease break {posixpath.dirname(url)}`"
        )


def parse_holder(data: bytes, url: str) -> LeaseHolder:
    """The holder a lease object names; LeaseCorrupt naming the object when it names none."""
    try:
        return LeaseHolder.model_validate(json.loads(data))
    except (ValueError, ValidationError) as error:
        problem = "empty" if not data.strip() else f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        raise LeaseCorrupt(url, problem) from error


@dataclass(frozen=True)
class LeaseFence:
    """What a writer checks before it writes: that the run's lease is still the one its run took
    (same token, same generation). Small and picklable: it travels to Dask workers inside a stage,
    and to torchrun ranks through their environment."""

    store: ArtifactStore
    relpath: str
    token: str
    generation: int
    require_renewed: bool = False
    """Also refuse a lease not renewed within its TTL: a child process (a torchrun rank) whose run
    stopped renewing (it was SIGKILLed on another machine) stops too, though nobody took over."""

    def check(self) -> None:
        """LeaseLost unless the lease is still ours (and, with `require_renewed`, renewed within its TTL)."""
        url = self.store.url(self.relpath)
        current = self.store.read_versioned(self.relpath)
        if current is None:
            raise LeaseLost(f"fenced off: the run's lease {url} is gone (this process held generation {self.generation})")
        try:
            holder = parse_holder(current[0], url)
        except LeaseCorrupt as error:
            raise LeaseLost(f"fenced off: {error}") from error
        if holder.token != self.token or holder.generation != self.generation:
            raise LeaseLost(
                f"fenced off: the run's lease {url} is now generation {holder.generation}, held by {holder.describe()}; "
                f"this process held generation {self.generation} and may write no more"
            )
        if holder.released_at is not None:
            raise LeaseLost(f"fenced off: the run's lease {url} was released at {holder.released_at.isoformat()}")
        if self.require_renewed and holder.expired(utc_now()):
            raise LeaseLost(
                f"fenced off: the run's lease {url} was last renewed {holder.renewed_at.isoformat()}, over its TTL of "
                f"{holder.ttl_seconds:g} s ago: the run that started this process has stopped"
            )

    def environment(self) -> dict[str, str]:
        """The variable that hands this fence to a child process (`from_environment`)."""
        return {FENCE_ENVIRONMENT: json.dumps({"relpath": self.relpath, "token": self.token, "generation": self.generation})}

    @staticmethod
    def from_environment(store: ArtifactStore) -> LeaseFence | None:
        """The fence a parent process handed down (`environment`), on `store`, also refusing a lease
        its run stopped renewing; None if there is none."""
        raw = os.environ.get(FENCE_ENVIRONMENT)
        if not raw:
            return None
        fields = json.loads(raw)
        return LeaseFence(store, fields["relpath"], fields["token"], int(fields["generation"]), require_renewed=True)


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
        """Take the lease: create it, or take over a released or expired one; LeaseHeld (or wait)
        otherwise; LeaseCorrupt when the lease object is unreadable."""
        announced_wait = False
        while True:
            current = self.store.read_versioned(self.relpath)
            if current is None:
                if self._try_create():
                    return
                continue
            data, version = current
            holder = parse_holder(data, self.url)
            if holder.free(utc_now()):
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

    @property
    def fence(self) -> LeaseFence:
        """What this holder's writers check (LeaseLost if the lease is not held)."""
        if self.holder is None:
            raise LeaseLost(f"lease {self.url} is not held")
        return LeaseFence(self.store, self.relpath, self.holder.token, self.holder.generation)

    def _new_holder(self, generation: int) -> LeaseHolder:
        now = utc_now()
        return LeaseHolder(
            host=socket.gethostname(), pid=os.getpid(), user=current_user(), flow_run_id=self.flow_run_id,
            since=now, renewed_at=now, ttl_seconds=self.ttl_seconds, token=uuid.uuid4().hex,
            generation=generation, pid_namespace=pid_namespace(),
        )

    def _try_create(self) -> bool:
        holder = self._new_holder(generation=1)
        try:
            self.store.create_exclusive(self.relpath, _encode(holder))
        except FileExistsError:
            return False
        return self._confirm(holder)

    def _try_take_over(self, previous: LeaseHolder, version: str) -> bool:
        holder = self._new_holder(generation=previous.generation + 1)
        try:
            self.store.replace_if(self.relpath, _encode(holder), version)
        except VersionMismatch:
            return False
        if previous.released_at is None:
            reason = "its process is gone" if previous.gone() else f"not renewed for over {previous.ttl_seconds:g} s"
            log.warning("took over the run's lease from %s: %s (lease %s)", previous.describe(), reason, self.url)
        return self._confirm(holder)

    def _confirm(self, holder: LeaseHolder) -> bool:
        """Read the lease back: ours only if our token is there (see the module's note on S3)."""
        current = self.store.read_versioned(self.relpath)
        if current is None or parse_holder(current[0], self.url).token != holder.token:
            return False
        self.holder, self._version = holder, current[1]
        log.info("holding the run's lease %s (generation %d, ttl %g s)", self.url, holder.generation, self.ttl_seconds)
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
        """Give the lease back, if it is still ours: it stays in the store marked released, with its
        generation, so the next holder's generation is higher still."""
        if self.holder is None or self._version is None:
            return
        now = utc_now()
        released = self.holder.model_copy(update={"renewed_at": now, "released_at": now})
        try:
            self.store.replace_if(self.relpath, _encode(released), self._version)
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
                log.error("%s; this run stops at its next write", error)
                return
            except Exception as error:  # noqa: BLE001 - a store outage: keep trying until the TTL runs out
                log.warning("could not renew lease %s: %r", self.url, error)
                if time.monotonic() - last_renewed > self.ttl_seconds:
                    self._lost = f"lease {self.url} could not be renewed for {self.ttl_seconds:g} s ({error!r})"
                    log.error("%s; this run stops at its next write", self._lost)
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


def held_fence(store: ArtifactStore, folder: str) -> LeaseFence | None:
    """The fence of the lease this process holds over `folder` of `store` (the lease of the run
    folder that holds it), or the one its parent handed down; None where there is neither (stages
    run by tests, benchmarks and products, which take no lease)."""
    for lease in list(_HELD.values()):
        run_folder = posixpath.dirname(lease.relpath)
        if lease.store.root_url == store.root_url and (folder == run_folder or folder.startswith(run_folder + "/")):
            lease.check()
            return lease.fence
    return LeaseFence.from_environment(store)


def break_lease(store: ArtifactStore, relpath: str, watch_seconds: float | None = None) -> str:
    """Remove a run's lease that no live process holds, saying what it was; LeaseHeld if one does.

    The lease is watched for `watch_seconds` (default: one and a half renewal periods of its TTL,
    or of the default TTL when it is unreadable) and removed only if it did not change meanwhile:
    a live holder renews, whatever the clocks say, and a lease that changes is never removed."""
    url = store.url(relpath)
    current = store.read_versioned(relpath)
    if current is None:
        return f"no lease at {url}: nothing to break"
    data, version = current
    try:
        holder: LeaseHolder | None = parse_holder(data, url)
        what = f"the lease of {holder.describe()}"
    except LeaseCorrupt as error:
        holder, what = None, f"an unreadable lease ({str(error.__cause__ or error)[:120]})"
    if holder is not None and holder.released_at is not None:
        return f"the lease {url} was released at {holder.released_at.isoformat()}: nothing to break"
    ttl = holder.ttl_seconds if holder is not None else DEFAULT_TTL_SECONDS
    watch = 1.5 * ttl / 4 if watch_seconds is None else watch_seconds
    log.info("watching %s for %.0f s before breaking it", url, watch)
    time.sleep(watch)
    later = store.read_versioned(relpath)
    if later is None:
        return f"the lease {url} was given back meanwhile: nothing to break"
    if later[1] != version:
        raise LeaseHeld(url, parse_holder(later[0], url))
    try:
        store.remove_if(relpath, version)
    except VersionMismatch as error:
        raise RuntimeError(f"the lease {url} changed while it was being broken; left as it is") from error
    log.warning("broke %s: %s", url, what)
    return f"removed {what} at {url}"
def live_holder(store: ArtifactStore, relpath: str) -> LeaseHolder | None:
    """Who holds the lease at `relpath` now, or None where nobody does (no lease, or one that
    expired or whose process is gone, which the next writer takes over). One read: a caller can
    refuse a second writer at once, before it starts anything (the CLI does, before Prefect)."""
    current = store.read_versioned(relpath)
    if current is None:
        return None
    holder = parse_holder(current[0], store.url(relpath))
    return None if holder.free(utc_now()) else holder


def _encode(holder: LeaseHolder) -> bytes:
    return json.dumps(holder.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
