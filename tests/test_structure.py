"""The shape the code promises (DESIGN.md): stages are peers, ranks stay light, one module lays out a run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tasks.layout import STAGE_ORDER
from tasks.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "model", "infra", "devtools")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_stage_module_imports_another_stage() -> None:
    stage_modules = sorted((REPO / "tasks" / "stages").glob("*.py"))
    assert {path.stem for path in stage_modules} >= set(STAGE_ORDER)
    for path in stage_modules:
        stages = {module for module in imported_modules(path) if module.startswith("tasks.stages")}
        assert stages == set(), f"{path.name} imports {stages}"


def test_the_model_package_knows_no_orchestration() -> None:
    for path in sorted((REPO / "model").glob("*.py")):
        banned = {m for m in imported_modules(path) if m.split(".")[0] in {"prefect", "distributed", "dask", "tasks", "flows", "infra", "pydantic_settings"}}
        assert banned == set(), f"model/{path.name} imports {banned}"


def test_a_torchrun_rank_imports_neither_prefect_nor_any_stage() -> None:
    probe = (
        "import sys, tasks.train_worker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect' or m.startswith('tasks.stages')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_run_paths_are_spelled_in_the_layout_module_alone() -> None:
    spelled = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            for needle in ('"iter-', "iter-{", "final.pt", "train_log.json", "centroids.npy", '"_progress"'):
                if needle in text:
                    spelled.append(f"{path.relative_to(REPO)}: {needle}")
    allowed = {"tasks/layout.py", "infra/store.py"}  # the run's layout; the commit protocol's own folder
    assert [line for line in spelled if line.split(":")[0] not in allowed] == []
    assert all(not line.startswith("infra/store.py") or '"_progress"' in line for line in spelled)


def test_every_stage_of_the_layout_is_declared_once() -> None:
    assert tuple(STAGES) == STAGE_ORDER
    assert all(spec.name == name for name, spec in STAGES.items())
