"""A real Prefect server: deploy the pretraining flow to a work pool, trigger it through the API, see it finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO, prefect_api_url

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def prefect_server(tmp_path: Path) -> dict[str, str]:
    """The environment of a Prefect client of the session's real server (tests/support.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=prefect_api_url())
    return env


def prefect(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"prefect {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_a_deployment_runs_through_a_work_pool(prefect_server, tmp_path: Path, demo_corpus: Path) -> None:
    env = prefect_server
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"run: scheduled\nstore: {tmp_path / 'runs'}\n"
        f"corpus: {{source: {demo_corpus / 'wav'}, alignments: {demo_corpus / 'align'}}}\n"
        "dask: {n_workers: 1}\n"
        "iterations:\n  - features: {kind: mfcc}\n    kmeans: {k: 8}\n    train: {model: tiny, steps: 5}\n"
    )
    prefect(env, "work-pool", "create", "hubert-test", "--type", "process")
    deploy = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from flows.pretrain import pretrain_from_file
deployment = pretrain_from_file.from_source(source={str(REPO)!r}, entrypoint="flows/pretrain.py:pretrain_from_file")
deployment.to_deployment(
    name="test", work_pool_name="hubert-test", parameters={{"config_path": {str(config)!r}, "until": "labels"}},
).apply()
"""
    result = subprocess.run([sys.executable, "-c", deploy], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    triggered = prefect(env, "deployment", "run", "pretrain-from-file/test")
    assert "Created flow run" in triggered.stdout
    worker = prefect(env, "worker", "start", "--pool", "hubert-test", "--run-once", timeout=600)
    (tmp_path / "worker.log").write_text(worker.stdout + worker.stderr)

    runs = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{env['PREFECT_API_URL']}/flow_runs/filter",
                data=json.dumps({"flow_runs": {"deployment_id": {"is_null_": False}}}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ).read()
    )
    assert [run["state"]["type"] for run in runs] == ["COMPLETED"], (runs[0]["state"], worker.stdout[-4000:], worker.stderr[-4000:])
    assert (tmp_path / "runs" / "scheduled" / "iter-1" / "labels.commit.json").exists()
