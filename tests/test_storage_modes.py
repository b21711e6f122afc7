"""Features without the disk: `features.keep: sample` (store only the k-means sample, compute the rest
on the fly when labelling) and `features.dtype: float16`, each against the plain float32 store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from infra.store import ArtifactStore
from model.kmeans import nearest_centroids
from tasks.audit.inspection import inspect_run, render_table
from tasks.audit.verification import verify_run
from tasks.frames.chunks import chunk_grid, frame_offsets
from tasks.frames.labelling import LabelFeatures, plan_label_jobs
from tasks.frames.sources import MfccSource
from tasks.frames.store import stored_geometry
from tasks.run.config import PretrainConfig
from tasks.run.keys import key_settings
from tasks.run.layout import RunLayout
from tasks.run.records import load_centroids
from tasks.run.run_info import write_run_info
from tasks.run.sections import FeaturesConfig
from tasks.stages.catalog import run_plan
from tasks.stages.labels.stage import FrameCountMismatch, StoredFrames, check_frame_counts
from tests.support import Chain, run_chain

LAYOUT = RunLayout("t")
TINY_TRAIN = {
    "model": "tiny", "steps": 4, "max_batch_seconds": 4, "max_sample_seconds": 2, "io": {"checkpoint_every": 4},
    "logging": {"log_every": 2},
}


def config_for(
    store: Path, source: Path, iterations: list[dict[str, Any]], **corpus: Any
) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {"run": "t", "store": str(store), "corpus": {"source": str(source), **corpus}, "iterations": iterations}
    )


def mfcc_iteration(k: int = 16, **features: Any) -> dict[str, Any]:
    return {
        "features": {"kind": "mfcc", "chunk_frames": 2048, **features},
        "kmeans": {"k": k, "sample_fraction": 0.3, "seed": 1},
        "train": TINY_TRAIN,
        "profile": {"enabled": False},
    }


def nearest_by_chunk(features: np.ndarray, centroids: np.ndarray, chunk_frames: int) -> np.ndarray:
    """Every frame's nearest centroid, computed chunk by chunk of the grid as the label tasks do."""
    return np.concatenate(
        [
            nearest_centroids(features[chunk.start : chunk.stop], centroids)[0].numpy()
            for chunk in chunk_grid(features.shape[0], chunk_frames)
        ]
    )


def deep_findings(chain: Chain) -> dict[str, list[str]]:
    return {check.stage: check.problems for check in verify_run(str(Path(chain.config.store) / "t"), deep=True)}


def test_storage_settings_at_their_defaults_leave_the_key_as_it_was() -> None:
    assert key_settings(FeaturesConfig(kind="mfcc", chunk_frames=2048)) == {"kind": "mfcc", "layer": None, "chunk_frames": 2048}
    assert key_settings(FeaturesConfig(kind="mfcc", dtype="float16")) == {
        "kind": "mfcc", "layer": None, "chunk_frames": None, "dtype": "float16",
    }


def test_keeping_a_sample_of_everything_is_refused_before_work() -> None:
    iteration = {"features": {"kind": "mfcc", "keep": "sample"}, "kmeans": {"k": 8}, "train": TINY_TRAIN, "profile": {"enabled": False}}
    with pytest.raises(ValueError, match="keep 'sample' stores only the frames k-means fits on"):
        config_for(Path("/tmp/unused"), Path("/tmp/unused"), [iteration])
    capped = {**iteration, "kmeans": {"k": 8, "max_frames": 5000}}
    assert config_for(Path("/tmp/unused"), Path("/tmp/unused"), [capped]).iterations[0].features.keep == "sample"


@pytest.fixture(scope="module")
def mfcc_pair(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path, client) -> tuple[Chain, Chain]:
    """The same run with `keep: sample` and with `keep: all`, up to labels, with a validation split."""
    root = tmp_path_factory.mktemp("keep")
    split = {"alignments": str(demo_corpus / "align"), "valid": 0.2}
    chains = []
    for keep in ("sample", "all"):
        config = config_for(root / keep, demo_corpus / "wav", [mfcc_iteration(keep=keep)], **split)
        write_run_info(ArtifactStore(config.store), config)
        chains.append(run_chain(config, client, "labels"))
    return chains[0], chains[1]


