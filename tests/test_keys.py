"""Keys hold only what changes an output: measuring, logging or checkpointing a model never trains it
again, and a training whose settings changed keeps the model it replaces until it is wanted back."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.store import ArtifactStore
from tasks.run.keys import AddedLater, OutputNeutral, key_settings
from tasks.run.sections import LayerProfileConfig, TrainConfig
from tasks.stages.catalog import run_plan
from tests.support import CommittedRun, with_settings


def model_files(run: CommittedRun, iteration: int) -> dict[str, bytes]:
    """Every file of the iteration's model folder (weights, checkpoints, logs), by path."""
    folder = run.layout.path(iteration, "model")
    return {path: run.store.read_bytes(path) for path in run.store.list_objects(folder)}


def test_the_key_marks_decide_what_enters_a_key() -> None:
    train = TrainConfig(model="tiny", steps=10)
    keyed = key_settings(train)
    assert {"launch", "io", "logging", "weights_for_next", "init"}.isdisjoint(keyed)  # neutral, or added later at default
    assert keyed["steps"] == 10 and keyed["model"] == "tiny"
    assert key_settings(TrainConfig(model="tiny", steps=10, init="warm"))["init"] == "warm"
    assert key_settings(TrainConfig(model="tiny", steps=10, io={"checkpoint_every": 3}, logging={"log_every": 1})) == keyed
    assert "enabled" not in key_settings(LayerProfileConfig())
    marks = {type(mark) for field in TrainConfig.model_fields.values() for mark in field.metadata}
    assert {OutputNeutral, AddedLater} <= marks


def test_changing_how_a_model_is_measured_logged_or_checkpointed_trains_nothing_again(copied_run: CommittedRun, client) -> None:
    run = copied_run
    committed = run_plan(run.config, run.store, client)
    before = {n: committed[("train", n)] for n in (1, 2)}
    before_probe = committed[("probe", 2)]
    files = {n: model_files(run, n) for n in (1, 2)}
    # (Iteration 1's profile picks iteration 2's layer, `layer: auto`: re-measured, it may pick
    # another, which does change iteration 2's input. The last iteration's profile feeds nothing.)
    changed = with_settings(run.config, 1, train={"io": {"checkpoint_every": 2}, "logging": {"log_every": 1}})
    changed = with_settings(
        changed, 2, profile={"k": 8, "utterances": 20}, probe={"steps": 200, "train_minutes": 1.0},
        train={"io": {"prefetch_batches": 0}, "launch": {"rdzv_port": 29555}},
    )
    records = run_plan(changed, run.store, client)
    for n in (1, 2):
        assert records[("train", n)] == before[n], "train's record must be the one committed before"
        assert model_files(run, n) == files[n], "weights, checkpoints and logs must be untouched"
    profile = records[("profile", 2)]
    assert profile.metrics["k"] == 8 and profile.metrics["utterances"] == 20  # the measurements alone ran again
    assert records[("probe", 2)].key != before_probe.key and records[("probe", 2)].metrics["train_minutes"] <= 1.1


def test_a_changed_recipe_keeps_the_model_it_replaces_and_going_back_takes_it_back(copied_run: CommittedRun, client, caplog) -> None:
    run = copied_run
    original = run_plan(run.config, run.store, client, "train@2")[("train", 2)]
    original_files = model_files(run, 2)
    faster = with_settings(run.config, 2, train={"learning_rate": 1e-3})
    retrained = run_plan(faster, run.store, client, "train@2")[("train", 2)]
    assert retrained.key != original.key and retrained.finished_at > original.finished_at
    kept = run.store.list_objects(run.layout.path(2, "_kept"))
    assert any(path.endswith("final.pt") for path in kept) and any("checkpoints/step-" in path for path in kept)

    caplog.set_level("INFO")
    back = run_plan(run.config, run.store, client, "train@2")[("train", 2)]
    assert back == original, "the kept model comes back with its record, not trained again"
    assert model_files(run, 2) == original_files
    assert "took back the committed work" in caplog.text
    again = run_plan(faster, run.store, client, "train@2")[("train", 2)]
    assert again == retrained  # and the other way round: both stay, the newest one aside (keep_previous 1)


def test_keep_previous_zero_removes_the_old_model(copied_run: CommittedRun, client) -> None:
    run = copied_run
    changed = with_settings(run.config, 2, train={"learning_rate": 1e-3, "io": {"keep_previous": 0}})
    run_plan(changed, run.store, client, "train@2")
    assert run.store.list_objects(run.layout.path(2, "_kept")) == {}


@pytest.mark.parametrize("moved", ["nproc: 2", "checkpoint_every: 5", "log_every: 5"])
def test_a_flat_train_setting_from_before_the_sections_names_its_new_place(tmp_path: Path, moved: str) -> None:
    from tasks.run.config import ConfigError, load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(
        f"run: r\nstore: {tmp_path}\ncorpus: {{source: {tmp_path}}}\n"
        f"iterations:\n  - features: {{kind: mfcc}}\n    kmeans: {{k: 4}}\n    train: {{model: tiny, {moved}}}\n"
    )
    name = moved.split(":")[0]
    with pytest.raises(ConfigError, match=rf"{name} -> (launch|io|logging)\.{name}"):
        load_config(path)
    assert ArtifactStore(str(tmp_path)).list_names("r") == []
