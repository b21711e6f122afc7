"""The validation split: chosen stably at intake, held out of k-means and training, labelled
with the training centroids; validation during training, best.pt, and the weights the next
iteration takes (best or final, cold or warm)."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from infra.commit import forget_stage
from infra.digest import digest_bytes
from infra.parts import PartsFailed
from infra.store import ArtifactStore
from model.data import BatchShape, BatchStream
from model.hubert import LABEL_DEPENDENT, build_pretrain_model
from model.kmeans import nearest_centroids
from model.presets import HUBERT_CONFIGS, frame_geometry
from model.trainer import train
from tasks.audit.inspection import stage_status
from tasks.audit.verification import verify_run
from tasks.corpus.checks import REJECTION_SCHEMA, ProbeResults
from tasks.corpus.formats import Listing
from tasks.corpus.manifest import Manifest, Utterance, manifest_from_jsonl, utterances_table
from tasks.corpus.splits import SplitSettings, ValidSplit, hash_fraction, read_id_listing
from tasks.run.config import ConfigError, PretrainConfig, load_config
from tasks.run.preflight import input_problems
from tasks.run.records import RunRecords, load_centroids
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES
from tasks.stages.train.rank import StoreCheckpoints, StoreUtteranceSource, initial_model, trainer_settings, validation_for
from tests.support import Chain, demo_config, run_chain


def valid_config(tmp_path: Path, corpus: Path, name: str, valid: float | str | None = 0.25, **kmeans: object) -> PretrainConfig:
    """The demo corpus in one features chunk (one k-means block), so runs over different corpora sample alike."""
    raw = demo_config(tmp_path, corpus, name, **kmeans).model_dump(exclude_unset=True)
    raw["iterations"][0]["features"]["chunk_frames"] = 16384
    if valid is not None:
        raw["corpus"]["valid"] = valid
    return PretrainConfig.model_validate(raw)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def utterance(name: str) -> Utterance:
    return Utterance(id=name, path=f"/x/{name}.wav", samples=16000, sample_rate=16000, channels=1)


def intake_splits(utterances: list[Utterance], corpus: SplitSettings) -> list[Utterance]:
    """The utterances with their splits as intake sets them: folded by ProbeResults with the
    corpus's ValidSplit, then checked for an empty split."""
    rule = ValidSplit(corpus, {})
    results = ProbeResults(rule)
    results.add(0, utterances_table(utterances), REJECTION_SCHEMA.empty_table())
    taken = results.finish(Listing("files", [], "stem"))
    rule.check(taken.counts["utterances"], taken.counts["valid_utterances"])
    return list(Manifest(pq.read_table(io.BytesIO(taken.manifest))))


def test_a_fractional_split_does_not_depend_on_corpus_order_or_size() -> None:
    corpus = [utterance(f"spk{i % 7}-{i:04d}") for i in range(400)]
    config = PretrainConfig.model_validate(
        {"run": "t", "store": "/tmp/x", "corpus": {"source": "/x", "valid": 0.1}, "iterations": [
            {"features": {"kind": "mfcc"}, "kmeans": {"k": 4}, "train": {"model": "tiny"}}]}
    )
    chosen = {u.id for u in intake_splits(corpus[:200], config.corpus) if u.split == "valid"}
    shuffled = random.Random(1).sample(corpus, len(corpus))  # reordered, and twice the size
    chosen_again = {u.id for u in intake_splits(shuffled, config.corpus) if u.split == "valid"}
    assert chosen == chosen_again & {u.id for u in corpus[:200]}
    assert 8 <= len(chosen) <= 35  # about 10% of 200
    assert chosen == {u.id for u in corpus[:200] if hash_fraction(u.id, 0) < 0.1}
    assert chosen != {u.id for u in corpus[:200] if hash_fraction(u.id, 1) < 0.1}  # the seed matters
    # a JSON-lines manifest of a store made before the split existed (no "split") reads as all training
    legacy = '{"id":"a","path":"/x/a.wav","samples":16000,"sample_rate":16000,"channels":1,"speaker":null}\n'
    assert [u.split for u in Manifest(manifest_from_jsonl(legacy + legacy.replace('"a"', '"b"')))] == ["train", "train"]


