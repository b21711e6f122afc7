from pathlib import Path

import numpy as np
import pytest

import tasks.stages.labels.stage
from infra.store import ArtifactStore
from model.quality import LabelTally, PhoneSegments, frame_segments, phone_measures
from tasks.corpus.alignments import read_alignment
from tasks.frames.store import stored_geometry
from tasks.products.fairseq import export_fairseq_labels
from tasks.run.layout import RunLayout
from tasks.run.records import load_centroids
from tasks.stages.labels.stage import FrameCountMismatch, StoredFrames, check_frame_counts
from tests.support import KillWorkerAtFirstTask, demo_config, run_chain


def labelled(tmp_path: Path, corpus: Path, client, name: str = "runs", **kmeans):
    chain = run_chain(demo_config(tmp_path, corpus, name, **kmeans), client, "labels")
    return chain.store, chain.utterances, chain.records["labels"]


def nearest(store: ArtifactStore) -> np.ndarray:
    frames = store.open_zarr("t/iter-1/features.zarr", "r")["features"][:].astype(np.float64)
    centroids = load_centroids(store, RunLayout("t"), 1).astype(np.float64)
    distances = (frames**2).sum(1)[:, None] - 2 * frames @ centroids.T + (centroids**2).sum(1)
    return distances.argmin(axis=1)


def test_every_frame_gets_its_nearest_centroid_and_quality_is_measured(tmp_path: Path, demo_corpus: Path, client) -> None:
    store, utterances, record = labelled(tmp_path, demo_corpus, client)
    labels = store.open_zarr("t/iter-1/labels.zarr", "r")
    features = store.open_zarr("t/iter-1/features.zarr", "r")
    assert labels["labels"].shape == (features["features"].shape[0],) and labels["labels"].dtype == np.int16
    np.testing.assert_array_equal(labels["offsets"][:], features["offsets"][:])
    agreement = (labels["labels"][:] == nearest(store)).mean()
    assert agreement > 0.999, agreement  # float32 vs float64 ties at most
    assert labels.attrs["label_rate"] == 100.0 and labels.attrs["k"] == 16
    quality = record.metrics["quality"]
    assert 0.1 < quality["pnmi"] < 1 and 0 < quality["cluster_purity"] < 1 and 0 < quality["phone_purity"] < 1
    assert quality["aligned_utterances"] == len(utterances)
    assert record.metrics["used_clusters"] == 16 and record.metrics["mean_segment_frames"] > 1
    assert record.counts["frames"] == features["features"].shape[0]
    assert record.metrics["mean_segment_frames"] == pytest.approx(whole_utterance_segment_frames(labels))
    expected = whole_utterance_quality(labels, demo_corpus / "align")
    assert quality == pytest.approx(expected, rel=1e-12)


def whole_utterance_segment_frames(labels) -> float:
    """Frames per run of one label, counted on whole utterances (no chunks)."""
    everything, offsets = labels["labels"][:], labels["offsets"][:]
    runs = sum(1 + np.count_nonzero(np.diff(everything[a:b])) for a, b in zip(offsets[:-1], offsets[1:]))
    return everything.shape[0] / runs


def whole_utterance_quality(labels, alignments: Path) -> dict:
    """The paper's measures from one pass over whole utterances: what the chunked tallies must add up to."""
    everything, offsets = labels["labels"][:].astype(np.int64), labels["offsets"][:]
    tally = LabelTally(int(labels.attrs["k"]))
    for utterance_id, a, b in zip(labels["utt_ids"][:], offsets[:-1], offsets[1:]):
        segments = read_alignment(str(alignments / f"{utterance_id}.tsv"))
        times = (np.arange(b - a) * labels.attrs["hop_samples"] + labels.attrs["window_samples"] / 2) / 16000
        tally.add_aligned(segments, frame_segments(segments, times), everything[a:b])
        tally.aligned_utterances += 1
    return phone_measures(tally)


def test_the_same_config_twice_gives_identical_labels_and_fairseq_export(tmp_path: Path, demo_corpus: Path, client) -> None:
    first_store, utterances, first = labelled(tmp_path, demo_corpus, client, "a")
    second_store, _, second = labelled(tmp_path, demo_corpus, client, "b")
    assert first.output_digest == second.output_digest
    np.testing.assert_array_equal(
        first_store.open_zarr("t/iter-1/labels.zarr", "r")["labels"][:],
        second_store.open_zarr("t/iter-1/labels.zarr", "r")["labels"][:],
    )
    [split] = export_fairseq_labels(first_store, RunLayout("t"), 1, tmp_path / "fairseq")
    lines = split.km.read_text().splitlines()
    offsets = first_store.open_zarr("t/iter-1/labels.zarr", "r")["offsets"][:]
    assert len(lines) == len(utterances)
    assert [len(line.split()) for line in lines] == np.diff(offsets).tolist()
    everything = first_store.open_zarr("t/iter-1/labels.zarr", "r")["labels"][:]
    assert [int(x) for x in lines[-1].split()] == everything[offsets[-2] :].tolist()
    counts = np.bincount(everything, minlength=16)
    assert (tmp_path / "fairseq" / "dict.km.txt").read_text().splitlines() == [f"{i} {c}" for i, c in enumerate(counts)]
    tsv = split.tsv.read_text().splitlines()
    assert tsv[0] == str(demo_corpus / "wav")
    assert tsv[1:] == [f"{Path(u.path).relative_to(demo_corpus / 'wav')}\t{u.samples}" for u in utterances]


