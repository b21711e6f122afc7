"""The stage skeleton: upstream records read once per stage run, afresh on the next; its clock across attempts."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.commit import Stage, clock_path, parts_in_progress
from infra.store import ArtifactStore, utc_now
from tasks.run.config import PretrainConfig
from tasks.run.stage import StageContext, StageResult, StageSpec, read_clock, record_seconds, run_stage


def commit_intake(store: ArtifactStore, context: StageContext, digest: str) -> None:
    intake = Stage(store, context.layout.stage_folder("intake", None), "intake", version=1, config={}, inputs={})
    intake.prepare([])
    intake.commit(outputs=[], output_digest=digest, started_at=utc_now())


def test_an_upstream_record_is_read_once_per_stage_run_and_afresh_by_the_next(tmp_path: Path) -> None:
    config = PretrainConfig.model_validate(
        {
            "run": "r",
            "store": str(tmp_path / "store"),
            "corpus": {"source": str(tmp_path / "wav")},
            "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 4}, "train": {"model": "tiny"}}],
        }
    )
    store = ArtifactStore(config.store)
    context = StageContext(config, store, None, 1)
    commit_intake(store, context, "first")
    one_run = context.for_one_run()
    assert one_run.upstream("features", "manifest").output_digest == "first"

    commit_intake(store, context, "second")
    assert one_run.upstream("features", "manifest").output_digest == "first"
    assert context.for_one_run().upstream("features", "manifest").output_digest == "second"
    assert context.upstream("features", "manifest").output_digest == "second"


@dataclass
class Scope:
    """A bare stage scope (tasks/run/stage.py `StageScope`): one folder of a store."""

    store: ArtifactStore

    def folder(self, stage: str) -> str:
        return "scope"

    def label(self, stage: str) -> str:
        return stage

    def for_one_run(self) -> "Scope":
        return self


def test_a_resumed_stage_counts_every_attempt_and_inspect_sees_it_running_meanwhile(tmp_path: Path, caplog) -> None:
    store = ArtifactStore(str(tmp_path))
    seen_while_running = []

    def work(scope: Scope, stage: Stage) -> StageResult:
        done = stage.done_parts()
        for part in ("a", "b"):
            if part not in done:
                time.sleep(0.3)
                stage.mark_part(part, {})
                if not done:  # the first attempt dies after its first part
                    raise OSError("lost the store")
        seen_while_running.append(read_clock(store, stage.clock_path))
        return StageResult(output_digest="d")

    spec = StageSpec(
        name="slow", version=1, outputs=(), key_config=lambda scope: {}, key_inputs=lambda scope: {}, work=work,
        summary=lambda record: "done", verify_digest=lambda committed: "d",
    )
    with pytest.raises(OSError):
        run_stage(spec, Scope(store))
    assert parts_in_progress(store, "scope", "slow") == 1
    [interrupted] = read_clock(store, clock_path("scope", "slow")).attempts
    assert interrupted["seconds"] >= 0.3  # a failed attempt's time counts in full
    with caplog.at_level(logging.INFO, logger="tasks.run.stage"):
        record = run_stage(spec, Scope(store))
    assert "slow: resuming (1 earlier attempt(s)" in caplog.text
    [clock] = seen_while_running
    assert len(clock.attempts) == 2 and clock.started_at == clock.attempts[-1]["started_at"]
    assert record.metrics["attempts"] == 2
    assert record.metrics["seconds_all_attempts"] >= interrupted["seconds"] + 0.3  # both attempts' work
    assert record.seconds >= 0.3
    assert record_seconds(record) == record.metrics["seconds_all_attempts"]
    assert not store.exists(clock_path("scope", "slow"))  # gone with the progress folder at the commit


def test_an_uninterrupted_stage_records_no_attempts(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    spec = StageSpec(
        name="quick", version=1, outputs=(), key_config=lambda scope: {}, key_inputs=lambda scope: {},
        work=lambda scope, stage: StageResult(output_digest="d"), summary=lambda record: "done",
        verify_digest=lambda committed: "d",
    )
    record = run_stage(spec, Scope(store))
    assert "attempts" not in record.metrics and record_seconds(record) == record.seconds
