"""One plan: the run order the CLI walks is the order the tests' helper walks, and every stage of it is a stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.store import ArtifactStore
from tasks.run.config import load_config
from tasks.run.layout import RunLayout
from tasks.run.plan import PlanError, StopPoint, full_plan, plan, stages_from
from tasks.run.records import RunRecords
from tasks.stages.catalog import run_plan
from tests.support import REPO, run_cli

DEMO = REPO / "configs" / "demo.yaml"


def demo_config_file(tmp_path: Path, corpus: Path) -> Path:
    """configs/demo.yaml as it is, on the test corpus and a store of the test's own."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["store"] = str(tmp_path / "runs")
    raw["corpus"].update(source=str(corpus / "manifest.jsonl"), alignments=str(corpus / "align"))
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_plan_of_the_demo_is_intake_then_each_iteration_in_order() -> None:
    config = load_config(DEMO)
    first = ["features", "kmeans", "labels", "train", "profile", "probe"]
    later = ["features", "kmeans", "labels", "reference", "train", "profile", "probe"]  # judged at equal k against iteration 1
    assert full_plan(config) == [("intake", None)] + [(s, 1) for s in first] + [(s, 2) for s in later]
    assert plan(config, StopPoint.parse("intake")) == [("intake", None)]
    assert plan(config, StopPoint.parse("labels"))[-1] == ("labels", 1)
    assert plan(config, StopPoint.parse("probe@2")) == full_plan(config)
    assert stages_from(config, StopPoint.parse("kmeans@2"))[0] == ("kmeans", 2)


def test_a_stop_that_is_not_in_the_plan_is_refused_naming_what_is() -> None:
    config = load_config(DEMO)
    with pytest.raises(PlanError, match="the config has 2 iteration"):
        plan(config, StopPoint.parse("labels@3"))
    without_profile = config.model_copy(update={"iterations": [
        config.iterations[0], config.iterations[1].model_copy(update={"profile": config.iterations[1].profile.model_copy(update={"enabled": False})}),
    ]})
    with pytest.raises(PlanError, match="profile@2 is not a stage of this run: iteration 2 runs features, kmeans, labels, reference, train"):
        plan(without_profile, StopPoint.parse("profile@2"))
    with pytest.raises(PlanError, match="intake runs once per run"):
        StopPoint.parse("intake@1")


def test_the_cli_and_the_helper_commit_the_stages_of_the_same_plan(tmp_path: Path, demo_corpus: Path, client) -> None:
    """`run --until intake` on the demo config commits intake alone; the helper's stages up to
    kmeans@1 are the plan's, and so are the CLI's for the same stop."""
    path = demo_config_file(tmp_path, demo_corpus)
    config = load_config(path)
    run_cli(tmp_path, "run", str(path), "--until", "intake")
    records = RunRecords(ArtifactStore(config.store), RunLayout(config.run))
    assert [(stage, n) for stage, n, _ in records.committed()] == [("intake", None)]

    stop = StopPoint.parse("kmeans")
    helper_store = ArtifactStore(str(tmp_path / "helper"))
    helper_config = config.model_copy(update={"store": str(tmp_path / "helper")})
    assert list(run_plan(helper_config, helper_store, client, stop)) == plan(config, stop)
    run_cli(tmp_path, "run", str(path), "--until", "kmeans")
    records = RunRecords(ArtifactStore(config.store), RunLayout(config.run))
    assert [(stage, n) for stage, n, _ in records.committed()] == plan(config, stop)
