"""Two `hubert-pipeline run`s of one run at once (CLI processes): one works, one refuses naming it;
a SIGKILLed holder's lease is taken over, and the store ends as a single run's; on a local folder
and on SeaweedFS."""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from infra.commit import read_record
from infra.store import ArtifactStore
from tasks.run.layout import STAGE_ORDER, RunLayout
from tests.support import CLI, RUNS_BUCKET, cli_env, run_cli

STAGES = STAGE_ORDER[:4]  # through labels


def write_run_config(path: Path, source: Path, store: Path | str, ttl: float, storage_options: dict | None = None) -> Path:
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
    train: {{model: tiny, steps: 2}}
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
    assert not (first_store / "t" / "lease.json").exists()

    second_store = tmp_path / "second"
    config = write_run_config(tmp_path / "b.yaml", source, second_store, ttl=3)
    doomed = start_run(tmp_path, config)
    wait_for(second_store / "t" / "iter-1" / "_progress" / "features", doomed)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert (second_store / "t" / "lease.json").exists()  # left behind by the dead holder
    heir = run_cli(tmp_path, "run", str(config), "--until", "labels", "--wait")
    assert "took over the run's lease from pid" in heir.stderr and f"pid {doomed.pid} on " in heir.stderr
    assert not (second_store / "t" / "lease.json").exists()
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
    store.fs.invalidate_cache()  # s3fs answers `exists` from the listing wait_for_object made
    assert not store.exists(layout.lease)

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
    doomed_store.fs.invalidate_cache()
    assert not doomed_store.exists(layout.lease)

    local = write_run_config(tmp_path / "local.yaml", demo_corpus / "wav", tmp_path / "local", ttl=60)
    run_cli(tmp_path, "run", str(local), "--until", "labels")
    assert output_digests(root, options) == output_digests(doomed_root, options) == output_digests(tmp_path / "local")
