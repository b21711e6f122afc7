from pathlib import Path

from infra.commit import Stage
from infra.store import ArtifactStore, utc_now
from tasks.audit.diff import diff_runs


def commit(root: Path, k: int, features_digest: str) -> None:
    store = ArtifactStore(str(root))
    store.write_json("run/run.json", {"config": {"iterations": [{}]}})
    for name, config, inputs, output in (
        ("features", {"kind": "mfcc"}, {"manifest": "m"}, features_digest),
        ("kmeans", {"k": k}, {"features": features_digest}, f"centroids-{k}-{features_digest}"),
    ):
        stage = Stage(store, "run/iter-1", name, version=1, config=config, inputs=inputs)
        stage.prepare([])
        stage.commit(outputs=[], output_digest=output, started_at=utc_now())


def test_diff_names_the_changed_config_field_and_input(tmp_path: Path) -> None:
    commit(tmp_path / "a", k=100, features_digest="f1")
    commit(tmp_path / "b", k=50, features_digest="f1")
    commit(tmp_path / "c", k=100, features_digest="f2")
    same_features = {row.stage: row for row in diff_runs(str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"))["iter-1"]}
    assert same_features["features"].verdict == "same"
    assert same_features["kmeans"].verdict == "differs" and "k 100 -> 50" in same_features["kmeans"].detail
    other_features = {row.stage: row for row in diff_runs(str(tmp_path / "a" / "run"), str(tmp_path / "c" / "run"))["iter-1"]}
    assert "OUTPUT DIFFERS" in other_features["features"].detail  # same key, different bytes
    assert other_features["kmeans"].detail == "inputs: features"