def test_a_sample_store_holds_only_the_training_utterances_kmeans_fits_on(mfcc_pair) -> None:
    sample, everything = mfcc_pair
    utterances = sample.utterances
    group = sample.store.open_zarr(LAYOUT.features_store(1), "r")
    whole = everything.store.open_zarr(LAYOUT.features_store(1), "r")
    indices = group["utt_indices"][:]
    assert list(group["utt_ids"][:]) == [utterances[i].id for i in indices]
    assert all(utterances[i].split != "valid" for i in indices)
    assert 0 < len(indices) < sum(u.split != "valid" for u in utterances)
    frames = np.diff(whole["offsets"][:])
    training_frames = sum(int(frames[i]) for i, u in enumerate(utterances) if u.split != "valid")
    assert 0.3 * training_frames <= group["features"].shape[0] < 0.3 * training_frames + frames.max()
    np.testing.assert_array_equal(np.diff(group["offsets"][:]), frames[indices])
    all_offsets, all_values = whole["offsets"][:], whole["features"][:]
    expected = np.concatenate([all_values[all_offsets[i] : all_offsets[i + 1]] for i in indices])
    np.testing.assert_array_equal(group["features"][:], expected)
    assert sample.records["kmeans"].counts["frames_fitted"] == group["features"].shape[0]
    assert dict(group.attrs)["keep"] == "sample" and sample.records["features"].counts["corpus_frames"] == all_values.shape[0]
    assert sample.records["features"].objects["features.zarr"].bytes < 0.5 * everything.records["features"].objects["features.zarr"].bytes


def test_keep_sample_labels_equal_keep_all_labels_with_the_same_centroids(mfcc_pair) -> None:
    sample, everything = mfcc_pair
    labels = sample.store.open_zarr(LAYOUT.labels_store(1), "r")
    whole = everything.store.open_zarr(LAYOUT.features_store(1), "r")
    centroids = load_centroids(sample.store, LAYOUT, 1)
    expected = nearest_by_chunk(whole["features"][:], centroids, 2048)
    np.testing.assert_array_equal(labels["labels"][:], expected)
    np.testing.assert_array_equal(labels["offsets"][:], whole["offsets"][:])
    assert labels["labels"].chunks == everything.store.open_zarr(LAYOUT.labels_store(1), "r")["labels"].chunks
    record = sample.records["labels"]
    assert record.counts["frames"] == whole["features"].shape[0] and record.inputs["manifest"]
    assert record.config["features"]["source"]["recipe"] == "kaldi-mfcc13+d+dd"
    assert 0 < record.metrics["quality"]["pnmi"] < 1 and "float16_agreement" not in record.metrics
    features = sample.store.open_zarr(LAYOUT.features_store(1), "r")
    held = StoredFrames.read(features, features["features"], with_indices=True)
    labelled = StoredFrames.read(labels, labels["labels"])
    assert held.indices is not None and len(held.indices) < len(sample.utterances)
    check_frame_counts(sample.utterances, stored_geometry(features), held, labelled)
    shortened = [*sample.utterances[:-1], sample.utterances[-1].model_copy(update={"samples": sample.utterances[-1].samples - 800})]
    with pytest.raises(FrameCountMismatch, match=sample.utterances[-1].id):
        check_frame_counts(shortened, stored_geometry(features), held, labelled)


def test_features_computed_on_the_fly_are_rounded_as_the_store_would_hold_them(mfcc_pair) -> None:
    """So that `keep: sample` labels equal `keep: all` ones in float16 too (where rounding flips a label)."""
    utterances = mfcc_pair[0].utterances
    source = MfccSource()
    job = plan_label_jobs(utterances, frame_offsets(utterances, source.geometry.num_frames), 2048, 2)[0]
    features = LabelFeatures("float16", source, {}, checked=frozenset({1}))
    rows, computed = features.read(job)
    assert rows.dtype == np.float16 and computed.dtype == np.float32 and rows.shape == (4096, 39)
    np.testing.assert_array_equal(rows, computed.astype(np.float16))
    centroids = load_centroids(mfcc_pair[0].store, LAYOUT, 1)
    labels = nearest_centroids(rows, centroids)[0].numpy()
    check = features.float16_check(job, labels, computed, centroids)
    assert check["frames"] == 2048  # chunk 1 only
    assert check["agreeing"] == (nearest_centroids(computed[2048:], centroids)[0].numpy() == labels[2048:]).sum()