@pytest.fixture(scope="module")
def split_chain(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path, client) -> Chain:
    """Iteration 1 of the demo corpus up to labels, a quarter of it held out for validation."""
    return run_chain(valid_config(tmp_path_factory.mktemp("valid"), demo_corpus, "split", k=16), client, "labels")


def test_validation_utterances_are_held_out_of_kmeans_and_labelled_by_the_training_centroids(
    split_chain: Chain, tmp_path: Path, demo_corpus: Path, client
) -> None:
    chain = split_chain
    utterances = chain.utterances
    valid = [u for u in utterances if u.split == "valid"]
    assert 0 < len(valid) < len(utterances) and chain.records["intake"].counts["valid_utterances"] == len(valid)

    # the same corpus without its validation utterances, and no split: the same centroids
    train_only = tmp_path / "train-only"
    (train_only / "wav").mkdir(parents=True)
    shutil.copytree(demo_corpus / "align", train_only / "align")
    for u in utterances:
        if u.split == "train":
            shutil.copy(u.path, train_only / "wav" / Path(u.path).name)
    alone = run_chain(valid_config(tmp_path, train_only, "alone", valid=None, k=16), client, "kmeans")
    np.testing.assert_array_equal(load_centroids(chain.store, chain.layout, 1), load_centroids(alone.store, alone.layout, 1))
    assert chain.records["kmeans"].counts["frames_fitted"] == alone.records["kmeans"].counts["frames_fitted"]

    # validation frames still get labels, from those centroids
    labels = chain.records["labels"]
    group = chain.store.open_zarr("t/iter-1/labels.zarr", "r")
    features = chain.store.open_zarr("t/iter-1/features.zarr", "r")
    offsets = group["offsets"][:]
    index = [u.id for u in utterances].index(valid[0].id)
    rows = features["features"][offsets[index] : offsets[index + 1]]
    expected = nearest_centroids(rows, load_centroids(chain.store, chain.layout, 1))[0].numpy()
    np.testing.assert_array_equal(group["labels"][offsets[index] : offsets[index + 1]], expected)
    valid_frames = sum(int(offsets[i + 1] - offsets[i]) for i, u in enumerate(utterances) if u.split == "valid")
    assert labels.counts["valid_frames"] == valid_frames and labels.counts["train_frames"] == labels.counts["frames"] - valid_frames


def test_a_listing_of_validation_ids_picks_them(tmp_path: Path) -> None:
    listing = tmp_path / "valid.txt"
    listing.write_text("b\n\nc\nnot-in-corpus\n")
    config = PretrainConfig.model_validate(
        {"run": "t", "store": "/tmp/x", "corpus": {"source": "/x", "valid": str(listing)}, "iterations": [
            {"features": {"kind": "mfcc"}, "kmeans": {"k": 4}, "train": {"model": "tiny"}}]}
    )
    split = intake_splits([utterance(name) for name in "abcd"], config.corpus)
    assert [u.split for u in split] == ["train", "valid", "valid", "train"]
    assert read_id_listing(str(write(tmp_path / "valid.tsv", "/audio\nspk/d.wav\t16000\n"))) == {"d"}
    assert read_id_listing(str(write(tmp_path / "valid.jsonl", '{"audio_filepath": "x/a.flac"}\n'))) == {"a"}
    listing.write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match="picks all 4 usable utterances: there is nothing left to train on"):
        intake_splits([utterance(name) for name in "abcd"], config.corpus)


TINY = HUBERT_CONFIGS["tiny"]
TRAIN = {"model": "tiny", "steps": 6, "max_batch_seconds": 6, "max_sample_seconds": 3, "io": {"checkpoint_every": 3},
         "logging": {"log_every": 1, "valid_every": 2}}


