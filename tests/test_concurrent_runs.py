"""Two `hubert-pipeline run`s of one run at once (CLI processes): one works, one refuses naming it;
a SIGKILLed holder's lease is taken over, and the store ends as a single run's; on a local folder
and on SeaweedFS. A holder paused past its TTL (in this PID namespace or another) is fenced off and
exits non-zero; an unreadable lease is named and `lease break` clears it."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.commit import read_record
from infra.lease import LeaseHeld, RunLease, parse_holder
from infra.store import ArtifactStore
from tasks.run.layout import STAGE_ORDER, RunLayout
from tests.support import CLI, RUNS_BUCKET, cli_env, run_cli

STAGES = STAGE_ORDER[:4]  # through labels


def write_run_config(
    path: Path, source: Path, store: Path | str, ttl: float, storage_options: dict | None = None,
    train: str = "{model: tiny, steps: 2}",
) -> Path:
    path.write_text(
        f"""run: t
store: {store}
storage_options: {json.dumps(storage_options or {})}
corpus: {{source: {source}}}
dask: {{n_workers: 2}}
lease: {{ttl_seconds: {ttl}}}
iterations:
  - features: {{kind: mfcc, chunk_frames: 2048}}
    kmeans: {{k: 8}}
    train: {train}
"""
    )
    return path


def start_run(tmp_path: Path, config: Path) -> subprocess.Popen:
    """`run --until labels` in its own session, so that it can be killed with its Dask workers."""
    return subprocess.Popen(
        [*CLI, "run", str(config), "--until", "labels"], env=cli_env(tmp_path), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def refused_while_paused(tmp_path: Path, config: Path, holder: subprocess.Popen) -> subprocess.CompletedProcess:
    """A second `run` of the same run while the holder is stopped (SIGSTOP, well within its
    lease's TTL): on a small corpus the holder could otherwise finish before the second starts."""
    os.killpg(holder.pid, signal.SIGSTOP)
    try:
        return run_cli(tmp_path, "run", str(config), "--until", "labels", check=False)
    finally:
        os.killpg(holder.pid, signal.SIGCONT)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def output_digests(store_root: Path | str, storage_options: dict | None = None) -> dict[str, str]:
    store, layout = ArtifactStore(str(store_root), storage_options), RunLayout("t")
    return {stage: read_record(store, layout.stage_folder(stage, 1), stage).output_digest for stage in STAGES}


@pytest.mark.slow
def test_one_writer_at_a_time_and_a_killed_writer_is_taken_over(tmp_path: Path, demo_corpus: Path) -> None:
    source = demo_corpus / "wav"
    first_store = tmp_path / "first"
    config = write_run_config(tmp_path / "a.yaml", source, first_store, ttl=60)
    holder = start_run(tmp_path, config)
    wait_for(first_store / "t" / "lease.json", holder)
    refused = refused_while_paused(tmp_path, config, holder)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert "run refused: the run is being written by another process: pid" in refused.stderr
    assert f"pid {holder.pid} on " in refused.stderr
    output, _ = holder.communicate(timeout=300)
    assert holder.returncode == 0, output[-3000:]
    assert parse_holder((first_store / "t" / "lease.json").read_bytes(), "lease.json").released_at is not None

    second_store = tmp_path / "second"
    config = write_run_config(tmp_path / "b.yaml", source, second_store, ttl=3)
    doomed = start_run(tmp_path, config)
    wait_for(second_store / "t" / "lease.json", doomed)  # killed while it holds the lease (its stages take a second)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert (second_store / "t" / "lease.json").exists()  # left behind by the dead holder
    heir = run_cli(tmp_path, "run", str(config), "--until", "labels", "--wait")
    assert "took over the run's lease from pid" in heir.stderr and f"pid {doomed.pid} on " in heir.stderr
    assert parse_holder((second_store / "t" / "lease.json").read_bytes(), "lease.json").released_at is not None
    assert output_digests(second_store) == output_digests(first_store)


def wait_for_object(store: ArtifactStore, relpath: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not store.list_names(relpath):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{store.url(relpath)} never appeared"
        time.sleep(0.3)


@pytest.mark.slow
def test_one_writer_at_a_time_on_s3(tmp_path: Path, demo_corpus: Path, s3) -> None:
    """The same on SeaweedFS, where the lease is a conditional PUT: the refused run names the
    holder, a SIGKILLed holder is taken over, and the store equals a local single run's."""
    options = s3.storage_options()
    root = f"s3://{RUNS_BUCKET}/concurrent-{uuid.uuid4().hex[:8]}"
    store, layout = ArtifactStore(root, options), RunLayout("t")
    config = write_run_config(tmp_path / "s3.yaml", demo_corpus / "wav", root, ttl=60, storage_options=options)
    holder = start_run(tmp_path, config)
    wait_for_object(store, layout.run, holder)  # the lease is the run's first object
    refused = refused_while_paused(tmp_path, config, holder)
    assert refused.returncode == 3 and f"pid {holder.pid} on " in refused.stderr, refused.stderr[-3000:]
    output, _ = holder.communicate(timeout=300)
    assert holder.returncode == 0, output[-3000:]
    assert parse_holder(store.read_bytes(layout.lease), layout.lease).released_at is not None

    doomed_root = f"{root}-doomed"
    doomed_config = write_run_config(tmp_path / "doomed.yaml", demo_corpus / "wav", doomed_root, ttl=60, storage_options=options)
    doomed_store = ArtifactStore(doomed_root, options)
    doomed = start_run(tmp_path, doomed_config)
    wait_for_object(doomed_store, posixpath.join(layout.scope(1), "_progress", "features"), doomed)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    doomed_store.fs.invalidate_cache()
    assert doomed_store.exists(layout.lease)  # left behind by the killed holder
    heir = run_cli(tmp_path, "run", str(doomed_config), "--until", "labels")
    assert "took over the run's lease from pid" in heir.stderr and f"pid {doomed.pid} on " in heir.stderr
    assert parse_holder(doomed_store.read_bytes(layout.lease), layout.lease).released_at is not None

    local = write_run_config(tmp_path / "local.yaml", demo_corpus / "wav", tmp_path / "local", ttl=60)
    run_cli(tmp_path, "run", str(local), "--until", "labels")
    assert output_digests(root, options) == output_digests(doomed_root, options) == output_digests(tmp_path / "local")


TRAINED = ("intake", "features", "kmeans", "labels", "train")  # iteration 1 through train


TRAINING = "{model: tiny, steps: 10, max_batch_seconds: 2, max_sample_seconds: 1, io: {checkpoint_every: 2}, logging: {log_every: 2}}"
"""Long enough to pause a run mid-training: a checkpoint every 2 of 10 steps."""


def write_training_config(path: Path, source: Path, store: Path, ttl: float) -> Path:
    return write_run_config(path, source, store, ttl, train=TRAINING)


@pytest.fixture(scope="module")
def single_training_run(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path) -> dict[str, str]:
    """The output digests of one uninterrupted CLI run of the same config through train, what two
    racing runs must give (run the way they are: a model trained in this test process could differ
    in its last bits, torch's thread count here being the test suite's)."""
    tmp_path = tmp_path_factory.mktemp("single")
    config = write_training_config(tmp_path / "single.yaml", demo_corpus / "wav", tmp_path / "store", ttl=60)
    run_cli(tmp_path, "run", str(config), "--until", "train")
    return stage_digests(tmp_path / "store", TRAINED)


def stage_digests(store_root: Path, stages: tuple[str, ...]) -> dict[str, str]:
    store, layout = ArtifactStore(str(store_root)), RunLayout("t")
    return {stage: read_record(store, layout.stage_folder(stage, 1), stage).output_digest for stage in stages}


def record_files(store_root: Path) -> dict[str, bytes]:
    """Every stage record and the trained weights, as bytes: what a second commit would change."""
    run = store_root / "t"
    return {str(path.relative_to(run)): path.read_bytes() for path in [*run.rglob("*.commit.json"), *run.rglob("final.pt")]}


def wait_for_file(path: Path, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def in_another_pid_namespace(command: list[str]) -> list[str]:
    """`command` as a process of a new PID namespace (and /proc), with a pid there that no process has
    on this side: a pid check from here would find it dead at once (tests/test_lease.py has the rule)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is absent")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid --fork --mount-proc is not permitted here: {probe.stderr.strip()}")
    free = next((pid for pid in range(8, 400) if not os.path.exists(f"/proc/{pid}")), None)
    if free is None:
        pytest.skip("no low pid is free on this side to give the holder")
    launcher = (
        "import os, subprocess, sys\n"
        f"while True:\n    child = os.fork()\n    if child == 0: os._exit(0)\n    os.waitpid(child, 0)\n"
        f"    if child >= {free - 1}: break\n"
        "sys.exit(subprocess.call(sys.argv[1:]))\n"
    )
    return ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", launcher, *command]


@pytest.mark.slow
@pytest.mark.parametrize("namespace", ["this", "another"], ids=["same-namespace", "other-pid-namespace"])
def test_a_writer_paused_past_its_ttl_is_fenced_off_and_exits_non_zero(
    tmp_path: Path, demo_corpus: Path, single_training_run: dict[str, str], namespace: str
) -> None:
    """The first run is SIGSTOPped mid-training for longer than its lease's TTL; the second takes the
    lease over, resumes from the first's checkpoint and commits every stage; the first, continued,
    commits nothing (its records and weights stay the second's), exits non-zero saying why, and the
    store equals a single run's. With the holder in another PID namespace, the second never judges
    it dead by its pid: while it renews, it holds the run."""
    store_root = tmp_path / "store"
    config = write_training_config(tmp_path / "race.yaml", demo_corpus / "wav", store_root, ttl=4)
    command = [*CLI, "run", str(config), "--until", "train"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:  # a file, not a pipe: a paused reader must not block the writer
        first = subprocess.Popen(
            command if namespace == "this" else in_another_pid_namespace(command), env=cli_env(tmp_path),
            start_new_session=True, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_file(store_root / "t" / "iter-1" / "model" / "checkpoints" / "step-0000002.pt", first, log)
        if namespace == "another":
            holder = parse_holder((store_root / "t" / "lease.json").read_bytes(), "lease.json")
            assert not os.path.exists(f"/proc/{holder.pid}")  # dead by pid from here, yet alive
            with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on "):
                RunLease(ArtifactStore(str(store_root)), RunLayout("t").lease, ttl_seconds=4).acquire()
        os.killpg(first.pid, signal.SIGSTOP)
        second = run_cli(tmp_path, "run", str(config), "--until", "train", "--wait")
        assert "took over the run's lease from pid" in second.stderr and "not renewed for over 4 s" in second.stderr
        committed = record_files(store_root)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    try:
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    output = log.read_text()
    assert first.returncode not in (0, None), output[-3000:]
    assert "run stopped: fenced off" in output or "was taken over by another process" in output, output[-3000:]
    assert record_files(store_root) == committed  # the first wrote no record and no weights after it was continued
    assert parse_holder((store_root / "t" / "lease.json").read_bytes(), "lease.json").generation == 2
    assert stage_digests(store_root, TRAINED) == single_training_run


@pytest.mark.slow
def test_an_empty_lease_is_named_and_lease_break_clears_it(tmp_path: Path, demo_corpus: Path) -> None:
    """An empty lease.json (a lost machine's unsynced write): `run` names it and says how to clear it;
    `lease break` clears it after watching it (tests/test_lease.py: a lease renewed meanwhile stays)."""
    store_root = tmp_path / "store"
    config = write_run_config(tmp_path / "a.yaml", demo_corpus / "wav", store_root, ttl=60)
    (store_root / "t").mkdir(parents=True)
    (store_root / "t" / "lease.json").write_bytes(b"")
    refused = run_cli(tmp_path, "run", str(config), "--until", "intake", check=False)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert f"lease {store_root}/t/lease.json is unreadable (empty)" in refused.stderr
    assert f"hubert-pipeline lease break {store_root}/t" in refused.stderr
    broken = run_cli(tmp_path, "lease", "break", str(store_root / "t"), "--watch", "1")
    assert "removed an unreadable lease" in broken.stdout
    assert not (store_root / "t" / "lease.json").exists()
