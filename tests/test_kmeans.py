import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from model.kmeans import (
    initial_centroids,
    lloyd,
    lloyd_partial,
    lloyd_schedule,
    merge_partials,
    nearest_centroids,
    reduce_partials,
)
from tasks.run.layout import RunLayout
from tasks.run.records import load_centroids
from tests.support import demo_config, run_chain


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
        "sums_low": np.zeros((3, 2)),
        "counts": np.array([2, 0, 1]),
        "inertias": [3.0],
        "far_distances": np.array([32.0, 1.0, 1.0], dtype=np.float32),
        "far_rows": rows[[2, 0, 1]],
        "far_keys": np.array([[0, 0], [0, 1], [0, 2]]),
    }
    updated, counts, inertia, empty = reduce_partials([partial], centroids)
    assert empty == 1 and inertia == 3.0
    np.testing.assert_array_equal(updated[0], [0.5, 0.5])
    np.testing.assert_array_equal(updated[1], [9.0, 9.0])
    np.testing.assert_array_equal(updated[2], [9.0, 9.0])


def test_partials_merge_to_the_same_centroids_in_any_grouping_and_order() -> None:
    """What lets each worker fold its own blocks, wherever Dask put them: the result cannot depend on which."""
    rng = np.random.default_rng(2)
    # Values from 1e-6 to 1e6: their float64 sums are not exact, so the order of adding would show.
    rows = (rng.normal(size=(60_000, 6)) * 10.0 ** rng.uniform(-6, 6, size=(60_000, 6))).astype(np.float32)
    rows[rng.integers(0, 60_000, 500)] = rows[0]  # ties among the farthest frames
    centroids = rows[rng.choice(60_000, 40, replace=False)].copy()
    centroids[3] = 1e9  # a cluster left empty: re-seeded from the farthest frames
    blocks = [lloyd_partial(rows[start : start + 1000], centroids, index) for index, start in enumerate(range(0, 60_000, 1000))]
    expected = reduce_partials(blocks, centroids)
    for seed in range(5):
        shuffled = [blocks[i] for i in np.random.default_rng(seed).permutation(len(blocks))]
        cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, len(blocks)), 1 + seed, replace=False))
        groups = [merge_partials(group) for group in np.split(np.array(shuffled, dtype=object), cuts)]
        updated, counts, inertia, empty = reduce_partials(groups[::-1], centroids)
        np.testing.assert_array_equal(updated, expected[0])
        np.testing.assert_array_equal(counts, expected[1])
        assert (inertia, empty) == expected[2:] and empty >= 1
    merged = merge_partials(blocks)  # and its sums are the exact sums, rounded once
    for cluster in np.flatnonzero(expected[1])[:5]:
        exact = [math.fsum(block["sums"][cluster, d] for block in blocks) for d in range(6)]
        np.testing.assert_array_equal(merged["sums"][cluster] + merged["sums_low"][cluster], exact)


def test_lloyd_fits_a_subsample_first_and_returns_the_centroids_it_measured() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(16, 8))
    rows = (centres[rng.integers(0, 16, 40_000)] + rng.normal(size=(40_000, 8))).astype(np.float32)
    blocks = [rows[start : start + 4096] for start in range(0, len(rows), 4096)]
    strides: list[int] = []

    def step(centroids: np.ndarray, stride: int) -> list[dict]:
        strides.append(stride)
        return [lloyd_partial(block, centroids, index, stride) for index, block in enumerate(blocks)]

    schedule = lloyd_schedule(len(rows), 16)
    assert [phase.stride for phase in schedule] == [8, 1]  # 5000 frames >= 256 a cluster
    result = lloyd(step, initial_centroids(rows[:4096], 16, "k-means++", 0), 100, schedule)
    assert strides[0] == 8 and strides[-1] == 1 and result.passes == (strides.count(8), strides.count(1))
    assert result.converged and sum(result.cluster_sizes) == len(rows)
    labels, distances = nearest_centroids(rows, result.centroids)
    assert result.inertia == pytest.approx(float(distances.double().sum()), rel=1e-5)
    assert np.bincount(labels.numpy(), minlength=16).tolist() == result.cluster_sizes
    assert result.inertia / len(rows) < 1.1 * 8  # the mixture's noise: 8 dims of unit variance


def test_nearest_centroids_keeps_float32_digits_far_from_the_origin() -> None:
    rng = np.random.default_rng(1)
    centroids = (1e4 + rng.normal(size=(8, 4))).astype(np.float32)
    rows = (centroids[rng.integers(0, 8, 5000)] + 0.01 * rng.normal(size=(5000, 4))).astype(np.float32)
    labels, distances = nearest_centroids(rows, centroids)
    exact = ((rows[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(labels.numpy(), exact.argmin(1))
    np.testing.assert_allclose(distances.numpy(), exact.min(1), rtol=1e-3, atol=1e-6)
