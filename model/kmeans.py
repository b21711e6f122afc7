"""k-means as plain numpy/torch: initialisation, nearest centroids, one block's share of a Lloyd
pass, and the Lloyd loop.

The loop never sees the data: it is handed a `LloydStep` that returns partial sums covering every
block for given centroids, so the same loop runs over blocks in memory or on a Dask cluster (the
k-means stage), and only k x dim arrays travel. Partials merge (`merge_partials`) in any grouping
and order to the same result: sums are carried in double-double (float64 pairs, about 106
bits) and rounded once, the inertia is summed exactly and ties among the farthest frames go by
block index. So a worker folds its blocks' partials into one before they travel (what reaches
the driver is a k x dim array per worker, not per block), and a seed always gives the same
centroids wherever Dask placed the blocks. A cluster left empty is re-seeded with the farthest
frame seen, not left dead.

The loop runs in phases (`LloydPhase`): first on every `stride`-th frame of the sample, which
does most of the moving at a fraction of the cost, then on every frame. A phase ends when a pass
lowers the inertia by less than its `tolerance` (a share of the inertia). Each pass measures the
centroids it was given, so the centroids returned are the last ones measured, with their inertia
and cluster sizes: no extra pass is spent to measure them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

FARTHEST_CANDIDATES = 16
ROWS_PER_PRODUCT = 1024
COARSE_FRAMES_PER_CLUSTER = 256
MAX_COARSE_STRIDE = 16
COARSE_TOLERANCE = 1e-3
FINE_TOLERANCE = 1e-4

LloydStep = Callable[[np.ndarray, int], list[dict[str, Any]]]
"""(centroids (k, dim), stride) -> `lloyd_partial`s over every stride-th row covering every block
once, each a block's or several merged (`merge_partials`), in any order."""


