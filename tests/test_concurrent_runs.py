"""Two `hubert-pipeline run`s of one run at once (CLI processes): one works, one refuses naming it;
a SIGKILLed holder's lease is taken over after it expires, and the store ends as a single run's."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from infra.store import ArtifactStore, read_record
from tasks.layout import STAGE_ORDER, RunLayout
from tests.conftest import CLI, cli_env, run_cli

STAGES = STAGE_ORDER[:4]  # through labels


def write_run_config(path: Path, source: Path, store: Path, ttl: float) -> Path:
    path.write_text(
        f"""run: t
store: {store}
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


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def output_digests(store_root: Path) -> dict[str, str]:
    store, layout = ArtifactStore(str(store_root)), RunLayout("t")
    return {stage: read_record(store, layout.stage_folder(stage, 1), stage).output_digest for stage in STAGES}


@pytest.mark.slow
def test_one_writer_at_a_time_and_a_killed_writer_is_taken_over(tmp_path: Path, demo_corpus: Path) -> None:
    source = demo_corpus / "wav"
    first_store = tmp_path / "first"
    config = write_run_config(tmp_path / "a.yaml", source, first_store, ttl=60)
    holder = start_run(tmp_path, config)
    wait_for(first_store / "t" / "lease.json", holder)
    refused = run_cli(tmp_path, "run", str(config), "--until", "labels", check=False)
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
