"""The stage skeleton's reading of upstream records: once per stage run, afresh on the next."""

from pathlib import Path

from infra.commit import Stage
from infra.store import ArtifactStore, utc_now
from tasks.run.config import PretrainConfig
from tasks.run.stage import StageContext


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
