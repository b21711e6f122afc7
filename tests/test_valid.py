"""The validation split: chosen stably at intake, held out of k-means and training, labelled
with the training centroids; validation during training, best.pt, and the weights the next
iteration takes (best or final, cold or warm)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.kmeans import nearest_centroids
from tasks.artifacts import load_centroids, load_manifest
from tasks.config import ConfigError, PretrainConfig, load_config
from tasks.manifest import Utterance, manifest_to_jsonl
from tasks.splits import assign_splits, hash_fraction
from tests.conftest import demo_config, run_chain


def valid_config(tmp_path: Path, corpus: Path, name: str, valid: float | str | None = 0.25, **kmeans: object) -> PretrainConfig:
    """The demo corpus in one features chunk (one k-means block), so runs over different corpora sample alike."""
    raw = demo_config(tmp_path, corpus, name, **kmeans).model_dump(exclude_unset=True)
    raw["iterations"][0]["features"]["chunk_frames"] = 16384
    if valid is not None:
        raw["corpus"]["valid"] = valid
    return PretrainConfig.model_validate(raw)


def utterance(name: str) -> Utterance:
    return Utterance(id=name, path=f"/x/{name}.wav", samples=16000, sample_rate=16000, channels=1)


def test_a_fractional_split_does_not_depend_on_corpus_order_or_size() -> None:
    corpus = [utterance(f"spk{i % 7}-{i:04d}") for i in range(400)]
    config = PretrainConfig.model_validate(
        {"run": "t", "store": "/tmp/x", "corpus": {"source": "/x", "valid": 0.1}, "iterations": [
            {"features": {"kind": "mfcc"}, "kmeans": {"k": 4}, "train": {"model": "tiny"}}]}
    )
    chosen = {u.id for u in assign_splits(corpus[:200], config.corpus, {}) if u.split == "valid"}
    shuffled = random.Random(1).sample(corpus, len(corpus))  # reordered, and twice the size
    chosen_again = {u.id for u in assign_splits(shuffled, config.corpus, {}) if u.split == "valid"}
    assert chosen == chosen_again & {u.id for u in corpus[:200]}
    assert 8 <= len(chosen) <= 35  # about 10% of 200
    assert chosen == {u.id for u in corpus[:200] if hash_fraction(u.id, 0) < 0.1}
    assert chosen != {u.id for u in corpus[:200] if hash_fraction(u.id, 1) < 0.1}  # the seed matters
    # manifests without a split read byte for byte as before the split existed
    assert '"split"' not in manifest_to_jsonl(corpus[:3])
    assert manifest_to_jsonl([corpus[0].model_copy(update={"split": "valid"})]).rstrip().endswith('"split":"valid"}')


def test_validation_utterances_are_held_out_of_kmeans_and_labelled_by_the_training_centroids(
    tmp_path: Path, demo_corpus: Path, client
) -> None:
    chain = run_chain(valid_config(tmp_path, demo_corpus, "split", k=16), client, "labels")
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
    split = assign_splits([utterance(name) for name in "abcd"], config.corpus, {})
    assert [u.split for u in split] == ["train", "valid", "valid", "train"]
    listing.write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match="picks all 4 usable utterances: there is nothing left to train on"):
        assign_splits([utterance(name) for name in "abcd"], config.corpus, {})
