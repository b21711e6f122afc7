"""End to end through the `hubert-pipeline` command: a real Prefect (temporary) server, a real LocalCluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from devtools.demo_corpus import synthesize_demo_corpus
from infra.store import ArtifactStore
from tests.support import CLI, cli_env, inspect_json, run_cli, write_config

pytestmark = pytest.mark.slow


def test_run_until_features_then_a_second_run_skips_everything(tmp_path: Path, salted_corpus: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", salted_corpus, tmp_path / "runs")
    first = run_cli(tmp_path, "run", str(config), "--until", "features", temporary_server=True)
    assert "features" in first.stdout and "done" in first.stdout and "Starting temporary server" in first.stderr
    status = inspect_json(tmp_path, tmp_path / "runs" / "t")
    assert status["intake"]["status"] == "done" and status["intake"]["rejected"] == 4
    features = status["iterations"][0]["features"]
    assert features["status"] == "done" and features["dim"] == 39 and features["frame_rate"] == 100.0
    assert status["iterations"][0]["kmeans"]["status"] == "missing"

    records = sorted((tmp_path / "runs").rglob("*.commit.json"))
    before = {path: path.read_bytes() for path in records}
    second = run_cli(tmp_path, "run", str(config), "--until", "features")
    assert "intake: committed earlier" in second.stderr and "features@1: committed earlier" in second.stderr
    assert "Starting temporary server" not in second.stderr  # the session's server (tests/support.py)
    assert {path: path.read_bytes() for path in records} == before


def test_invalid_config_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("run: x\nstore: ./runs\ncorpus: {source: ./nowhere}\niterations:\n  - features: {kind: mfcc}\n    kmeans: {k: 0}\n    train: {}\n")
    result = run_cli(tmp_path, "run", str(config), check=False)
    assert result.returncode == 2
    assert "iterations.1.kmeans.k" in result.stderr
    config.write_text(config.read_text().replace("k: 0", "k: 5"))
    result = run_cli(tmp_path, "run", str(config), check=False)
    assert result.returncode == 2 and "corpus.source" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "runs").exists()


def _wait_for_chunks(progress: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(progress.glob("chunk-*.json"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} finished chunks in {progress} within {timeout} s")


def test_kill_9_during_features_then_rerun_gives_the_uninterrupted_store(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    synthesize_demo_corpus(corpus, minutes=6, seed=3)
    reference_cfg = write_config(tmp_path / "reference.yaml", corpus / "wav", tmp_path / "reference", chunk_frames=256)
    run_cli(tmp_path, "run", str(reference_cfg), "--until", "features")

    config = write_config(tmp_path / "cfg.yaml", corpus / "wav", tmp_path / "runs", chunk_frames=256)
    process = subprocess.Popen(
        [*CLI, "run", str(config), "--until", "features"], env=cli_env(tmp_path), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_chunks(tmp_path / "runs" / "t" / "iter-1" / "_progress" / "features", 5, timeout=120)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "runs" / "t" / "iter-1" / "features.commit.json").exists()
    assert inspect_json(tmp_path, tmp_path / "runs" / "t")["iterations"][0]["features"]["status"] == "partial"

    run_cli(tmp_path, "run", str(config), "--until", "features")
    resumed = inspect_json(tmp_path, tmp_path / "runs" / "t")["iterations"][0]["features"]
    assert resumed["status"] == "done" and resumed["chunks_resumed"] >= 5

    ours = ArtifactStore(str(tmp_path / "runs"))
    theirs = ArtifactStore(str(tmp_path / "reference"))
    assert ours.read_json("t/iter-1/features.commit.json")["output_digest"] == theirs.read_json(
        "t/iter-1/features.commit.json"
    )["output_digest"]
    a, b = ours.open_zarr("t/iter-1/features.zarr", "r"), theirs.open_zarr("t/iter-1/features.zarr", "r")
    for name in ("features", "offsets", "utt_ids"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_run_until_labels_reports_cluster_quality(tmp_path: Path, demo_corpus: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"""run: demo
store: {tmp_path / "runs"}
corpus: {{source: {demo_corpus / "wav"}, alignments: {demo_corpus / "align"}}}
dask: {{n_workers: 2}}
iterations:
  - features: {{kind: mfcc}}
    kmeans: {{k: 100}}
    train: {{model: tiny, steps: 200}}
"""
    )
    run_cli(tmp_path, "run", str(config), "--until", "labels")
    [iteration] = inspect_json(tmp_path, tmp_path / "runs" / "demo")["iterations"]
    assert iteration["kmeans"]["inertia_per_frame"] > 0
    assert iteration["labels"]["frames"] == iteration["features"]["frames"]
    assert set(iteration["quality"]) >= {"pnmi", "phone_purity", "cluster_purity"}
    assert iteration["train"]["status"] == "missing"
    table = run_cli(tmp_path, "inspect", str(tmp_path / "runs" / "demo")).stdout
    assert "PNMI" in table

    out = tmp_path / "fairseq"
    run_cli(tmp_path, "export-labels", str(tmp_path / "runs" / "demo"), "--out", str(out))
    assert len((out / "train.km").read_text().splitlines()) == iteration["labels"]["utterances"]
    assert len((out / "dict.km.txt").read_text().splitlines()) == 100


def test_a_failing_stage_exits_1_saying_how_to_resume(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.wav").write_text("not audio")
    config = write_config(tmp_path / "cfg.yaml", corpus, tmp_path / "runs")
    result = run_cli(tmp_path, "run", str(config), "--until", "features", check=False)
    assert result.returncode == 1
    assert "run failed: ManifestError: no usable audio" in result.stderr and "run the same command again" in result.stderr
    report = ArtifactStore(str(tmp_path / "runs")).read_json("t/corpus/intake_report.json")
    assert report["rejected"][0]["reason"] == "unreadable"