def two_iterations(chain: Chain, second_train: dict | None = None) -> PretrainConfig:
    """The split chain's config with short training, and a second iteration on layer 2 of the first's model."""
    raw = chain.config.model_dump(exclude_unset=True)
    first = raw["iterations"][0]
    first["train"] = TRAIN
    second = {"features": {"kind": "hubert", "layer": 2}, "kmeans": {"k": 8}, "train": second_train or TRAIN}
    raw["iterations"] = [first, second]
    return PretrainConfig.model_validate(raw)


def test_training_never_sees_validation_utterances_and_validation_resumes_exactly(split_chain: Chain) -> None:
    store, layout, utterances = split_chain.store, split_chain.layout, split_chain.utterances
    config = two_iterations(split_chain)
    settings = config.iterations[0].train
    source = StoreUtteranceSource(store, layout.labels_store(1), utterances)
    shape = BatchShape(source.geometry, frame_geometry(TINY), 6 * 16000, 3 * 16000)
    trained_on = {utterances[source.rows[i]].id for batch in BatchStream(source, shape, seed=0).buckets.epoch(0) for i in batch}
    assert trained_on == {u.id for u in utterances if u.split == "train"}

    def run(folder: str, validate: bool = True, on_log=None):
        torch.manual_seed(0)
        model = build_pretrain_model(TINY, num_classes=16)
        torch.manual_seed(1)
        stream = BatchStream(source, shape, seed=0)
        validation = validation_for(store, layout, 1, utterances, settings, torch.device("cpu"), 0, 1) if validate else None
        if validation is not None:
            validation.on_best = None  # this test writes no weights into the run
        history = train(model, stream, trainer_settings(settings), StoreCheckpoints(store, folder), torch.device("cpu"),
                        on_log=on_log, validation=validation)
        return history, None if validation is None else validation.curve

    straight, curve = run("ckpt-straight")
    assert [entry["step"] for entry in curve] == [2, 4, 6]
    assert all(np.isfinite(entry["valid_loss"]) and 0 <= entry["valid_masked_accuracy"] <= 1 for entry in curve)
    unvalidated, _ = run("ckpt-unvalidated", validate=False)  # validating leaves the training RNG streams alone
    np.testing.assert_allclose([e["loss"] for e in unvalidated], [e["loss"] for e in straight], rtol=1e-6)

    def crash_after_step_5(entry: dict) -> None:
        if entry["step"] == 5:
            raise KeyboardInterrupt("simulated stop after step 5")

    with pytest.raises(KeyboardInterrupt):
        run("ckpt-crashed", on_log=crash_after_step_5)
    torch.manual_seed(12345)
    resumed, resumed_curve = run("ckpt-crashed")
    np.testing.assert_allclose([e["loss"] for e in resumed], [e["loss"] for e in straight], rtol=1e-5)
    assert [e["step"] for e in resumed_curve] == [2, 4, 6]
    np.testing.assert_allclose([e["valid_loss"] for e in resumed_curve], [e["valid_loss"] for e in curve], rtol=1e-5)


def test_the_train_record_keeps_best_weights_and_the_next_iteration_reads_them(split_chain: Chain, client) -> None:
    store, layout = split_chain.store, split_chain.layout
    config = two_iterations(split_chain)
    record = run_stage(STAGES["train"], StageContext(config, store, client, 1))
    metrics = record.metrics
    assert [row[0] for row in metrics["valid_curve"]] == [2, 4, 6] and metrics["final_step"] == 6
    best = min(metrics["valid_curve"], key=lambda row: row[1])
    assert metrics["best_step"] == best[0] and metrics["best_valid_loss"] == pytest.approx(best[1], abs=1e-5)
    assert metrics["weights_digests"] == {
        "final": digest_bytes(store.read_bytes(layout.final_model(1))),
        "best": digest_bytes(store.read_bytes(layout.best_model(1))),
    }
    assert record.output_digest == metrics["weights_digests"]["final"]
    assert record.inputs["manifest"] == split_chain.records["intake"].output_digest

    features = run_stage(STAGES["features"], StageContext(config, store, client, 2))
    assert features.inputs["model"] == metrics["weights_digests"]["best"] == features.config["source"]["model_digest"]
    assert stage_status(RunRecords(store, layout), "features", 2).status == "done"  # `inspect`: best.pt's digest is not stale
    final_config = config.model_copy(update={"iterations": [
        config.iterations[0].model_copy(update={"train": config.iterations[0].train.model_copy(update={"weights_for_next": "final"})}),
        config.iterations[1],
    ]})
    assert run_stage(STAGES["train"], StageContext(final_config, store, client, 1)) == record  # not in train's key
    assert STAGES["features"].key_inputs(StageContext(final_config, store, client, 2))["model"] == record.output_digest


