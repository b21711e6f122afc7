"""The iteration report, built from records alone: what a team reads after each iteration."""

from __future__ import annotations

import json

from tasks.audit.inspection import inspect_run
from tasks.audit.report import build_report, summary_rows
from tasks.run.records import RunRecords
from tasks.stages.catalog import STAGES
from tests.support import CommittedRun


def test_the_report_of_iteration_2_holds_every_stage_its_verdict_profile_and_plots(copied_run: CommittedRun) -> None:
    run = copied_run
    records = RunRecords(run.store, run.layout)
    report, markdown = build_report(records, 2)
    assert list(report["stages"]) == ["features", "kmeans", "labels", "reference", "train", "profile", "probe"]
    assert set(report["probes"]) == {"1", "2"} and "Downstream phone probe" in markdown
    assert report["verdict"]["summary"].startswith("iteration 2 vs 1 at equal k") and report["verdict"]["reference_pnmi"] is not None
    assert report["layer_profile"]["best_layer"] in range(1, 7)
    for name, path in report["plots"].items():
        assert run.store.read_bytes(run.layout.path(2, path))[:4] == b"\x89PNG", name
    assert set(report["plots"]) == {"training", "cluster_sizes", "quality", "layer_profile"}
    on_disk = json.loads(run.store.read_text(run.layout.report_json(2)))
    assert on_disk["lineage"]["train"]["inputs"]["labels"] == records.get("labels", 2).output_digest
    assert run.store.read_text(run.layout.report_md(2)) == markdown


def test_each_stage_is_summarised_the_way_its_log_line_and_inspect_say_it(copied_run: CommittedRun) -> None:
    run = copied_run
    records = RunRecords(run.store, run.layout).iteration(1)
    _, markdown = build_report(RunRecords(run.store, run.layout), 1)
    status = inspect_run(run.store.url(run.layout.run))
    for row in summary_rows(records):
        summary = STAGES[row["stage"]].summary(records[row["stage"]])
        assert row["key metrics"] == summary and summary in markdown
        assert status.iterations[0][row["stage"]].summary == summary
