"""End to end through the `hubert-pipeline` command: a real Prefect (temporary) server, a real LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.store import ArtifactStore
from tests.support import inspect_json, run_cli, write_config

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