def test_a_warm_start_takes_the_previous_weights_except_the_label_dependent_ones(split_chain: Chain, client) -> None:
    store, layout = split_chain.store, split_chain.layout
    config = two_iterations(split_chain, {**TRAIN, "init": "warm"})
    run_stage(STAGES["train"], StageContext(config, store, client, 1))
    previous = torch.load(io.BytesIO(store.read_bytes(layout.best_model(1))), weights_only=False)["model"]
    warm = initial_model(config, 2, num_classes=8, store=store).state_dict()
    torch.manual_seed(config.iterations[1].train.seed)
    cold = build_pretrain_model(TINY, num_classes=8).state_dict()
    fresh = [name for name in warm if name.startswith(LABEL_DEPENDENT)]
    assert fresh and "logit_generator.label_embeddings" in fresh
    for name, value in warm.items():
        expected = cold[name] if name.startswith(LABEL_DEPENDENT) else previous[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert not torch.equal(warm["wav2vec2.encoder.transformer.layers.0.attention.out_proj.weight"],
                           cold["wav2vec2.encoder.transformer.layers.0.attention.out_proj.weight"])


BASE_CONFIG = """\
run: t
store: ./runs
corpus: {source: ./corpus, valid: 0.1}
iterations:
  - features: {kind: mfcc}
    kmeans: {k: 8}
    train: {model: tiny, steps: 10}
  - features: {kind: hubert, layer: 2}
    kmeans: {k: 8}
    train: {model: tiny, steps: 12}
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("valid: 0.1", "valid: 0.7", "corpus.valid: Value error, a validation fraction must be in (0, 0.5], got 0.7"),
        ("valid: 0.1", "valid: 0.1, valid_seed: -1", "corpus.valid_seed: Input should be greater than or equal to 0"),
        ("valid: 0.1", "valid: ids.txt, valid_seed: 3", "corpus: Value error, valid_seed is 3, but it only picks a fractional"),
        ("steps: 10}\n  -", "steps: 10, logging: {valid_every: 0}}\n  -", "iterations.1.train.logging.valid_every: Input should be greater than or equal to 1"),
        (", valid: 0.1", "", "iterations.1.train.logging.valid_every: there is no validation split"),
        ("steps: 10}\n  -", "steps: 10, weights_for_next: last}\n  -", "iterations.1.train.weights_for_next: Input should be 'best' or 'final'"),
        (", valid: 0.1", "", "iterations.1.train.weights_for_next: 'best' is chosen by validation loss, and there is no validation split"),
        ("steps: 10}\n  -", "steps: 10, init: warm}\n  -", "iterations.1.train.init: 'warm' starts from the previous iteration's weights"),
        ("tiny, steps: 12}", "base, steps: 12, init: warm}", "iterations.2.train.init: 'warm' needs iteration 1 to train the same model 'base'; it trains 'tiny'"),
        ("steps: 10}\n  -", "steps: 10, init: lukewarm}\n  -", "iterations.1.train.init: Input should be 'cold' or 'warm'"),
    ],
)
def test_each_new_setting_is_checked_before_work_starts_naming_its_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = BASE_CONFIG.replace(old, new, 1)
    if "no validation split" in expected and "weights_for_next" in expected:
        text = text.replace("steps: 10}\n  -", "steps: 10, weights_for_next: best}\n  -", 1)
    if "no validation split" in expected and "valid_every" in expected:
        text = text.replace("steps: 10}\n  -", "steps: 10, logging: {valid_every: 5}}\n  -", 1)
    assert text != BASE_CONFIG
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value), str(caught.value)


def test_a_listing_path_is_relative_to_the_config_and_the_defaults_resolve(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE_CONFIG.replace("valid: 0.1", "valid: lists/valid.txt"))
    config = load_config(path)
    assert config.corpus.valid == str(tmp_path / "lists" / "valid.txt")
    assert config.weights_for_next(1) == "best" and config.iterations[0].train.init == "cold"
    assert f"corpus.valid: the listing of validation ids {tmp_path / 'lists' / 'valid.txt'} does not exist" in input_problems(config)
    path.write_text(BASE_CONFIG.replace(", valid: 0.1", ""))
    assert load_config(path).weights_for_next(1) == "final"


def test_a_warm_start_keys_on_the_weights_it_starts_from_and_a_cold_one_keeps_its_key(split_chain: Chain, client) -> None:
    store = split_chain.store
    cold = two_iterations(split_chain)
    warm = two_iterations(split_chain, {**TRAIN, "init": "warm"})
    trained = run_stage(STAGES["train"], StageContext(warm, store, client, 1))
    for stage in ("features", "kmeans", "labels"):
        run_stage(STAGES[stage], StageContext(warm, store, client, 2))
    warm_context, cold_context = StageContext(warm, store, client, 2), StageContext(cold, store, client, 2)
    assert STAGES["train"].key_inputs(warm_context)["init"] == trained.metrics["weights_digests"]["best"]
    assert "init" not in STAGES["train"].key_inputs(cold_context)
    assert STAGES["train"].key_config(warm_context)["init"] == "warm" and "init" not in STAGES["train"].key_config(cold_context)


def test_a_replaced_best_pt_fails_verify_deep_and_is_refused_where_it_is_read(split_chain: Chain, client, tmp_path: Path) -> None:
    """best.pt replaced by other weights of the same size: the shallow checks cannot tell, `verify
    --deep` names it, and the next iteration's features refuse it, naming it, instead of using it."""
    config = two_iterations(split_chain)
    run_stage(STAGES["train"], StageContext(config, split_chain.store, client, 1))
    shutil.copytree(config.store, tmp_path / "runs")
    config = config.model_copy(update={"store": str(tmp_path / "runs")})
    store, layout = ArtifactStore(config.store), split_chain.layout
    original = store.read_bytes(layout.best_model(1))
    saved = torch.load(io.BytesIO(original), weights_only=True)
    saved["model"]["wav2vec2.encoder.transformer.layers.0.attention.out_proj.weight"] += 0.01
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    assert len(buffer.getvalue()) == len(original) and buffer.getvalue() != original
    store.write_bytes(layout.best_model(1), buffer.getvalue())

    run_path = str(tmp_path / "runs" / config.run)
    assert all(check.ok for check in verify_run(run_path))
    deep = {check.stage: check.problems for check in verify_run(run_path, deep=True)}
    assert len(deep["train@1"]) == 1 and deep["train@1"][0].startswith("model/best.pt: digest ")
    assert deep["train@1"][0].endswith("altered after the commit")
    forget_stage(store, layout.scope(2), "features")
    client.run(forget_loaded_encoders)  # the session's workers loaded the genuine best.pt for an earlier test
    with pytest.raises(PartsFailed, match=r"best.pt is not the weights its train record names .* verify --deep"):
        run_stage(STAGES["features"], StageContext(config, store, client, 2))


def forget_loaded_encoders() -> None:
    from tasks.frames import sources

    sources._ENCODERS.clear()
