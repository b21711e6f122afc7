from pathlib import Path

import pytest

from tasks.run.config import ConfigError, load_config

ISSUE_EXAMPLE = """\
run: demo
store: ./runs                 # local folder or s3://bucket/prefix
corpus:
  source: ./demo-corpus/wav   # a folder (recursive wav/flac), a fairseq .tsv, or a NeMo-style .jsonl
  alignments: ./demo-corpus/align   # optional: one <utt_id>.tsv per utterance, header start_sec end_sec phone
dask: {address: null}         # null: a LocalCluster sized to the machine
iterations:
  - features: {kind: mfcc}
    kmeans: {k: 100}
    train: {model: tiny, steps: 200}
  - features: {kind: hubert, layer: 6}
    kmeans: {k: 500}
    train: {model: tiny, steps: 200}
"""


def test_the_documented_config_is_accepted_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_config(path)
    assert config.run == "demo"
    assert config.store == str(tmp_path / "runs")
    assert config.corpus.source == str(tmp_path / "demo-corpus" / "wav")
    assert config.dask.address is None
    assert [it.features.kind for it in config.iterations] == ["mfcc", "hubert"]
    assert config.iterations[1].features.layer == 6
    assert config.iterations[1].kmeans.k == 500


def test_the_repository_demo_config_is_valid() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert len(config.iterations) == 2


def test_s3_paths_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("./runs", "s3://bucket/prefix"))
    assert load_config(path).store == "s3://bucket/prefix"


def test_every_invalid_field_is_reported_with_its_path(tmp_path: Path) -> None:
    bad = (
        ISSUE_EXAMPLE.replace("k: 100", "k: 1")
        .replace("{kind: hubert, layer: 6}", "{kind: hubert}")
        .replace("model: tiny, steps: 200}\n  - ", "model: tinny, steps: 200}\n  - ")
        .replace("run: demo", "run: 'has spaces'")
    ) + "colour: blue\n"
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    for expected in (
        "iterations.1.kmeans.k:",
        "iterations.2.features:",
        "kind 'hubert' needs a layer",
        "iterations.1.train.model:",
        "run:",
        "colour: Extra inputs are not permitted",
    ):
        assert expected in message, f"{expected!r} missing from:\n{message}"


def test_first_iteration_must_be_mfcc(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("{kind: mfcc}", "{kind: hubert, layer: 3}"))
    with pytest.raises(ConfigError, match="iteration 1 must use features.kind 'mfcc'"):
        load_config(path)


def test_unreadable_and_non_mapping_configs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_several_training_machines_need_an_external_cluster(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("train: {model: tiny, steps: 200}\n  -", "train: {model: tiny, steps: 200, launch: {nnodes: 2}}\n  -"))
    with pytest.raises(ConfigError, match=r"iterations\.1\.train\.launch\.nnodes is 2, which needs an external Dask cluster"):
        load_config(path)
    path.write_text(path.read_text().replace("address: null", "address: 'tcp://scheduler:8786'"))
    assert load_config(path).iterations[0].train.launch.nnodes == 2


def test_a_scheduler_file_is_an_external_cluster_and_excludes_an_address(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    with_file = ISSUE_EXAMPLE.replace("address: null", "scheduler_file: shared/scheduler.json")
    path.write_text(with_file.replace("train: {model: tiny, steps: 200}\n  -", "train: {model: tiny, steps: 200, launch: {nnodes: 2}}\n  -"))
    config = load_config(path)
    assert config.dask.scheduler_file == str(tmp_path / "shared" / "scheduler.json") and config.dask.is_external
    path.write_text(with_file.replace("scheduler_file:", "address: 'tcp://h:8786', scheduler_file:"))
    with pytest.raises(ConfigError, match="dask: Value error, give dask.address or dask.scheduler_file, not both"):
        load_config(path)


def test_only_the_last_iteration_may_leave_train_out(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    last_untrained = ISSUE_EXAMPLE.rsplit("    train:", 1)[0]
    path.write_text(last_untrained)
    assert load_config(path).iterations[1].train is None
    path.write_text(ISSUE_EXAMPLE.replace("    train: {model: tiny, steps: 200}\n  - features", "  - features", 1))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "iterations.1.train: Value error, only the last iteration may leave train out" in str(error.value)
