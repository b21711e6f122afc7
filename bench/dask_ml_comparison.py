"""Does dask-ml earn its place? Its KMeans and PCA against our own code, on the same Dask cluster.

    taskset -c 0 .venv/bin/python bench/dask_ml_comparison.py [--minutes 10] [--frames768 100000] [--k768 500] [--out bench-out]

(a) k-means, Lloyd against Lloyd from the SAME k-means++ centres (`model.kmeans.initial_centroids`
on an init sample drawn as the k-means stage draws it): our `lloyd(dask_lloyd_step(...))` over
blocks held on the workers as futures, against `dask_ml.cluster.KMeans(init=<those centres>)`
on a dask array of the same blocks (persisted, same placement), with the same `max_iter` and the
same `max_iter` (dask-ml's `tol` is an absolute squared shift: it gets SHIFT_TOLERANCE x the data's
mean per-dimension variance; ours is one full-data Lloyd phase, stopping when a pass lowers the
inertia by less than FINE_TOLERANCE of it).
Inertia per frame is recomputed for both in float64 with numpy over every frame. Cases: MFCC of a
synthesized corpus (k=100; also dask-ml's own `k-means||` and `k-means++` inits, to check the
k-means stage's docstring), and 768-dim Gaussian-mixture data (k=500).
(b) PCA of the 768-dim data: `dask_ml.decomposition.PCA` (auto solver, and the exact tsqr one)
against the covariance from streamed per-block sums of X^T X (float64, on the workers) and
`numpy.linalg.eigh`; wall time and agreement of the explained variance and of the subspace.

The numba kernel dask-ml's Lloyd step uses is compiled on every worker before timing, and torch
is warmed likewise, so both sides are timed at steady state.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import dask_ml
    from dask_ml.cluster import KMeans as DaskKMeans
    from dask_ml.decomposition import PCA as DaskPCA
except ImportError as error:  # pragma: no cover - depends on the environment
    if __name__ == "__main__":
        print(f"dask-ml is not importable ({error}); run `pip install dask-ml` (into .venv) to run this benchmark.")
        sys.exit(2)
    raise

import dask.array as da
from distributed import Client, wait

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from model.kmeans import FINE_TOLERANCE, LloydPhase, initial_centroids, lloyd, lloyd_partial
from tasks.frames.clustering import INIT_FRAMES_PER_CLUSTER, dask_lloyd_step
from tasks.frames.store import choose_chunk_frames
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.stages.catalog import run_plan

SUGGESTED_FRAMES_768 = 200_000


def inertia_and_used(frames: np.ndarray, centroids: np.ndarray) -> tuple[float, int]:
    """Mean squared distance to the nearest centroid over every frame (float64), and how many
    centroids are nearest to at least one frame."""
    c = centroids.astype(np.float64)
    c_norms = (c**2).sum(1)
    total, used = 0.0, np.zeros(len(c), dtype=bool)
    for start in range(0, len(frames), 32768):
        block = frames[start : start + 32768].astype(np.float64)
        distances = (block**2).sum(1)[:, None] - 2 * block @ c.T + c_norms
        used[distances.argmin(axis=1)] = True
        total += distances.min(axis=1).clip(min=0).sum()
    return total / len(frames), int(used.sum())


def mean_variance(frames: np.ndarray) -> float:
    """The data's variance averaged over dimensions (float64), as `fit_kmeans` computes it."""
    total, squares = np.zeros(frames.shape[1]), np.zeros(frames.shape[1])
    for start in range(0, len(frames), 65536):
        block = frames[start : start + 65536].astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    mean = total / len(frames)
    return float((squares / len(frames) - mean**2).mean())


def warm_workers(client: Client, dim: int) -> float:
    """Compile dask-ml's numba kernel (float32 rows, int32 labels) and warm torch on every worker;
    returns the seconds it took (excluded from the timings)."""

    def warm() -> None:
        from dask_ml.cluster.k_means import _centers_dense

        rows = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
        _centers_dense(rows, np.zeros(64, dtype=np.int32), 4)
        lloyd_partial(rows, rows[:4].copy(), 0)

    start = time.perf_counter()
    client.run(warm)
    return time.perf_counter() - start


