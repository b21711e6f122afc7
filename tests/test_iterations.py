"""Iterations measured and gated: layer profiles, `layer: auto`, the verdict, the quality gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from model.data import map_labels
from tasks.audit.inspection import inspect_run
from tasks.frames.store import stored_geometry
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import RunRecords
from tasks.run.run_info import forget_stages
from tasks.stages.catalog import run_plan
from tasks.stages.reference.verdict import QualityGateFailed
from tests.support import CommittedRun, two_iteration_config


def records_of(run: CommittedRun) -> dict:
    """The run's committed records by (stage, iteration)."""
    return {(stage, n): record for stage, n, record in RunRecords(run.store, run.layout).committed()}


@pytest.fixture(scope="module")
def measured_run(committed_run: CommittedRun):
    """The session's two-iteration run: iteration 2 on the layer `auto` picked from iteration 1's profile."""
    return committed_run.config, committed_run.store, records_of(committed_run)


def test_the_layer_profile_measures_every_layer_and_auto_takes_the_best(measured_run) -> None:
    _, _, records = measured_run
    profile = records[("profile", 1)].metrics
    assert [row["layer"] for row in profile["layers"]] == [1, 2, 3, 4, 5, 6]
    assert profile["utterances"] == 24 and profile["k"] == 12
    for row in [*profile["layers"], profile["mfcc"]]:
        assert 0 < row["pnmi"] < 1 and 0 < row["phone_purity"] <= 1 and 0 < row["cluster_purity"] <= 1
        assert 0 <= row["speaker_probe_accuracy"] <= 1  # the manifest names speakers
    best = max(profile["layers"], key=lambda row: row["pnmi"])
    assert profile["best_layer"] == best["layer"]
    features = records[("features", 2)]
    assert features.metrics["layer"] == best["layer"] and features.config["source"]["layer"] == best["layer"]
    assert "highest PNMI" in features.metrics["layer_choice"] and features.config["layer"] == "auto"


def test_the_verdict_gives_the_pnmi_change_and_the_agreement_of_the_two_label_sets(measured_run) -> None:
    config, store, records = measured_run
    layout = RunLayout(config.run)
    first, second = (store.open_zarr(layout.labels_store(i), "r") for i in (1, 2))
    first_labels, first_offsets, second_offsets = first["labels"][:].astype(np.int64), first["offsets"][:], second["offsets"][:]
    mapped = []
    for index in range(len(second_offsets) - 1):
        earlier = torch.from_numpy(first_labels[first_offsets[index] : first_offsets[index + 1]])
        frames = int(second_offsets[index + 1] - second_offsets[index])
        mapped.append(map_labels(earlier, stored_geometry(first), stored_geometry(second), frames).numpy())
    expected_nmi = normalized_mutual_info_score(np.concatenate(mapped), second["labels"][:])
    agreement = records[("labels", 2)].metrics["agreement"]
    assert agreement["nmi"] == pytest.approx(expected_nmi, rel=1e-9) and agreement["previous_iteration"] == 1

    status = inspect_run(str(Path(config.store) / config.run)).as_json()
    first_verdict, verdict = (iteration["verdict"] for iteration in status["iterations"])
    assert first_verdict["verdict"] == "first iteration"
    measured = records[("reference", 2)].metrics
    assert verdict["pnmi"] == measured["labels"]["pnmi"] and verdict["reference_pnmi"] == measured["reference"]["pnmi"]
    change = measured["labels"]["pnmi"] - measured["reference"]["pnmi"]
    assert verdict["verdict"] == ("better" if change > 1e-4 else "worse" if change < -1e-4 else "unchanged")
    pnmi = [records[("labels", i)].metrics["quality"]["pnmi"] for i in (1, 2)]
    assert verdict["raw"]["change"] == pytest.approx(pnmi[1] - pnmi[0]) and verdict["raw"]["previous_k"] == 12
    assert verdict["nmi_with_previous"] == agreement["nmi"]


def test_the_quality_gate_stops_a_run_before_training_on_worse_labels(copied_run: CommittedRun, client) -> None:
    config, store, records = copied_run.config, copied_run.store, records_of(copied_run)
    forget_stages(store, copied_run.layout, [("reference", 2), ("train", 2), ("profile", 2)])
    store.remove(copied_run.layout.path(2, "model"))
    gated = PretrainConfig.model_validate({**config.model_dump(), "quality_gate": {"min_pnmi_gain": 0.9}})  # a gain no run reaches
    with pytest.raises(QualityGateFailed) as failure:
        run_plan(gated, store, client, "train@2")
    measured = records[("reference", 2)].metrics
    message = str(failure.value)
    assert f"{measured['labels']['pnmi']:.4f}" in message and f"{measured['reference']['pnmi']:.4f}" in message
    assert "min_pnmi_gain" in message and "at equal k" in message
    assert not store.exists(copied_run.layout.final_model(2)), "the gate must stop the stage before any training"


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"quality_gate": {"min_pnmi_gain": 0.0}, "corpus": {"source": "x"}}, "quality_gate compares PNMI"),
        ({"corpus": {"source": "x"}}, "iterations.2.features.layer 'auto'"),
    ],
)
def test_new_settings_are_checked_before_work(tmp_path: Path, demo_corpus: Path, change: dict, path: str) -> None:
    raw = two_iteration_config(tmp_path / "runs", demo_corpus).model_dump()
    raw.update(change)
    with pytest.raises(ValueError, match=path):
        PretrainConfig.model_validate(raw)
