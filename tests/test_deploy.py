"""The deployment files in infra/deploy: their commands parse with the installed tools, and they agree
with the code (the train_node resource, the malloc settings, the pinned Prefect, the config schema).

No Kubernetes or Slurm here: these checks catch a misspelt flag, a renamed resource or a config
that no longer validates, which is how deployment files usually rot.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path

import prefect
import pytest
import yaml
from distributed.cli import dask_scheduler, dask_worker
from prefect.flows import Flow

from infra.cluster import WORKER_MALLOC_ENVIRON
from tasks.run.config import PretrainConfig, _resolve_relative_paths, load_config
from tasks.stages.train.launcher import TRAIN_NODE_RESOURCE

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "infra" / "deploy"
DASK_COMMANDS = {"worker": dask_worker.main, "scheduler": dask_scheduler.main}


def shell_dask_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(subcommand, arguments) of every `.../dask worker|scheduler ...` line of a shell script."""
    text = re.sub(r"\\\n", " ", path.read_text())
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        for index, word in enumerate(words[:-1]):
            if word.endswith("/dask") and words[index + 1] in DASK_COMMANDS:
                commands.append((words[index + 1], words[index + 2 :]))
    return commands


def kubernetes_dask_commands(path: Path) -> list[tuple[str, list[str]]]:
    commands = []
    for resource in yaml.safe_load_all(path.read_text()):
        for role in ("worker", "scheduler"):
            for container in resource["spec"].get(role, {}).get("spec", {}).get("containers", []):
                args = container["args"]
                assert args[0] == "dask" and args[1] == role, (path.name, args)
                commands.append((args[1], args[2:]))
    return commands


def parsed(subcommand: str, arguments: list[str]) -> dict:
    """The options `dask <subcommand>` would run with; raises on an unknown option or bad value."""
    params = DASK_COMMANDS[subcommand].make_context(f"dask {subcommand}", list(arguments)).params
    if subcommand == "worker":  # the scheduler comes from --scheduler-file or DASK_SCHEDULER_ADDRESS
        assert params["scheduler"] is None, f"unexpected argument {params['scheduler']!r} in {arguments}"
    return params


ALL_COMMANDS = {
    "slurm": [command for script in sorted((DEPLOY / "slurm").glob("*.sbatch")) for command in shell_dask_commands(script)],
    "kubernetes": kubernetes_dask_commands(DEPLOY / "kubernetes" / "dask-cluster.yaml"),
}


@pytest.mark.parametrize("platform", sorted(ALL_COMMANDS))
def test_every_dask_command_parses_and_training_machines_declare_the_train_resource(platform: str) -> None:
    commands = [(subcommand, parsed(subcommand, arguments)) for subcommand, arguments in ALL_COMMANDS[platform]]
    assert {subcommand for subcommand, _ in commands} == {"worker", "scheduler"}, platform
    workers = [params for subcommand, params in commands if subcommand == "worker"]
    training = [params for params in workers if params["resources"]]
    assert len(training) == 1 and len(workers) == 2, platform
    assert training[0]["resources"] == f"{TRAIN_NODE_RESOURCE}=1"
    assert training[0]["n_workers"] == "1"  # one torchrun launcher per machine
    assert all(params["nthreads"] == 1 for params in workers)


def test_workers_get_the_malloc_settings_the_code_uses() -> None:
    expected = {name: str(value) for name, value in WORKER_MALLOC_ENVIRON.items()}
    for path in (DEPLOY / "Dockerfile", DEPLOY / "slurm" / "dask-workers.sbatch"):
        found = dict(re.findall(r"(MALLOC_\w+)=(\d+)", path.read_text()))
        assert found == expected, path.name