def test_verify_and_inspect_read_a_sample_run(mfcc_pair) -> None:
    sample, _ = mfcc_pair
    assert deep_findings(sample) == {"intake": [], "features@1": [], "kmeans@1": [], "labels@1": []}
    status = inspect_run(str(Path(sample.config.store) / "t"))
    assert [status.iterations[0][stage].status for stage in ("features", "kmeans", "labels")] == ["done"] * 3
    console = Console(width=220, record=True)
    console.print(render_table(status))
    counts = sample.records["features"].counts
    assert f"{counts['frames']} frames of {counts['corpus_frames']} (the k-means sample) x 39" in console.export_text()


def test_float16_features_keep_at_least_99_percent_of_the_float32_labels_on_real_speech(
    tmp_path: Path, fsdd_dir: Path, client
) -> None:
    half = run_chain(config_for(tmp_path / "half", fsdd_dir, [mfcc_iteration(dtype="float16")]), client, "labels")
    full = run_chain(config_for(tmp_path / "full", fsdd_dir, [mfcc_iteration()]), client, "features")
    half_features = half.store.open_zarr(LAYOUT.features_store(1), "r")
    full_features = full.store.open_zarr(LAYOUT.features_store(1), "r")["features"][:]
    assert half_features["features"].dtype == np.float16 and dict(half_features.attrs)["dtype"] == "float16"
    assert half.records["features"].metrics["dtype"] == "float16"
    half_bytes = half.records["features"].objects["features.zarr"].bytes
    full_bytes = full.records["features"].objects["features.zarr"].bytes
    assert half_bytes < 0.55 * full_bytes
    np.testing.assert_allclose(half_features["features"][:].astype(np.float32), full_features, rtol=1e-3, atol=1e-2)

    measured = half.records["labels"].metrics["float16_agreement"]
    labels = half.store.open_zarr(LAYOUT.labels_store(1), "r")["labels"][:]
    float32_labels = nearest_by_chunk(full_features, load_centroids(half.store, LAYOUT, 1), 2048)
    # The corpus fits in the check's budget: every chunk is checked, so the measure is the whole corpus's.
    assert measured["frames"] == full_features.shape[0]
    assert measured["share"] == pytest.approx((labels == float32_labels).mean(), abs=1e-6)
    assert measured["share"] >= 0.99, measured
    assert deep_findings(half) == {"intake": [], "features@1": [], "kmeans@1": [], "labels@1": []}


def test_layer_features_of_a_tiny_model_kept_as_a_float16_sample_give_the_labels_of_the_whole_store(
    tmp_path: Path, demo_corpus: Path, client
) -> None:
    """Iteration 2 on layer 2 of a tiny model: `keep: sample` + float16 against `keep: all` + float16."""
    def second(keep: str) -> dict[str, Any]:
        return {
            "features": {"kind": "hubert", "layer": 2, "chunk_frames": 1024, "keep": keep, "dtype": "float16"},
            "kmeans": {"k": 10, "sample_fraction": 0.3, "seed": 1},
        }

    source = demo_corpus / "wav"
    sample_config = config_for(tmp_path / "sample", source, [mfcc_iteration(chunk_frames=4096), second("sample")])
    run_plan(sample_config, ArtifactStore(sample_config.store), client, "train@1")
    shutil.copytree(tmp_path / "sample", tmp_path / "all")
    sample_store = ArtifactStore(sample_config.store)
    sample = run_plan(sample_config, sample_store, client, "labels@2")
    all_config = config_for(tmp_path / "all", source, [mfcc_iteration(chunk_frames=4096), second("all")])
    everything = run_plan(all_config, ArtifactStore(all_config.store), client, "labels@2")
    assert everything[("train", 1)] == sample[("train", 1)]  # iteration 1 was copied, not redone

    whole = ArtifactStore(all_config.store).open_zarr(LAYOUT.features_store(2), "r")
    kept = sample_store.open_zarr(LAYOUT.features_store(2), "r")
    assert kept["features"].dtype == np.float16 and kept["features"].shape[1] == whole["features"].shape[1]
    assert kept["features"].shape[0] < 0.5 * whole["features"].shape[0]
    labels = sample_store.open_zarr(LAYOUT.labels_store(2), "r")["labels"][:]
    expected = nearest_by_chunk(whole["features"][:], load_centroids(sample_store, LAYOUT, 2), 1024)
    np.testing.assert_array_equal(labels, expected)
    record = sample[("labels", 2)]
    assert record.config["features"]["source"]["model_digest"] == everything[("features", 2)].config["source"]["model_digest"]
    assert record.metrics["float16_agreement"]["share"] >= 0.99 and record.metrics["float16_agreement"]["frames"] > 0
