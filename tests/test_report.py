"""The iteration report, built from records alone: what a team reads after each iteration."""

from __future__ import annotations

import base64
import json
import re

from tasks.audit.inspection import inspect_run
from tasks.audit.report import build_report, standalone_markdown, summary_rows
from tasks.run.records import RunRecords
from tasks.stages.catalog import STAGES
from tests.support import CommittedRun


def test_the_report_of_iteration_2_holds_every_stage_its_verdict_profile_and_plots(copied_run: CommittedRun) -> None:
    run = copied_run
    records = RunRecords(run.store, run.layout)
    built = build_report(records, 2, weights_for_next="final")
    report, markdown = built.report, built.markdown
    assert list(report["stages"]) == ["features", "kmeans", "labels", "reference", "train", "profile", "probe"]
    assert set(report["probes"]) == {"1", "2"} and "Downstream phone probe" in markdown
    assert report["verdict"]["summary"].startswith("iteration 2 vs 1 at equal k") and report["verdict"]["reference_pnmi"] is not None
    assert report["layer_profile"]["best_layer"] in range(1, 7)
    for name, path in report["plots"].items():
        assert run.store.read_bytes(run.layout.path(2, path))[:4] == b"\x89PNG", name
    assert set(report["plots"]) == {"training", "cluster_sizes", "quality", "layer_profile", "validation"}
    assert report["settings"]["weights used"].startswith("iteration 1's ") and "final" in report["settings"]["weights used"]
    assert report["settings"]["layer chosen by"] == records.get("features", 2).metrics["layer_choice"]
    assert report["settings"]["weights for the next iteration"] == "final"
    assert built.verdict_line == report["verdict"]["summary"]
    on_disk = json.loads(run.store.read_text(run.layout.report_json(2)))
    assert on_disk["lineage"]["train"]["inputs"]["labels"] == records.get("labels", 2).output_digest
    assert run.store.read_text(run.layout.report_md(2)) == markdown


def test_each_stage_is_summarised_the_way_its_log_line_and_inspect_say_it(copied_run: CommittedRun) -> None:
    run = copied_run
    records = RunRecords(run.store, run.layout).iteration(1)
    markdown = build_report(RunRecords(run.store, run.layout), 1).markdown
    status = inspect_run(run.store.url(run.layout.run))
    for row in summary_rows(records):
        summary = STAGES[row["stage"]].summary(records[row["stage"]])
        assert row["key metrics"] == summary and summary in markdown
        assert status.iterations[0][row["stage"]].summary == summary


def test_the_standalone_report_carries_its_plots_inline(committed_run: CommittedRun, tmp_path) -> None:
    run = committed_run.copied_to(tmp_path / "runs")
    built = build_report(RunRecords(run.store, run.layout), 2)
    inline = standalone_markdown(built)
    assert "](plots/" not in inline
    images = re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inline)
    assert {name for name, _ in images} == set(built.report["plots"])
    assert all(base64.b64decode(data)[:4] == b"\x89PNG" for _, data in images)
    assert built.verdict_line in inline and "## Settings" in inline
