"""The README's Prefect path against a real server and a real process worker, read back through the API.

`README.md` ("Scheduling with Prefect") lists the commands; this test runs exactly them from the
checkout's root (work pool, `prefect deploy`, worker, `deployment run`) on the session's Prefect
server (tests/support.py), with a run config on the worker's disk whose storage credentials sit in
a Prefect Secret block. Then it reads back what a team would look at in the UI: the flow runs
(named and tagged after the run), their logs (the pipeline's own lines), the artifacts (the
iteration report with its plots inline and the verdict as its description, the intake table),
the run form's schema, and that no credential is in any parameter, log line or artifact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from tasks.run.config import CREDENTIAL_KEYS
from tests.support import REPO, prefect_api_url

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def readme_commands() -> list[list[str]]:
    """The Prefect commands of the README's "Scheduling with Prefect" block, as argument lists."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Scheduling with Prefect", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        words = line.split("#", 1)[0].replace("&", " ").split()
        if words and words[0].endswith("/prefect") and words[1] != "server":
            commands.append([word.strip("'") for word in words[1:]])
    return commands


def api(path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(
        f"{prefect_api_url()}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def client_env(tmp_path: Path) -> dict[str, str]:
    """A Prefect client of the session's server; the worker's flow runs import this checkout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=prefect_api_url(), PYTHONPATH=str(REPO),
    )
    return env


def prefect(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"prefect {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def save_secret_block(env: dict[str, str], name: str, value: dict[str, str]) -> None:
    code = f"from prefect.blocks.system import Secret; Secret(value={value!r}).save({name!r}, overwrite=True)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_readme_deploy_path_runs_on_a_worker_and_the_ui_shows_logs_artifacts_and_no_secret(
    tmp_path: Path, demo_corpus: Path
) -> None:
    env = client_env(tmp_path)
    run = f"scheduled-{uuid.uuid4().hex[:6]}"
    credentials = {"key": f"AKIA{uuid.uuid4().hex[:12].upper()}", "secret": f"s3cret-{uuid.uuid4().hex}"}
    block = f"creds-{run}"
    save_secret_block(env, block, credentials)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run: {run}\nstore: {tmp_path / 'runs'}\nstorage_credentials_block: {block}\n"
        f"corpus: {{source: {demo_corpus / 'wav'}, alignments: {demo_corpus / 'align'}}}\n"
        "dask: {n_workers: 1}\n"
        "iterations:\n  - features: {kind: mfcc}\n    kmeans: {k: 8}\n    train: {model: tiny, steps: 5}\n"
    )

    commands = readme_commands()
    assert [command[:2] for command in commands] == [
        ["work-pool", "create"], ["--no-prompt", "deploy"], ["worker", "start"], ["deployment", "run"],
    ], commands
    create_pool, deploy, start_worker, run_deployment = commands
    prefect(env, *create_pool)
    prefect(env, *deploy)  # failed with 422 on workers/filter under FastAPI 0.151+ (pyproject.toml)
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([str(BIN / "prefect"), *start_worker], env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT)
    try:
        prefect(
            env, *run_deployment, "--param", f"config_path={config}", "--param", "until=labels@1",
            "--watch", "--watch-timeout", "480", timeout=540,
        )
    finally:
        # Prefect's worker (its own process, not ours) at times outlives SIGTERM on a loaded
        # machine, polling a server it no longer needs: what this test checks is in the API.
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
        worker_log.close()

    # The flow runs: named after the run, tagged with it, completed.
    flow_runs = api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": [run]}}})
    names = {flow_run["name"]: flow_run for flow_run in flow_runs}
    assert set(names) == {run, f"{run}-iter-1"}, sorted(names)
    assert all(flow_run["state_type"] == "COMPLETED" for flow_run in flow_runs), [fr["state"] for fr in flow_runs]
    assert names[run]["parameters"] == {"config_path": str(config), "until": "labels@1"}

    # Their logs: the pipeline's own lines, from every stage, and where the credentials came from.
    logs = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [fr["id"] for fr in flow_runs]}}, "limit": 200})
    messages = [entry["message"] for entry in logs]
    for expected in ("intake: committed (", "features@1: committed (", "kmeans@1: committed (", "labels@1: committed (",
                     "k-means phase 1/", "holding the run's lease", f"Secret block '{block}': key, secret"):
        assert any(expected in message for message in messages), (expected, messages)
    stage_logs = [entry for entry in logs if "committed (" in entry["message"]]
    assert all(entry["task_run_id"] is not None for entry in stage_logs)  # under their task in the UI

    # The same lines in the run's store, and `inspect` names that file.
    [log_file] = (tmp_path / "runs" / run / "logs").iterdir()
    assert names[run]["id"] in log_file.name and "labels@1: committed (" in log_file.read_text()

    # The artifacts: the iteration report standing alone, its stages, the intake's table.
    artifacts = {a["key"]: a for a in api("/artifacts/filter", {"artifacts": {"key": {"like_": run}}})}
    assert set(artifacts) == {f"{run}-iter-1-report", f"{run}-iter-1-stages", f"{run}-intake"}, sorted(artifacts)
    report = artifacts[f"{run}-iter-1-report"]
    assert report["description"].startswith(f"{run} iteration 1: iteration 1: nothing to compare with (PNMI ")
    plots = re.findall(r"!\[(\w+)\]\(data:image/png;base64,[A-Za-z0-9+/=]+\)", report["data"])
    assert set(plots) == {"cluster_sizes", "quality"}, plots
    assert "## Settings" in report["data"] and "k=8" in report["data"]
    assert artifacts[f"{run}-intake"]["type"] == "table" and "no file rejected" in artifacts[f"{run}-intake"]["description"]

    # No credential anywhere Prefect keeps something of this run.
    kept = json.dumps([flow_runs, logs, list(artifacts.values())])
    assert credentials["key"] not in kept and credentials["secret"] not in kept

    # The run form: the `form` deployment's parameters are the config's fields, described, none a secret.
    form = api("/deployments/name/pretrain/form")
    schema = form["parameter_openapi_schema"]
    config_schema = schema["definitions"]["PretrainConfig"]
    assert {"run", "store", "storage_options", "storage_credentials_block", "corpus", "iterations"} <= set(config_schema["properties"])
    assert all(field.get("description") for field in config_schema["properties"].values())
    assert "labels@2" in json.dumps(schema["properties"]["until"]) and "description" in schema["properties"]["force"]
    assert not CREDENTIAL_KEYS & set(re.findall(r'"(\w+)": \{', json.dumps(schema)))


def test_a_python_call_of_the_flow_routes_its_logs_and_keeps_the_config_files_credentials_out(
    tmp_path: Path, demo_corpus: Path
) -> None:
    """`pretrain(config)` in this process (no CLI, no worker): the same logs in Prefect and in the store,
    and a credential the config file held is used but in neither Prefect's parameters nor its logs."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.pretrain import pretrain
    from tasks.run.config import load_config

    run = f"called-{uuid.uuid4().hex[:6]}"
    secret = f"s3cret-{uuid.uuid4().hex}"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"run: {run}\nstore: {tmp_path / 'runs'}\nstorage_options: {{secret: {secret}}}\n"
        f"corpus: {{source: {demo_corpus / 'wav'}}}\ndask: {{n_workers: 1}}\n"
        "iterations:\n  - features: {kind: mfcc}\n    kmeans: {k: 8}\n    train: {model: tiny, steps: 5}\n"
    )
    config = load_config(config_path)
    assert config.fsspec_options == {"secret": secret} and config.storage_options == {}
    with temporary_settings({PREFECT_API_URL: prefect_api_url(), PREFECT_HOME: str(tmp_path / "prefect-home")}):
        assert pretrain(config, until="intake") == str(tmp_path / "runs" / run)

    [flow_run] = api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": [run]}}})
    assert flow_run["name"] == run and flow_run["state_type"] == "COMPLETED"
    assert secret not in json.dumps(flow_run["parameters"]) and flow_run["parameters"]["until"] == "intake"
    logs = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200})
    assert any("intake: committed (" in entry["message"] for entry in logs) and secret not in json.dumps(logs)
    [log_file] = (tmp_path / "runs" / run / "logs").iterdir()
    assert "intake: committed (" in log_file.read_text() and secret not in log_file.read_text()
    assert secret not in (tmp_path / "runs" / run / "run.json").read_text()
