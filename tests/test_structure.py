"""The shape the code promises (DESIGN.md): tasks/ grouped by lifecycle with imports one way, stages
as peers, light training ranks, one module that lays out a run, and flows that only orchestrate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tasks.run.layout import STAGE_ORDER
from tasks.stages.catalog import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "model", "infra", "devtools")
GROUP_ORDER = {"corpus": 0, "run": 1, "frames": 2, "stages": 3, "products": 4, "audit": 4}
"""tasks/'s groups, each importing only groups of a lower rank (and none of its own rank but itself)."""


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_every_module_of_tasks_sits_in_a_group() -> None:
    outside = [
        str(path.relative_to(REPO)) for path in modules_of("tasks")
        if path.parent == REPO / "tasks" and path.name != "__init__.py"
    ]
    assert outside == []
    groups = {path.name for path in (REPO / "tasks").iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert groups == set(GROUP_ORDER)


def test_the_groups_of_tasks_import_one_way() -> None:
    wrong = []
    for path in modules_of("tasks"):
        if path.parent == REPO / "tasks":
            continue
        group = path.relative_to(REPO / "tasks").parts[0]
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "flows":
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
            if parts[0] != "tasks" or len(parts) < 2 or parts[1] == group:
                continue
            if GROUP_ORDER[parts[1]] >= GROUP_ORDER[group]:
                wrong.append(f"{path.relative_to(REPO)} ({group}) imports {module}")
    assert wrong == []


def test_stages_are_peers() -> None:
    """A stage's modules import no other stage; only the catalog knows them all."""
    stages_root = REPO / "tasks" / "stages"
    wrong = []
    for path in modules_of("tasks/stages"):
        own = path.relative_to(stages_root).parts[0].removesuffix(".py")
        if own in ("catalog", "__init__"):
            continue
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[:2] == ["tasks", "stages"] and len(parts) > 2 and parts[2] != own:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []
    declared = {path.stem for path in stages_root.glob("*.py")} | {path.name for path in stages_root.iterdir() if path.is_dir()}
    assert declared >= set(STAGE_ORDER)


def test_flows_hold_the_flow_and_the_cli_only_and_tasks_know_no_prefect() -> None:
    assert {path.name for path in (REPO / "flows").glob("*.py")} == {"__init__.py", "pretrain.py", "cli.py"}
    prefect = [str(path.relative_to(REPO)) for path in modules_of("tasks") if any(m.split(".")[0] == "prefect" for m in imported_modules(path))]
    assert prefect == []


def test_the_model_package_knows_no_orchestration() -> None:
    for path in modules_of("model"):
        banned = {m for m in imported_modules(path) if m.split(".")[0] in {"prefect", "distributed", "dask", "tasks", "flows", "infra", "pydantic_settings"}}
        assert banned == set(), f"model/{path.name} imports {banned}"


def test_infra_knows_nothing_of_the_pipeline() -> None:
    for path in modules_of("infra"):
        banned = {m for m in imported_modules(path) if m.split(".")[0] in {"tasks", "flows", "model"}}
        assert banned == set(), f"{path.relative_to(REPO)} imports {banned}"


def test_a_torchrun_rank_imports_neither_prefect_nor_any_other_stage() -> None:
    probe = (
        "import sys, tasks.stages.train.worker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect' "
        "or (m.startswith('tasks.stages.') and not m.startswith('tasks.stages.train'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_a_config_is_validated_without_torch() -> None:
    probe = "import sys, tasks.run.config, tasks.run.plan; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_run_paths_are_spelled_in_the_layout_module_alone() -> None:
    spelled = []
    for package in PACKAGES:
        for path in modules_of(package):
            text = path.read_text()
            for needle in ('"iter-', "iter-{", "final.pt", "train_log.json", "centroids.npy", '"_progress"', '"profile.json'):
                if needle in text:
                    spelled.append(f"{path.relative_to(REPO)}: {needle}")
    allowed = {"tasks/run/layout.py", "infra/commit.py", "tasks/products/bundle.py"}  # the run's layout; the commit protocol's folder; the bundle's
    assert [line for line in spelled if line.split(":")[0] not in allowed] == []
    assert all(not line.startswith("infra/commit.py") or '"_progress"' in line for line in spelled)


def test_every_stage_of_the_layout_is_declared_once() -> None:
    assert tuple(STAGES) == STAGE_ORDER
    assert all(spec.name == name for name, spec in STAGES.items())
