"""The CLI's reading tools and small promises, called in-process: storage options for an S3 run,
`diff` refusing what is not there, `export`'s default weights, `--version`, a light `--help`,
and a second writer refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.cli import EXIT_BUSY, EXIT_USAGE, main
from infra.commit import Stage
from infra.digest import digest_bytes
from infra.lease import RunLease
from infra.store import ArtifactStore, utc_now
from tasks.run.layout import RunLayout
from tasks.run.records import RunRecords
from tasks.run.stage import StageClock
from tests.support import REPO, RUNS_BUCKET, CommittedRun, write_config


def committed_stage(store: ArtifactStore, folder: str, name: str) -> None:
    stage = Stage(store, folder, name, version=1, config={"k": 8}, inputs={})
    stage.prepare([])
    stage.commit(outputs=[], output_digest="d", started_at=utc_now(), counts={"k": 8, "iterations": 3}, metrics={"inertia_per_frame": 2.5})


def a_run(store: ArtifactStore, run: str = "run") -> None:
    """A run with a run.json and a committed k-means in iteration 1."""
    store.write_json(f"{run}/run.json", {"config": {"iterations": [{}]}})
    committed_stage(store, f"{run}/iter-1", "kmeans")


def test_inspect_verify_and_diff_of_an_s3_run_take_storage_options_or_a_config(tmp_path: Path, s3, capsys) -> None:
    options = s3.storage_options()
    root = f"s3://{RUNS_BUCKET}/cli-{uuid.uuid4().hex[:8]}"
    a_run(ArtifactStore(root, options))
    run_path = f"{root}/run"
    assert main(["inspect", run_path, "--json", "--storage-options", json.dumps(options)]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"][0]["kmeans"]["status"] == "done"

    config = write_config(tmp_path / "cfg.yaml", "/nowhere", root, run="run")
    config.write_text(config.read_text() + f"storage_options: {json.dumps(options)}\n")
    assert main(["verify", run_path, "--config", str(config)]) == 0
    assert "kmeans@1: ok" in capsys.readouterr().out
    assert main(["diff", run_path, run_path, "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["iter-1"][0]["verdict"] == "same"

    assert main(["inspect", run_path, "--storage-options", "{not json"]) == EXIT_USAGE
    assert "--storage-options is not JSON" in capsys.readouterr().err
    endpoint_only = {"client_kwargs": options["client_kwargs"]} if "client_kwargs" in options else {}
    assert main(["inspect", run_path, "--storage-options", json.dumps({**endpoint_only, "key": "nobody", "secret": "wrong"})]) == EXIT_USAGE
    refused = capsys.readouterr().err
    assert f"inspect: cannot read {run_path}: " in refused and "give --storage-options JSON or --config PATH" in refused
    assert len(refused.splitlines()) == 2  # two lines, not a traceback


def test_diff_refuses_a_run_or_an_iteration_that_is_not_there(tmp_path: Path, capsys) -> None:
    a_run(ArtifactStore(str(tmp_path)))
    assert main(["diff", str(tmp_path / "runn"), str(tmp_path / "run")]) == EXIT_USAGE
    assert f"no run at {tmp_path / 'runn'}" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "run"), "--iterations", "1", "5"]) == EXIT_USAGE
    assert "has no iteration 5 (it holds iterations [1], counted from 1)" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "run"), "--iterations", "1", "1"]) == 0


def test_export_takes_the_weights_the_next_iteration_used_and_names_the_other_when_only_it_has_a_quantizer(
    copied_run: CommittedRun, tmp_path: Path, capsys
) -> None:
    """Iteration 2's features are a layer of iteration 1's final weights; here those become its
    `best` weights, and `final` another model: the default is then `best`, with its quantizer."""
    store, layout = copied_run.store, copied_run.layout
    train = store.read_json(f"{layout.scope(1)}/train.commit.json")
    used = store.read_bytes(layout.final_model(1))
    other = store.read_bytes(layout.final_model(2))
    store.write_bytes(layout.best_model(1), used)
    store.write_bytes(layout.final_model(1), other)
    train["metrics"]["weights_digests"] = {"best": digest_bytes(used), "final": digest_bytes(other)}
    store.write_json(f"{layout.scope(1)}/train.commit.json", train)
    assert RunRecords(store, layout).weights_chosen_for_next(1) == "best"

    run_path = store.url(layout.run)
    assert main(["export", run_path, "--iteration", "1", "--out", str(tmp_path / "default")]) == 0
    said = capsys.readouterr().out
    assert "iteration 1's best weights" in said and "the weights the next iteration takes" in said and "quantizer: layer" in said
    assert main(["export", run_path, "--iteration", "1", "--weights", "final", "--out", str(tmp_path / "final")]) == 0
    said = capsys.readouterr().out
    assert "no quantizer for the final weights" in said and "--weights best" in said


def test_without_a_later_iteration_export_takes_what_the_config_chose(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    layout = RunLayout("run")
    for corpus, train, expected in (
        ({"valid": 0.1}, {}, "best"), ({}, {}, "final"), ({"valid": 0.1}, {"weights_for_next": "final"}, "final"),
    ):
        store.write_json(layout.run_info, {"config": {"corpus": corpus, "iterations": [{"train": train}]}})
        assert RunRecords(store, layout).weights_chosen_for_next(1) == expected, (corpus, train)


def test_version_and_a_help_that_loads_nothing_heavy(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("hubert-pipeline 0.1.0")
    probe = (
        "import sys, flows.cli; flows.cli.build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch', 's3fs', 'infra', 'tasks', 'pydantic', 'rich', 'dask'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert loaded.strip() == "[]"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, cwd=REPO, check=True)
    assert time.monotonic() - started < 2.0  # 0.05 s measured; the bound allows a loaded machine


def test_a_second_writer_is_refused_before_anything_starts(tmp_path: Path, demo_corpus: Path, capsys) -> None:
    config = write_config(tmp_path / "cfg.yaml", demo_corpus / "wav", tmp_path / "runs")
    store = ArtifactStore(str(tmp_path / "runs"))
    with RunLease(store, "t/lease.json", ttl_seconds=60, flow_run_id="first-writer"):
        started = time.monotonic()
        assert main(["run", str(config)]) == EXIT_BUSY
        seconds = time.monotonic() - started
    said = capsys.readouterr().err
    assert "run refused: the run is being written by another process" in said and "first-writer" in said
    assert seconds < 5, f"refused after {seconds:.1f} s"
    assert not (tmp_path / "runs" / "t" / "run.json").exists()


def test_inspect_shows_a_working_stage_as_running_with_its_holder_progress_and_since(tmp_path: Path, capsys) -> None:
    store, layout = ArtifactStore(str(tmp_path)), RunLayout("run")
    store.write_json(layout.run_info, {"config": {"corpus": {}, "iterations": [{"train": {"steps": 800}}]}})
    store.write_text(layout.log(utc_now(), "flow-run-7"), "a line\n")
    train = Stage(store, layout.stage_folder("train", 1), "train", version=1, config={}, inputs={})
    train.prepare([])
    store.write_bytes(f"{layout.checkpoints(1)}/step-0000400.pt", b"")
    with StageClock(store, train.clock_path), RunLease(store, layout.lease, ttl_seconds=60, flow_run_id="flow-run-7"):
        assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
        running = json.loads(capsys.readouterr().out)
        assert main(["inspect", str(tmp_path / "run")]) == 0
        table = capsys.readouterr().out
    status = running["iterations"][0]["train"]
    assert status["status"] == "running" and status["progress"] == "step 400 of 800 (latest checkpoint)"
    assert "flow run flow-run-7" in status["holder"] and status["since"] and status["seconds"] >= 0
    assert running["logs"] == [store.url(layout.logs, name) for name in store.list_names(layout.logs)]
    assert "running" in table and "flow-run-7" in table and "log of the latest invocation" in table

    assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0  # the holder gone: what it left is partial
    assert json.loads(capsys.readouterr().out)["iterations"][0]["train"]["status"] == "partial"
    clock = store.read_json(train.clock_path)
    clock["attempts"][-1]["pid"] += 1  # an attempt of another process, while this one holds the lease
    store.write_json(train.clock_path, clock)
    with RunLease(store, layout.lease, ttl_seconds=60):
        assert main(["inspect", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"][0]["train"]["status"] == "partial"