def gaussian_mixture(frames: int, dim: int, components: int, seed: int) -> np.ndarray:
    """Seeded (frames, dim) float32 rows from a mixture of `components` Gaussians with uneven
    weights and spreads."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, dim)).astype(np.float32)
    spreads = rng.uniform(0.5, 1.5, components).astype(np.float32)
    weights = rng.dirichlet(np.full(components, 2.0))
    which = rng.choice(components, size=frames, p=weights)
    rows = rng.standard_normal((frames, dim), dtype=np.float32)
    rows *= spreads[which, None]
    rows += means[which]
    return rows


class Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


SHIFT_TOLERANCE = 1e-4
"""dask-ml's stopping rule: squared centroid shift, as a share of the data's mean variance (scikit-learn's `tol`)."""

KMEANS_HEADER = (
    f"{'case':<16} {'method':<34} {'iters':>5} {'conv':>4} {'wall s':>7} {'s/iter':>7} "
    f"{'inertia/frame':>14} {'x ours':>7} {'used k':>6}"
)


def kmeans_row(case: str, method: str, iters, converged, seconds, inertia, ours_inertia, used) -> str:
    per_iter = f"{seconds / iters:7.3f}" if isinstance(iters, int) and iters else f"{'-':>7}"
    conv = "yes" if converged else "no"
    return (
        f"{case:<16} {method:<34} {iters:>5} {conv:>4} {seconds:7.2f} {per_iter} "
        f"{inertia:14.4f} {inertia / ours_inertia:7.4f} {used:>6}"
    )


def compare_kmeans(
    client: Client,
    table: Table,
    case: str,
    frames: np.ndarray,
    block_frames: int,
    k: int,
    max_iter: int,
    seed: int,
    init_per_cluster: int,
    check_dask_ml_inits: bool,
) -> tuple[list, da.Array]:
    """Rows of the k-means table for one data set; returns the blocks' futures and the dask array
    (left on the workers for the PCA comparison)."""
    n, dim = frames.shape
    variance = mean_variance(frames)
    rng = np.random.default_rng([seed, 1])
    init_count = min(n, init_per_cluster * k)
    sample = frames[np.sort(rng.choice(n, size=init_count, replace=False))]
    start = time.perf_counter()
    init = initial_centroids(sample, k, "k-means++", seed)
    init_seconds = time.perf_counter() - start
    init_inertia, init_used = inertia_and_used(frames, init)

    blocks = [np.ascontiguousarray(frames[s : s + block_frames]) for s in range(0, n, block_frames)]
    futures = client.scatter(blocks)
    wait(futures)
    # The same blocks, on the same workers, as one dask array for dask-ml.
    array = da.concatenate(
        [da.from_delayed(future, shape=block.shape, dtype=block.dtype) for future, block in zip(futures, blocks)]
    ).persist()
    wait(array)
    placement = client.who_has(futures)
    workers_used = len({worker for holders in placement.values() for worker in holders})

    table.add(
        f"{case}: {n} x {dim} float32, {len(blocks)} blocks of {block_frames} on {workers_used} worker(s); "
        f"k={k}, max_iter={max_iter}, dask-ml tol: shift <= {SHIFT_TOLERANCE:g} x variance {variance:.4g} "
        f"= {SHIFT_TOLERANCE * variance:.4g}, ours: inertia change < {FINE_TOLERANCE:g}; our k-means++ on {init_count} frames, "
        f"{init_seconds:.1f} s (not timed below), init inertia/frame {init_inertia:.4f}"
    )

    start = time.perf_counter()
    ours = lloyd(dask_lloyd_step(client, futures), init.copy(), max_iter, (LloydPhase(1, FINE_TOLERANCE),))
    ours_seconds = time.perf_counter() - start
    ours_inertia, ours_used = inertia_and_used(frames, ours.centroids)
    table.add(
        kmeans_row(case, "ours: lloyd(dask_lloyd_step)", ours.iterations, ours.converged, ours_seconds,
                   ours_inertia, ours_inertia, ours_used)
    )

    tol = SHIFT_TOLERANCE * variance
    start = time.perf_counter()
    model = DaskKMeans(n_clusters=k, init=init.copy(), max_iter=max_iter, tol=tol, random_state=seed).fit(array)
    dml_seconds = time.perf_counter() - start
    dml_inertia, dml_used = inertia_and_used(frames, np.asarray(model.cluster_centers_))
    dml_converged = model.n_iter_ < max_iter
    table.add(
        kmeans_row(case, "dask-ml KMeans(init=our centres)", int(model.n_iter_), dml_converged, dml_seconds,
                   dml_inertia, ours_inertia, dml_used)
    )
    # dask-ml's own inertia_, for the record: unless its last shift was <= 1e-7 it recomputes the
    # distances with `pairwise_distances_argmin_min(X, centers)`, i.e. unsquared.
    table.add(f"{'':<16}   (dask-ml's own inertia_/frame: {model.inertia_ / n:.4f}, not comparable when unsquared)")

    if check_dask_ml_inits:
        start = time.perf_counter()
        try:
            scalable = DaskKMeans(n_clusters=k, init="k-means||", max_iter=max_iter, tol=tol, random_state=seed).fit(array)
            seconds = time.perf_counter() - start
            inertia, used = inertia_and_used(frames, np.asarray(scalable.cluster_centers_))
            table.add(
                kmeans_row(case, "dask-ml KMeans(init='k-means||')", int(scalable.n_iter_),
                           scalable.n_iter_ < max_iter, seconds, inertia, ours_inertia, used)
                + "  (init + Lloyd)"
            )
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            table.add(f"{case:<16} {'dask-ml KMeans(init=k-means||)':<34} FAILED: {type(error).__name__}: {error}")
        start = time.perf_counter()
        try:
            plusplus = DaskKMeans(n_clusters=k, init="k-means++", max_iter=max_iter, tol=tol, random_state=seed).fit(array)
            seconds = time.perf_counter() - start
            inertia, used = inertia_and_used(frames, np.asarray(plusplus.cluster_centers_))
            table.add(
                kmeans_row(case, "dask-ml KMeans(init='k-means++')", int(plusplus.n_iter_),
                           plusplus.n_iter_ < max_iter, seconds, inertia, ours_inertia, used)
            )
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            message = str(error).splitlines()[0] if str(error) else ""
            table.add(
                f"{case:<16} {'dask-ml KMeans(init=k-means++)':<34} CRASHES after {time.perf_counter() - start:.1f} s: "
                f"{type(error).__name__}: {message[:160]}"
            )
    return futures, array


def block_gram(rows: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, sum and X^T X of one block, in float64."""
    as64 = rows.astype(np.float64)
    return rows.shape[0], as64.sum(axis=0), as64.T @ as64


def ours_pca(client: Client, futures: list) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, ddof=1) and eigenvectors (rows) of the covariance, from per-block sums."""
    parts = client.gather(client.map(block_gram, futures, pure=False))
    n = sum(count for count, _, _ in parts)
    mean = sum(total for _, total, _ in parts) / n
    gram = sum(g for _, _, g in parts)
    covariance = (gram - n * np.outer(mean, mean)) / (n - 1)
    values, vectors = np.linalg.eigh(covariance)
    return values[::-1], vectors[:, ::-1].T


def compare_pca(client: Client, table: Table, futures: list, array: da.Array, components: int) -> None:
    start = time.perf_counter()
    values, vectors = ours_pca(client, futures)
    ours_seconds = time.perf_counter() - start
    total = values.sum()
    top = values[:components]
    table.add("")
    table.add(
        f"PCA of the 768-dim data, top {components} components; exact reference: covariance from streamed X^T X + eigh; "
        f"top-{components} share of variance {top.sum() / total:.4f}"
    )
    header = (
        f"{'method':<44} {'wall s':>7} {'x ours':>7} {'max rel err EV':>14} {'EV ratio sum':>12} "
        f"{'min cos subspace':>16}"
    )
    table.add(header)
    table.add(f"{'ours: chunk X^T X sums + numpy eigh (all 768)':<44} {ours_seconds:7.2f} {1.0:7.2f} {0.0:14.2e} "
              f"{top.sum() / total:12.4f} {1.0:16.4f}")
    for solver in ("auto", "tsqr"):
        pca = DaskPCA(n_components=components, svd_solver=solver, random_state=0)
        chosen = pca._get_solver(array, components)
        start = time.perf_counter()
        try:
            pca.fit(array)
        except Exception as error:  # noqa: BLE001 - reported, not hidden
            table.add(f"{f'dask-ml PCA(svd_solver={solver!r} -> {chosen})':<44} FAILED: {type(error).__name__}: {error}")
            continue
        seconds = time.perf_counter() - start
        explained = np.asarray(pca.explained_variance_, dtype=np.float64)
        relative = np.abs(explained - top) / top
        cosines = np.linalg.svd(vectors[:components] @ np.asarray(pca.components_, dtype=np.float64).T, compute_uv=False)
        table.add(
            f"{f'dask-ml PCA(svd_solver={solver!r} -> {chosen})':<44} {seconds:7.2f} {seconds / ours_seconds:7.2f} "
            f"{relative.max():14.2e} {float(np.sum(pca.explained_variance_ratio_)):12.4f} {cosines.min():16.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="synthesized speech for the MFCC case")
    parser.add_argument("--k", type=int, default=100, help="clusters for the MFCC case")
    parser.add_argument("--max-iter", type=int, default=100, help="Lloyd iterations at most, MFCC case (stage default)")
    parser.add_argument("--frames768", type=int, default=100_000, help="rows of the 768-dim case (suggested 200k)")
    parser.add_argument("--k768", type=int, default=500)
    parser.add_argument("--components768", type=int, default=500, help="Gaussian-mixture components of the 768-dim data")
    parser.add_argument("--max-iter768", type=int, default=25, help="Lloyd iterations at most, 768-dim case")
    parser.add_argument("--init-per-cluster768", type=int, default=32,
                        help=f"k-means++ sample frames per cluster, 768-dim case (the stage uses {INIT_FRAMES_PER_CLUSTER})")
    parser.add_argument("--pca-components", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    import dask
    import distributed
    import sklearn

    cores = sorted(os.sched_getaffinity(0))
    reduced = "" if args.frames768 >= SUGGESTED_FRAMES_768 else f" (reduced from the suggested {SUGGESTED_FRAMES_768})"
    table = Table()
    table.add(
        f"dask-ml {dask_ml.__version__}, scikit-learn {sklearn.__version__}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}; {args.workers} Dask workers x 1 thread on cores {cores}"
    )
    table.add(
        f"sizes: (a1) MFCC of {args.minutes:g} min synthesized speech, k={args.k}, max_iter={args.max_iter}; "
        f"(a2) {args.frames768} x 768 Gaussian mixture of {args.components768}{reduced}, k={args.k768}, "
        f"max_iter={args.max_iter768}; (b) PCA top {args.pca_components} of (a2)'s data"
    )

    wav_folder = cached_demo_corpus(args.out, args.minutes)
    args.out.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=args.out) as scratch,
        dask_client(n_workers=args.workers, threads_per_worker=1) as client,
    ):
        config = PretrainConfig.model_validate(
            {
                "run": "bench",
                "store": scratch,
                "corpus": {"source": str(wav_folder)},
                "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": args.k}, "train": {"model": "tiny"}}],
            }
        )
        store = ArtifactStore(config.store)
        start = time.perf_counter()
        run_plan(config, store, client, "features")
        feature_seconds = time.perf_counter() - start
        zarr_features = store.open_zarr(RunLayout("bench").features_store(1), "r")["features"]
        mfcc = zarr_features[:]
        mfcc_block = int(zarr_features.chunks[0])

        warm_seconds = warm_workers(client, mfcc.shape[1]) + warm_workers(client, 768)
        table.add(f"MFCC features in {feature_seconds:.1f} s; worker warm-up (numba compile, torch) {warm_seconds:.1f} s, untimed")
        table.add("")
        table.add(KMEANS_HEADER)
        futures, array = compare_kmeans(
            client, table, "a1 MFCC", mfcc, mfcc_block, args.k, args.max_iter, args.seed, INIT_FRAMES_PER_CLUSTER,
            check_dask_ml_inits=True,
        )
        # Released by reference, not client.cancel: the dask array's chunks alias the scattered futures.
        del futures, array, mfcc

        start = time.perf_counter()
        rows = gaussian_mixture(args.frames768, 768, args.components768, args.seed)
        table.add("")
        table.add(f"768-dim data drawn in {time.perf_counter() - start:.1f} s")
        table.add(KMEANS_HEADER)
        futures, array = compare_kmeans(
            client, table, "a2 768-dim", rows, choose_chunk_frames(len(rows), 768), args.k768, args.max_iter768,
            args.seed, args.init_per_cluster768, check_dask_ml_inits=False,
        )
        compare_pca(client, table, futures, array, args.pca_components)
        del futures, array


if __name__ == "__main__":
    main()