def test_the_image_holds_every_package_of_the_project() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").split(".")[0] for pattern in patterns}
    copied = set(re.findall(r"^COPY (\w+) \1$", (DEPLOY / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert packages <= copied


def test_the_prefect_server_runs_the_pinned_prefect() -> None:
    compose = yaml.safe_load((DEPLOY / "prefect-server.compose.yml").read_text())
    image = compose["services"]["prefect-server"]["image"]
    assert image.startswith(f"prefecthq/prefect:{prefect.__version__}-python3.11"), image


def test_the_cluster_run_config_validates_and_keeps_secrets_out() -> None:
    config = load_config(DEPLOY / "cluster-run.yaml")
    assert config.store.startswith("s3://") and config.dask.is_external
    assert max(iteration.train.launch.nnodes for iteration in config.iterations) > 1
    assert not config.has_credentials  # credentials come from the environment there, never from the file


def test_the_deployments_name_real_flows_and_the_cluster_one_matches_its_worker() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for deployment in deployments.values():
        path, name = deployment["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        assert isinstance(getattr(importlib.import_module(module), name), Flow), deployment["entrypoint"]
    assert load_config(REPO / deployments["demo"]["parameters"]["config_path"])

    worker = yaml.safe_load((DEPLOY / "kubernetes" / "prefect-worker.yaml").read_text())["spec"]["template"]["spec"]
    [container] = worker["containers"]
    pool = container["args"][container["args"].index("--pool") + 1]
    [mount] = container["volumeMounts"]
    cluster = deployments["cluster"]
    assert cluster["work_pool"]["name"] == pool
    assert Path(cluster["parameters"]["config_path"]).parent == Path(mount["mountPath"])
    working_directory = cluster["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert f"WORKDIR {working_directory}" in (DEPLOY / "Dockerfile").read_text()


def test_each_deployment_runs_one_flow_run_at_a_time() -> None:
    """Prefect's own reading of prefect.yaml (3.8.8's model): every deployment limits itself to one run."""
    from prefect.cli.deploy._models import PrefectYamlModel

    parsed = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    assert parsed.deployments
    for deployment in parsed.deployments:
        assert deployment.concurrency_limit is not None, deployment.name
        assert deployment.concurrency_limit.limit == 1, deployment.name
        assert deployment.concurrency_limit.collision_strategy == "ENQUEUE", deployment.name


def test_the_run_form_is_the_typed_config_with_descriptions_choices_and_no_secret_field() -> None:
    """What Prefect renders as the `pretrain` flow's form (the `form` deployment's parameters)."""
    from prefect.utilities.callables import parameter_schema

    from flows.pretrain import pretrain, pretrain_from_file
    from tasks.run.config import CREDENTIAL_KEYS

    schema = parameter_schema(pretrain).model_dump_for_openapi()
    config = schema["definitions"]["PretrainConfig"]
    assert set(config["properties"]) == set(PretrainConfig.model_fields)
    undescribed = [
        f"{name}.{field}" for name, model in schema["definitions"].items() for field, spec in model.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert undescribed == []
    named = set(re.findall(r'"(\w+)": \{', json.dumps(schema)))
    assert not CREDENTIAL_KEYS & named, CREDENTIAL_KEYS & named
    for flow in (pretrain, pretrain_from_file):
        properties = parameter_schema(flow).model_dump_for_openapi()["properties"]
        for name in ("until", "force"):
            choices = next(option["enum"] for option in properties[name]["anyOf"] if "enum" in option)
            assert choices[:3] == ["intake", "features@1", "kmeans@1"] and "profile@9" in choices
            assert properties[name]["description"].startswith(("Stop after", "Run this stage"))
        assert properties["wait_for_lease"]["description"]


def test_the_form_deployment_offers_the_demo_run() -> None:
    """Its defaults are configs/demo.yaml's run, with paths relative to the checkout (the worker's working folder)."""
    form = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}["form"]
    given = PretrainConfig.model_validate(_resolve_relative_paths(form["parameters"]["config"], REPO))
    assert given == load_config(REPO / "configs" / "demo.yaml")
