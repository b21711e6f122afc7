"""The verdict compares like with like: an iteration's labels against the previous iteration's features
clustered at the same k, on the same frames, at the same rate; the raw change is a labelled second figure."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from infra.commit import StageRecord
from model.quality import LabelTally, phone_measures
from tasks.run.config import PretrainConfig
from tasks.run.records import RunRecords
from tasks.stages.catalog import run_plan
from tasks.stages.reference.verdict import QualityGateFailed, enforce_quality_gate, iteration_verdict
from tests.support import CommittedRun, with_settings


def record(stage: str, counts: dict, metrics: dict) -> StageRecord:
    now = datetime.now(timezone.utc)
    return StageRecord(
        stage=stage, scope="iter-2", key="k", config={}, config_digest="c", inputs={}, outputs=[], output_digest="o",
        counts=counts, metrics=metrics, started_at=now, finished_at=now, seconds=0.0, code_version="x", host="h", user="u",
    )


def labels(k: int, pnmi: float) -> StageRecord:
    return record("labels", {"k": k}, {"quality": {"pnmi": pnmi}, "agreement": {"nmi": 0.5}})


def reference(ours: float, theirs: float, k: int = 500) -> StageRecord:
    describes = {"features": "MFCC (39-dim, 100 Hz)", "iteration": 1, "k": k, "label_rate": 50.0}
    return record("reference", {"k": k}, {"describes": describes, "labels": {"pnmi": ours}, "reference": {"pnmi": theirs}})


def test_a_rise_that_comes_from_k_alone_is_not_better() -> None:
    verdict = iteration_verdict(2, labels(500, 0.602), labels(100, 0.503), reference(ours=0.598, theirs=0.693))
    assert verdict.raw_change == pytest.approx(0.099) and verdict.word == "worse"
    assert verdict.equal_k_change == pytest.approx(-0.095)
    sentence = verdict.sentence()
    assert "0.598 against 0.693" in sentence and "iteration 1's MFCC (39-dim, 100 Hz) clustered at k=500" in sentence
    assert "not comparable: k differs" in sentence
    assert verdict.as_json()["raw"] == {"pnmi": 0.602, "k": 500, "previous_pnmi": 0.503, "previous_k": 100, "change": pytest.approx(0.099)}


def test_better_and_unchanged_and_unmeasured() -> None:
    assert iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), reference(0.72, 0.69)).word == "better"
    assert iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), reference(0.69, 0.69)).word == "unchanged"
    # Within the k-means seed spread (SAME_WITHIN) either way: not a measured change.
    assert iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), reference(0.693, 0.69)).word == "unchanged"
    assert iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), reference(0.687, 0.69)).word == "unchanged"
    pending = iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), None)
    assert pending.word == "unmeasured" and "reference stage has not run" in pending.sentence()
    assert iteration_verdict(1, labels(100, 0.5), None).word == "first iteration"
    assert iteration_verdict(2, None, labels(100, 0.5)) is None


def test_the_gate_uses_the_equal_k_gain_and_names_both_figures() -> None:
    verdict = iteration_verdict(2, labels(500, 0.602), labels(100, 0.503), reference(0.598, 0.693))
    with pytest.raises(QualityGateFailed, match=r"PNMI 0\.5980, and iteration 1's MFCC .* 0\.6930: a gain of -0\.0950 at equal k"):
        enforce_quality_gate(verdict, 0.0)
    enforce_quality_gate(verdict, -0.2)


def test_a_larger_k_on_features_no_better_is_not_called_better_and_the_gate_stops_the_run(copied_run: CommittedRun, client) -> None:
    """Iteration 2 on a model of six training steps (features no better than MFCC), clustered at
    k=100 where iteration 1 has k=3: its raw PNMI rises with k, the verdict at equal k does not."""
    run = copied_run
    larger_k = with_settings(with_settings(run.config, 1, kmeans={"k": 3}), 2, kmeans={"k": 100})
    run_plan(larger_k, run.store, client, "reference@2")
    records = RunRecords(run.store, run.layout)
    verdict = iteration_verdict(2, records.get("labels", 2), records.get("labels", 1), records.get("reference", 2))
    assert verdict.raw_change > 0, "the raw PNMI rose with k"
    assert verdict.word != "better", verdict.sentence()
    measured = records.get("reference", 2).metrics
    assert measured["describes"]["k"] == 100 and measured["describes"]["label_rate"] == 50.0
    assert measured["labels"]["pnmi"] == pytest.approx(records.get("labels", 2).metrics["quality"]["pnmi"], abs=1e-9)
    assert measured["labels"]["aligned_frames"] == measured["reference"]["aligned_frames"]

    gated = PretrainConfig.model_validate({**larger_k.model_dump(), "quality_gate": {"min_pnmi_gain": 0.0}})
    with pytest.raises(QualityGateFailed) as failure:
        run_plan(gated, run.store, client, "train@2")
    message = str(failure.value)
    assert f"{measured['labels']['pnmi']:.4f}" in message and f"{measured['reference']['pnmi']:.4f}" in message


def test_phone_measures_of_a_tally_are_the_papers() -> None:
    """PNMI of labels that copy the phones is 1; of labels independent of them, 0."""
    from model.quality import PhoneSegments, frame_segments

    segments = PhoneSegments(np.array([0.0, 1.0]), np.array([1.0, 2.0]), ["a", "b"])
    times = np.arange(0.05, 2.0, 0.1)
    index = frame_segments(segments, times)
    copying, constant = LabelTally(2), LabelTally(2)
    copying.add_aligned(segments, index, (times > 1.0).astype(np.int64))
    constant.add_aligned(segments, index, np.zeros(len(times), dtype=np.int64))
    assert phone_measures(copying)["pnmi"] == pytest.approx(1.0)
    assert phone_measures(constant)["pnmi"] == pytest.approx(0.0)


def test_the_verdict_names_the_downstream_figure_of_the_model_the_labels_came_from() -> None:
    probe = record("probe", {}, {"model": {"per": 0.264}, "mfcc": {"per": 0.273}})
    verdict = iteration_verdict(2, labels(500, 0.7), labels(100, 0.5), reference(0.72, 0.69), probe)
    assert "iteration 1's model PER 0.264 against MFCC's 0.273 (probe@1)" in verdict.sentence()
    assert verdict.as_json()["probe"] == {"iteration": 1, "per": 0.264, "mfcc_per": 0.273}
