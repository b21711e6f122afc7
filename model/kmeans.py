"""k-means as plain numpy/torch: initialisation, one block's share of a Lloyd step, and the Lloyd loop.

The loop never sees the data: it is handed a `LloydStep` that returns every block's partial sums
for given centroids, so the same loop runs over blocks in memory or on a Dask cluster (the
k-means stage), and only k x dim arrays travel. Partials are added in block order, so a seed
always gives the same centroids. A cluster left empty is re-seeded with the farthest frame seen,
not left dead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus

RELATIVE_TOLERANCE = 1e-4
FARTHEST_CANDIDATES = 16

LloydStep = Callable[[np.ndarray], list[dict[str, Any]]]
"""centroids (k, dim) -> every block's `lloyd_partial`, in block order."""


def nearest_centroids(rows: np.ndarray, centroids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, for each row of (frames, dim)."""
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    distances = (x * x).sum(dim=1, keepdim=True) - 2 * x @ c.T + (c * c).sum(dim=1)
    best, labels = distances.min(dim=1)
    return labels, best.clamp_min_(0)


def lloyd_partial(rows: np.ndarray, centroids: np.ndarray, index: int) -> dict[str, Any]:
    """One block's share of a Lloyd step: per-cluster sums and counts, inertia, farthest frames."""
    torch.set_num_threads(1)
    k, dim = centroids.shape
    labels, distances = nearest_centroids(rows, centroids)
    sums = torch.zeros((k, dim), dtype=torch.float64).index_add_(0, labels, torch.from_numpy(rows).double())
    counts = torch.bincount(labels, minlength=k)
    far = torch.argsort(distances, descending=True, stable=True)[:FARTHEST_CANDIDATES]
    return {
        "index": index,
        "sums": sums.numpy(),
        "counts": counts.numpy(),
        "inertia": float(distances.double().sum()),
        "far_distances": distances[far].numpy(),
        "far_rows": rows[far.numpy()],
    }


def reduce_partials(partials: list[dict[str, Any]], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """New centroids from the blocks' sums, their counts, the inertia, and how many clusters were
    empty (those take the farthest frames seen)."""
    sums = np.sum([p["sums"] for p in partials], axis=0)
    counts = np.sum([p["counts"] for p in partials], axis=0)
    inertia = float(sum(p["inertia"] for p in partials))
    updated = centroids.astype(np.float64).copy()
    filled = counts > 0
    updated[filled] = sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if empty.size:
        distances = np.concatenate([p["far_distances"] for p in partials])
        rows = np.concatenate([p["far_rows"] for p in partials])
        order = np.argsort(-distances, kind="stable")[: empty.size]
        updated[empty[: order.size]] = rows[order]
    return updated.astype(np.float32), counts, inertia, int(empty.size)


def initial_centroids(sample: np.ndarray, k: int, method: Literal["k-means++", "random"], seed: int) -> np.ndarray:
    """k starting centroids drawn from `sample` (frames, dim): k-means++ (scikit-learn's) or uniformly."""
    if method == "k-means++":
        centroids, _ = kmeans_plusplus(sample, k, random_state=seed)
    else:
        centroids = sample[np.random.default_rng(seed).choice(sample.shape[0], k, replace=False)]
    return centroids.astype(np.float32)


@dataclass(frozen=True)
class LloydResult:
    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    cluster_sizes: list[int]
    reseeded: int


def lloyd(step: LloydStep, centroids: np.ndarray, max_iter: int, variance: float) -> LloydResult:
    """Lloyd iterations until the centroids move less than RELATIVE_TOLERANCE x the data's variance
    (summed over clusters) with no cluster empty, or `max_iter`; then one more step measures them."""
    converged, reseeded, iterations = False, 0, 0
    for iterations in range(1, max_iter + 1):
        updated, _, _, empty = reduce_partials(step(centroids), centroids)
        reseeded += empty
        shift = float(np.square(updated.astype(np.float64) - centroids).sum())
        centroids = updated
        if empty == 0 and shift <= RELATIVE_TOLERANCE * variance:
            converged = True
            break
    final = step(centroids)
    counts = np.sum([p["counts"] for p in final], axis=0)
    return LloydResult(
        centroids=centroids,
        inertia=float(sum(p["inertia"] for p in final)),
        iterations=iterations,
        converged=converged,
        cluster_sizes=[int(c) for c in counts],
        reseeded=reseeded,
    )