def nearest_centroids(
    rows: np.ndarray, centroids: np.ndarray, distances: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid for each row of (frames, dim), and the squared distance to it
    (with `distances=False`, in its place |c|^2 - 2 x.c of the centred x and c: non-finite where
    the distance is, a pass over the rows cheaper, and all the label stage needs).

    Rows and centroids are first moved by the centroids' mean (distances do not change), which
    keeps |x|^2 + |c|^2 - 2 x.c from cancelling away float32's digits on features far from the
    origin (MFCC's c0). Rows go through in blocks so the (block, k) products stay in cache; each
    block is centred into a new float32 array, so `rows` may be float16, and read-only (a view of a
    store's bytes), and are never copied whole.

    The products are numpy's (OpenBLAS), not torch's (MKL): on the AMD EPYC machines we measure
    on, one thread multiplies (1024 x 768) by (768 x 500) at 87-91 GFLOP/s with OpenBLAS and 69-80
    with MKL, whose rate also drops when two workers multiply side by side (bench/labels.py's
    roofline takes the better of the two). Dask's nanny starts workers with one BLAS thread
    (OPENBLAS_NUM_THREADS=1), as torch's are set to one in each task. The factor -2 is folded into
    the centroids (exact: a power of two).
    """
    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    centre = c.mean(dim=0)
    c = c - centre
    c_norms = (c * c).sum(dim=1)
    centre_values = centre.numpy()
    weights = np.ascontiguousarray(c.numpy().T) * np.float32(-2.0)
    frames = rows.shape[0]
    labels = torch.empty(frames, dtype=torch.int64)
    best = torch.empty(frames, dtype=torch.float32)
    products = np.empty((min(frames, ROWS_PER_PRODUCT), c.shape[0]), dtype=np.float32)
    for start in range(0, frames, ROWS_PER_PRODUCT):
        stop = min(start + ROWS_PER_PRODUCT, frames)
        block = np.subtract(rows[start:stop], centre_values, dtype=np.float32)
        block_products = torch.from_numpy(np.matmul(block, weights, out=products[: stop - start]))
        block_products += c_norms
        torch.min(block_products, dim=1, out=(best[start:stop], labels[start:stop]))
        if distances:
            centred = torch.from_numpy(block)
            best[start:stop] += (centred * centred).sum(dim=1)
    return labels, best.clamp_min_(0) if distances else best


def lloyd_partial(rows: np.ndarray, centroids: np.ndarray, index: int, stride: int = 1) -> dict[str, Any]:
    """One block's share of a Lloyd pass over its every `stride`-th row: per-cluster sums and
    counts, the inertia, the farthest frames with their (block index, rank) keys. (A merged
    partial carries its sums as a double-double pair, `sums` + `sums_low`; a block's low part is
    zero and left out.)"""
    torch.set_num_threads(1)
    rows = rows[::stride]
    k, dim = centroids.shape
    labels, distances = nearest_centroids(rows, centroids)
    sums = torch.zeros((k, dim), dtype=torch.float64).index_add_(0, labels, torch.from_numpy(rows).double())
    counts = torch.bincount(labels, minlength=k)
    far = _farthest(distances.numpy(), FARTHEST_CANDIDATES)
    return {
        "sums": sums.numpy(),
        "counts": counts.numpy(),
        "inertias": [float(distances.double().sum())],
        "far_distances": distances.numpy()[far],
        "far_rows": rows[far],
        "far_keys": np.stack([np.full(far.size, index), np.arange(far.size)], axis=1),
    }


def merge_partials(partials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One partial from several (`lloyd_partial`s, or merged ones): the same whatever their order or
    grouping. Sums add as double-double pairs (Knuth's two-sum, renormalised), whose one rounding
    at the end (`reduce_partials`) is the same unless the exact sum lies within about 2^-100 of a
    float64 rounding boundary; inertias are kept to be summed exactly; of the farthest frames the k
    farthest are kept (ties by block index, then rank), as many as could be re-seeded."""
    first, *rest = partials
    high = first["sums"].copy()
    low = first["sums_low"].copy() if "sums_low" in first else np.zeros_like(high)
    for partial in rest:
        total = high + partial["sums"]
        back = total - high
        error = (high - (total - back)) + (partial["sums"] - back)
        carried = (partial["sums_low"] + error) if "sums_low" in partial else error
        low += carried
        high = total + low
        low -= high - total
    distances = np.concatenate([p["far_distances"] for p in partials])
    keys = np.concatenate([p["far_keys"] for p in partials])
    order = np.lexsort((keys[:, 1], keys[:, 0], -distances))[: high.shape[0]]
    return {
        "sums": high,
        "sums_low": low,
        "counts": np.sum([p["counts"] for p in partials], axis=0),
        "inertias": [value for p in partials for value in p["inertias"]],
        "far_distances": distances[order],
        "far_rows": np.concatenate([p["far_rows"] for p in partials])[order],
        "far_keys": keys[order],
    }


def _farthest(distances: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest distances, largest first (ties: lower index first)."""
    if distances.shape[0] > count:
        candidates = np.argpartition(-distances, count - 1)[:count]
        threshold = distances[candidates].min()
        candidates = np.flatnonzero(distances >= threshold)
    else:
        candidates = np.arange(distances.shape[0])
    return candidates[np.argsort(-distances[candidates], kind="stable")][:count]


def reduce_partials(partials: list[dict[str, Any]], centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """New centroids from the partials' sums, their counts, the inertia, and how many clusters were
    empty (those take the farthest frames seen)."""
    merged = merge_partials(partials)
    sums, counts = merged["sums"] + merged["sums_low"], merged["counts"]
    updated = centroids.astype(np.float64).copy()
    filled = counts > 0
    updated[filled] = sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if empty.size:
        rows = merged["far_rows"][: empty.size]
        updated[empty[: rows.shape[0]]] = rows
    return updated.astype(np.float32), counts, math.fsum(merged["inertias"]), int(empty.size)


def initial_centroids(sample: np.ndarray, k: int, method: Literal["k-means++", "random"], seed: int) -> np.ndarray:
    """k starting centroids drawn from `sample` (frames, dim): k-means++ (scikit-learn's) or uniformly."""
    if method == "k-means++":
        # Imported here: scikit-learn takes 1.8 s to import, and every worker imports this module
        # for its Lloyd passes; only the driver seeds.
        from sklearn.cluster import kmeans_plusplus

        centroids, _ = kmeans_plusplus(sample, k, random_state=seed)
    else:
        centroids = sample[np.random.default_rng(seed).choice(sample.shape[0], k, replace=False)]
    return centroids.astype(np.float32)


@dataclass(frozen=True)
class LloydPhase:
    """Passes over every `stride`-th frame until one lowers the inertia by less than `tolerance` of it."""

    stride: int
    tolerance: float


def lloyd_schedule(frames: int, k: int) -> tuple[LloydPhase, ...]:
    """A coarse phase on a strided subsample of at least COARSE_FRAMES_PER_CLUSTER frames a cluster
    (when the sample is large enough for one), then a fine phase on every frame."""
    stride = 1
    while stride < MAX_COARSE_STRIDE and frames // (2 * stride) >= COARSE_FRAMES_PER_CLUSTER * k:
        stride *= 2
    fine = LloydPhase(stride=1, tolerance=FINE_TOLERANCE)
    return (LloydPhase(stride=stride, tolerance=COARSE_TOLERANCE), fine) if stride > 1 else (fine,)


@dataclass(frozen=True)
class LloydResult:
    centroids: np.ndarray
    inertia: float
    iterations: int
    converged: bool
    cluster_sizes: list[int]
    reseeded: int
    passes: tuple[int, ...] = ()


def lloyd(step: LloydStep, centroids: np.ndarray, max_iter: int, schedule: Sequence[LloydPhase]) -> LloydResult:
    """Lloyd passes, phase by phase (at most `max_iter` a phase); the last phase must have stride 1.

    Returns the last centroids measured on every frame, their inertia and cluster sizes;
    `iterations` counts the full passes, `passes` every phase's."""
    if schedule[-1].stride != 1:
        raise ValueError("the last Lloyd phase must pass over every frame (stride 1)")
    reseeded, passes, converged = 0, [], False
    for number, phase in enumerate(schedule, start=1):
        previous, converged = None, False
        for count in range(1, max_iter + 1):
            started = time.perf_counter()
            partials = step(centroids, phase.stride)
            updated, counts, inertia, empty = reduce_partials(partials, centroids)
            change = "" if previous is None else f", {100 * (inertia - previous) / previous:+.3f}%"
            log.info(
                "k-means phase %d/%d (%s), pass %d: inertia %.6g%s, %d empty cluster(s), %.1f s",
                number, len(schedule), "every frame" if phase.stride == 1 else f"every {phase.stride}th frame", count,
                inertia, change, empty,
                time.perf_counter() - started,
            )
            if previous is not None and empty == 0 and previous - inertia < phase.tolerance * inertia:
                converged = True
                break
            if count == max_iter:
                break
            reseeded += empty
            centroids, previous = updated, inertia
        passes.append(count)
    return LloydResult(
        centroids=centroids,
        inertia=inertia,
        iterations=passes[-1],
        converged=converged,
        cluster_sizes=[int(c) for c in counts],
        reseeded=reseeded,
        passes=tuple(passes),
    )
