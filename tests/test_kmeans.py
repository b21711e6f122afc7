from pathlib import Path

import numpy as np
from sklearn.cluster import MiniBatchKMeans

from model.kmeans import reduce_partials
from tasks.artifacts import load_centroids
from tasks.layout import RunLayout
from tests.conftest import demo_config, run_chain


def fitted(tmp_path: Path, corpus: Path, client, name: str = "runs", **kmeans):
    chain = run_chain(demo_config(tmp_path, corpus, name, **kmeans), client, "kmeans")
    return chain.config, chain.store, chain.records["features"], chain.records["kmeans"]


def test_inertia_is_no_worse_than_fairseqs_minibatch_kmeans(tmp_path: Path, demo_corpus: Path, client) -> None:
    _, store, _, record = fitted(tmp_path, demo_corpus, client, k=32)
    frames = store.open_zarr("t/iter-1/features.zarr", "r")["features"][:]
    reference = MiniBatchKMeans(
        n_clusters=32, init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100,
        n_init=20, reassignment_ratio=0.0, random_state=0,
    ).fit(frames)
    reference_per_frame = -reference.score(frames) / len(frames)
    ours = record.metrics["inertia_per_frame"]
    assert ours <= 1.01 * reference_per_frame, (ours, reference_per_frame)
    report = store.read_json("t/iter-1/kmeans/report.json")
    assert report["frames_fitted"] == len(frames) and sum(report["cluster_sizes"]) == len(frames)
    assert record.counts["k"] == 32 and load_centroids(store, RunLayout("t"), 1).shape == (32, 39)


def test_a_seed_gives_the_same_centroids_and_a_sample_cap_is_kept(tmp_path: Path, demo_corpus: Path, client) -> None:
    _, first_store, _, first = fitted(tmp_path, demo_corpus, client, "a", max_frames=4000, seed=3)
    _, second_store, _, second = fitted(tmp_path, demo_corpus, client, "b", max_frames=4000, seed=3)
    assert first.output_digest == second.output_digest
    np.testing.assert_array_equal(load_centroids(first_store, RunLayout("t"), 1), load_centroids(second_store, RunLayout("t"), 1))
    assert 3000 < first.counts["frames_fitted"] < 5000
    _, _, _, other_seed = fitted(tmp_path, demo_corpus, client, "c", max_frames=4000, seed=4)
    assert other_seed.output_digest != first.output_digest


def test_empty_clusters_are_reseeded_with_the_farthest_frames() -> None:
    centroids = np.array([[0.0, 0.0], [100.0, 100.0], [5.0, 5.0]], dtype=np.float32)
    rows = np.array([[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]], dtype=np.float32)
    partial = {
        "sums": np.array([[1.0, 1.0], [0.0, 0.0], [9.0, 9.0]]),
        "counts": np.array([2, 0, 1]),
        "inertia": 3.0,
        "far_distances": np.array([32.0, 1.0, 1.0], dtype=np.float32),
        "far_rows": rows[[2, 0, 1]],
    }
    updated, counts, inertia, empty = reduce_partials([partial], centroids)
    assert empty == 1 and inertia == 3.0
    np.testing.assert_array_equal(updated[0], [0.5, 0.5])
    np.testing.assert_array_equal(updated[1], [9.0, 9.0])
    np.testing.assert_array_equal(updated[2], [9.0, 9.0])
