"""SIGKILL the whole pipeline during each stage in turn; every restart resumes to the uninterrupted result."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.store import ArtifactStore
from tests.support import CLI, cli_env, inspect_json, run_cli

pytestmark = pytest.mark.slow


def two_iteration_config(path: Path, corpus: Path, store: Path) -> Path:
    train = "{model: tiny, steps: 12, learning_rate: 0.002, max_batch_seconds: 4, max_sample_seconds: 2, io: {checkpoint_every: 3}, logging: {log_every: 3}}"
    path.write_text(
        f"""run: r
store: {store}
corpus: {{source: {corpus / "wav"}, alignments: {corpus / "align"}}}
dask: {{n_workers: 2}}
iterations:
  - features: {{kind: mfcc, chunk_frames: 1024}}
    kmeans: {{k: 12, max_iter: 30}}
    train: {train}
    profile: {{enabled: false}}
  - features: {{kind: hubert, layer: 2, chunk_frames: 1024}}
    kmeans: {{k: 8, max_iter: 30}}
    train: {train}
    profile: {{enabled: false}}
"""
    )
    return path


def kill_when(config: Path, tmp_path: Path, ready, what: str) -> None:
    """Start `run`, SIGKILL its whole process group as soon as `ready()` holds, check it was mid-run."""
    process = subprocess.Popen(
        [*CLI, "run", str(config)], env=cli_env(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"the run ended (exit {process.returncode}) before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_sigkill_in_every_stage_then_rerun_matches_an_uninterrupted_run(tmp_path: Path, demo_corpus: Path) -> None:
    reference_config = two_iteration_config(tmp_path / "reference.yaml", demo_corpus, tmp_path / "reference")
    run_cli(tmp_path, "run", str(reference_config))

    config = two_iteration_config(tmp_path / "cfg.yaml", demo_corpus, tmp_path / "runs")
    run = tmp_path / "runs" / "r"
    has_parts = lambda scope, stage: any((run / scope / "_progress" / stage).glob("chunk*.json"))  # noqa: E731
    committed = lambda scope, stage: (run / scope / f"{stage}.commit.json").exists()  # noqa: E731
    checkpoints = lambda scope: any((run / scope / "model" / "checkpoints").glob("step-*.pt"))  # noqa: E731
    kills = [
        ("iter-1 features", lambda: has_parts("iter-1", "features")),
        ("iter-1 kmeans", lambda: committed("iter-1", "features")),
        ("iter-1 labels", lambda: has_parts("iter-1", "labels")),
        ("iter-1 train", lambda: checkpoints("iter-1")),
        ("iter-2 features", lambda: has_parts("iter-2", "features")),
    ]
    for what, ready in kills:
        kill_when(config, tmp_path, ready, what)
        scope, stage = what.split()
        assert not committed(scope, stage), f"{what} finished before it could be killed"
        if what == "iter-1 features":  # some chunks written, no commit: inspect calls it partial, not done
            assert inspect_json(tmp_path, run)["iterations"][0]["features"]["status"] == "partial"
    run_cli(tmp_path, "run", str(config))

    status = inspect_json(tmp_path, run)
    assert all(it[stage]["status"] == "done" for it in status["iterations"] for stage in ("features", "kmeans", "labels", "train"))
    assert status["iterations"][0]["features"]["chunks_resumed"] >= 1  # the killed run's chunks were kept
    ours, theirs = ArtifactStore(str(tmp_path / "runs")), ArtifactStore(str(tmp_path / "reference"))
    resumed_features, uninterrupted = ours.open_zarr("r/iter-1/features.zarr", "r"), theirs.open_zarr("r/iter-1/features.zarr", "r")
    for name in ("features", "offsets", "utt_ids"):
        np.testing.assert_array_equal(resumed_features[name][:], uninterrupted[name][:], err_msg=name)
    for iteration in (1, 2):
        for artifact in ("features", "labels"):
            mine = ours.read_json(f"r/iter-{iteration}/{artifact}.commit.json")["output_digest"]
            assert mine == theirs.read_json(f"r/iter-{iteration}/{artifact}.commit.json")["output_digest"], (iteration, artifact)
        assert ours.read_json(f"r/iter-{iteration}/train.commit.json")["metrics"]["loss_curve"] == theirs.read_json(
            f"r/iter-{iteration}/train.commit.json"
        )["metrics"]["loss_curve"]
    resumed = ours.read_json("r/iter-1/train.commit.json")  # killed once, then resumed: both attempts' time
    # Both attempts' clock time; the record's own seconds also count writing the commit, after the clock stopped.
    assert resumed["metrics"]["attempts"] == 2 and resumed["metrics"]["seconds_all_attempts"] >= resumed["seconds"] - 1.0
    assert status["iterations"][0]["train"]["seconds"] == resumed["metrics"]["seconds_all_attempts"]
    final = [
        torch.load(io.BytesIO(store.read_bytes("r/iter-2/model/final.pt")), weights_only=False)["model"]
        for store in (ours, theirs)
    ]
    for name, tensor in final[0].items():
        np.testing.assert_array_equal(tensor.numpy(), final[1][name].numpy(), err_msg=name)

    started = time.monotonic()
    rerun = run_cli(tmp_path, "run", str(config))
    assert "committed earlier" in rerun.stderr and time.monotonic() - started < 60

    # Changing iteration 2's k re-runs k-means@2 and what follows, never what comes before.
    before = {path.relative_to(run): path.read_bytes() for path in run.rglob("*.commit.json")}
    config.write_text(config.read_text().replace("kmeans: {k: 8, max_iter: 30}", "kmeans: {k: 6, max_iter: 30}"))
    run_cli(tmp_path, "run", str(config), "--until", "labels@2")
    after = {path.relative_to(run): path.read_bytes() for path in run.rglob("*.commit.json")}
    unchanged = {str(path) for path in before if after.get(path) == before[path]}
    assert unchanged >= {"corpus/intake.commit.json", "iter-1/features.commit.json", "iter-1/kmeans.commit.json",
                         "iter-1/labels.commit.json", "iter-1/train.commit.json", "iter-2/features.commit.json"}
    assert after[Path("iter-2/kmeans.commit.json")] != before[Path("iter-2/kmeans.commit.json")]
    assert after[Path("iter-2/labels.commit.json")] != before[Path("iter-2/labels.commit.json")]
    assert inspect_json(tmp_path, run)["iterations"][1]["train"]["status"] == "stale"

    # --force re-runs a stage and everything after it even though they are committed.
    forced = run_cli(tmp_path, "run", str(config), "--until", "labels@2", "--force", "kmeans@2")
    [forcing] = [line for line in forced.stderr.splitlines() if "forcing " in line]
    assert "forcing kmeans@2, labels@2, " in forcing and "train@2" in forcing, forcing
    assert "kmeans@2: committed earlier" not in forced.stderr and "features@2: committed earlier" in forced.stderr
