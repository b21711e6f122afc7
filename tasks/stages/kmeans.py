"""Stage: k-means on the iteration's features store, distributed on Dask (tasks/frames/clustering.py),
fitted on the training utterances' frames; writes the centroids and the fit report."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from infra.commit import Stage, StageRecord
from infra.digest import digest_array
from tasks.frames.clustering import fit_kmeans, fitting_settings, held_out_frames
from tasks.frames.store import stored_keep
from tasks.run.keys import key_settings
from tasks.run.layout import CENTROIDS, FIT_REPORT, KMEANS_DIR
from tasks.run.records import load_manifest, read_npy
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)


def kmeans_key_config(context: StageContext) -> dict[str, Any]:
    return key_settings(context.settings.kmeans)


def kmeans_key_inputs(context: StageContext) -> dict[str, str]:
    return {"features": context.upstream("kmeans", "features").output_digest, **context.split_inputs("kmeans")}



def kmeans(context: StageContext, stage: Stage) -> StageResult:
    """Fit the centroids on the training utterances' frames and write them with the fit report."""
    settings = context.settings.kmeans
    group = context.store.open_zarr(context.layout.features_store(context.iteration), mode="r")
    array = group["features"]
    held_out = held_out_frames(load_manifest(context.store, context.layout, columns=["split"]), group) if context.config.corpus.has_valid_split else None
    clock = time.perf_counter()
    fit = fit_kmeans(context.client, array, fitting_settings(settings, group), held_out)
    seconds = time.perf_counter() - clock
    result = fit.lloyd

    buffer = io.BytesIO()
    np.save(buffer, result.centroids)
    context.store.write_bytes(stage.rel(CENTROIDS), buffer.getvalue())
    context.store.write_json(
        stage.rel(FIT_REPORT),
        {
            **settings.model_dump(),
            "frames_fitted": fit.frames,
            "frames_total": int(array.shape[0]),
            "features_keep": stored_keep(group),
            "iterations": result.iterations,
            "passes_per_phase": list(result.passes),
            "converged": result.converged,
            "inertia": result.inertia,
            "inertia_per_frame": result.inertia / fit.frames,
            "empty_clusters_reseeded": result.reseeded,
            "cluster_sizes": result.cluster_sizes,
            "fit_seconds": round(seconds, 3),
        },
    )
    sizes = np.array(result.cluster_sizes)
    return StageResult(
        output_digest=digest_array(result.centroids),
        counts={
            "k": settings.k, "dim": int(result.centroids.shape[1]), "frames_fitted": fit.frames, "iterations": result.iterations,
        },
        metrics={
            "inertia_per_frame": round(result.inertia / fit.frames, 6),
            "converged": result.converged,
            "empty_clusters_reseeded": result.reseeded,
            "used_clusters": int((sizes > 0).sum()),
            "smallest_cluster": int(sizes.min()),
            "largest_cluster": int(sizes.max()),
        },
    )


def verify_kmeans(committed: CommittedStage) -> str:
    """The centroids' digest, as the stage took it."""
    return digest_array(read_npy(committed.store, committed.rel(CENTROIDS)))


def kmeans_summary(record: StageRecord) -> str:
    return (
        f"k={record.counts['k']}, {record.counts['iterations']} iterations, "
        f"inertia/frame {record.metrics['inertia_per_frame']:.4g}"
    )


KMEANS = StageSpec(
    name="kmeans",
    version=3,
    outputs=(KMEANS_DIR,),
    key_config=kmeans_key_config,
    key_inputs=kmeans_key_inputs,
    work=kmeans,
    summary=kmeans_summary,
    verify_digest=verify_kmeans,
)