def test_a_worker_killed_during_the_label_stage_does_not_stop_it(tmp_path: Path, demo_corpus: Path, client) -> None:
    flag = tmp_path / "killed"
    client.register_plugin(KillWorkerAtFirstTask("labels-", str(flag)), name="kill-first-label-worker")
    try:
        store, _, record = labelled(tmp_path, demo_corpus, client)
    finally:
        client.unregister_worker_plugin("kill-first-label-worker")
    assert flag.exists(), "no worker was killed: the test did not test anything"
    labels = store.open_zarr("t/iter-1/labels.zarr", "r")
    assert (labels["labels"][:] == nearest(store)).mean() > 0.999
    assert record.metrics["mean_segment_frames"] == pytest.approx(whole_utterance_segment_frames(labels))
    assert record.metrics["quality"] == pytest.approx(whole_utterance_quality(labels, demo_corpus / "align"), rel=1e-12)
    client.wait_for_workers(2, timeout=60)


def test_mismatched_frame_counts_name_the_utterances(tmp_path: Path, demo_corpus: Path, client) -> None:
    store, utterances, _ = labelled(tmp_path, demo_corpus, client)
    shortened = [utterances[0].model_copy(update={"samples": utterances[0].samples - 800})] + utterances[1:]
    features = store.open_zarr("t/iter-1/features.zarr", "r")
    labels = store.open_zarr("t/iter-1/labels.zarr", "r")
    held = StoredFrames.read(features, features["features"])
    written = StoredFrames.read(labels, labels["labels"])
    with pytest.raises(FrameCountMismatch, match=utterances[0].id):
        check_frame_counts(shortened, stored_geometry(features), held, written)
    check_frame_counts(utterances, stored_geometry(features), held, written)
    cut = StoredFrames(written.offsets, written.ids, written.rows - 1)
    with pytest.raises(FrameCountMismatch, match=f"labels hold {written.rows - 1} frames"):
        check_frame_counts(utterances, stored_geometry(features), held, cut)


def test_purity_and_pnmi_on_a_known_joint_distribution() -> None:
    tally = LabelTally(k=2)
    segments = PhoneSegments(np.array([0.0, 1.0]), np.array([1.0, 2.0]), ["a", "b"])
    times = np.array([0.1, 0.2, 0.3, 1.1, 1.2, 1.3, 2.5])
    index = frame_segments(segments, times)
    assert index.tolist() == [0, 0, 0, 1, 1, 1, -1]
    tally.add_aligned(segments, index, np.array([0, 0, 1, 1, 1, 1, 0]))
    measures = phone_measures(tally)
    # joint: a -> {0: 2, 1: 1}, b -> {1: 3}; 6 aligned frames
    assert measures["phone_purity"] == pytest.approx((2 + 3) / 6)
    assert measures["cluster_purity"] == pytest.approx((2 + 3) / 6)
    p = np.array([[2, 1], [0, 3]]) / 6
    mi = sum(p[y, z] * np.log(p[y, z] / (p[y].sum() * p[:, z].sum())) for y in range(2) for z in range(2) if p[y, z])
    assert measures["pnmi"] == pytest.approx(mi / np.log(2))


def test_how_chunks_are_grouped_into_tasks_changes_nothing(tmp_path: Path, demo_corpus: Path, client, monkeypatch) -> None:
    """Each task labels a run of chunks; the stage's bytes, digest and measures must not depend on how many."""
    one_store, _, one = labelled(tmp_path, demo_corpus, client, "one")
    monkeypatch.setattr(tasks.stages.labels.stage, "chunks_per_task", lambda *_: 3)
    grouped_store, _, grouped = labelled(tmp_path, demo_corpus, client, "grouped")
    assert one.counts["chunks"] > 3  # so some tasks hold several chunks and some edges fall inside tasks
    assert grouped.output_digest == one.output_digest and grouped.metrics == one.metrics
    np.testing.assert_array_equal(
        grouped_store.open_zarr("t/iter-1/labels.zarr", "r")["labels"][:], one_store.open_zarr("t/iter-1/labels.zarr", "r")["labels"][:]
    )
