"""Stage: the equal-k reference of iteration N's labels (`reference@N`, N >= 2, with phone alignments).

Iteration N's labels can only be judged against something clustered at the same k, at the same
frame rate, on the same frames. This stage fits k-means with iteration N's k-means settings on
iteration N-1's features store (the same distributed fit the k-means stage runs:
tasks/frames/clustering.py), gives each of those frames its nearest centroid, maps the labels of
each utterance onto iteration N's frames by frame centre (as training maps labels onto model
frames), and tallies, on exactly those frames, the phone measures of both label sets: the
reference's and iteration N's own. The verdict (verdict.py) compares the two; its quality gate
runs here, after the measure and before training.

    iter-N/reference.json   both measures, and what the reference is (features, k, label rate)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.parts import gather_parts
from infra.paths import fingerprint_source
from model.data import map_labels
from model.frames import FrameGeometry
from model.kmeans import nearest_centroids
from model.quality import LabelTally, frame_segments, phone_measures
from tasks.corpus.alignments import ALIGNMENT_SUFFIXES, alignment_path, read_alignment
from tasks.frames.clustering import fit_kmeans, fitting_settings, held_out_frames
from tasks.frames.store import stored_geometry, stored_indices
from tasks.run.keys import key_settings
from tasks.run.layout import REFERENCE
from tasks.run.records import load_manifest
from tasks.run.stage import StageContext, StageResult, StageSpec, file_digest
from tasks.stages.reference.verdict import enforce_quality_gate, iteration_verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceJob:
    """Whole utterances of the earlier features store: rows [start, stop), and for each its id and
    its place in the manifest (which is its place in the labels store)."""

    start: int
    stop: int
    ids: tuple[str, ...]
    manifest_indices: tuple[int, ...]
    starts: tuple[int, ...]  # each utterance's first row in the features store


@dataclass(frozen=True)
class Frames:
    """What a task needs to put both label sets on the same frames and tally them."""

    features: zarr.Array  # iteration N-1's features
    features_geometry: FrameGeometry
    labels: zarr.Array  # iteration N's labels
    labels_offsets: np.ndarray
    labels_geometry: FrameGeometry
    k: int
    alignments: str
    storage_options: dict[str, Any]


def plan_reference_jobs(ids: list[str], indices: np.ndarray, offsets: np.ndarray, frames_per_job: int) -> list[ReferenceJob]:
    """Consecutive whole utterances, about `frames_per_job` rows of features each."""
    jobs, first = [], 0
    while first < len(ids):
        last = first + 1
        while last < len(ids) and offsets[last + 1] - offsets[first] <= frames_per_job:
            last += 1
        jobs.append(ReferenceJob(
            int(offsets[first]), int(offsets[last]), tuple(ids[first:last]),
            tuple(int(i) for i in indices[first:last]), tuple(int(o) for o in offsets[first:last]),
        ))
        first = last
    return jobs


def tally_job(job: ReferenceJob, centroids: np.ndarray, frames: Frames) -> tuple[LabelTally, LabelTally]:
    """One Dask task: the reference's and iteration N's labels of the job's utterances, on iteration
    N's frames, tallied against the phones (utterances without an alignment are left out of both)."""
    torch.set_num_threads(1)
    rows = frames.features[job.start : job.stop].astype(np.float32, copy=False)
    earlier = nearest_centroids(rows, centroids)[0]
    reference, own = LabelTally(frames.k), LabelTally(frames.k)
    bounds = [row - job.start for row in (*job.starts, job.stop)]
    for n, (utterance_id, index) in enumerate(zip(job.ids, job.manifest_indices)):
        segments = read_alignment(alignment_path(frames.alignments, utterance_id), frames.storage_options)
        if segments is None:
            continue
        low, high = int(frames.labels_offsets[index]), int(frames.labels_offsets[index + 1])
        labels = frames.labels[low:high].astype(np.int64)
        mapped = map_labels(earlier[bounds[n] : bounds[n + 1]], frames.features_geometry, frames.labels_geometry, high - low)
        segment_index = frame_segments(segments, frames.labels_geometry.centre_seconds(np.arange(high - low)))
        for tally, values in ((reference, mapped.numpy()), (own, labels)):
            tally.add_aligned(segments, segment_index, values)
            tally.aligned_utterances += 1
    return reference, own


def reference_key_config(context: StageContext) -> dict[str, Any]:
    return {"kmeans": key_settings(context.settings.kmeans), "alignments": context.config.corpus.alignments}


def reference_key_inputs(context: StageContext) -> dict[str, str]:
    return {
        "features": context.upstream("reference", "features").output_digest,
        "labels": context.upstream("reference", "labels").output_digest,
        "alignments": fingerprint_source(context.config.corpus.alignments, ALIGNMENT_SUFFIXES, context.config.fsspec_options),
        **context.split_inputs("reference"),
    }


def describe_features(attributes: dict[str, Any]) -> str:
    """How a features store's attributes name its features: 'MFCC (39-dim, 100 Hz)', 'layer 2 (192-dim, 50 Hz)'."""
    what = "MFCC" if attributes["kind"] == "mfcc" else f"layer {attributes['layer']} of its model"
    return f"{what} ({attributes['dim']}-dim, {attributes['frame_rate']:g} Hz)"


def reference(context: StageContext, stage: Stage) -> StageResult:
    """Fit iteration N's k on iteration N-1's features, and measure both label sets on the same frames."""
    store, layout, iteration = context.store, context.layout, context.iteration
    settings = context.settings.kmeans
    features = store.open_zarr(layout.features_store(iteration - 1), mode="r")
    array = features["features"]
    manifest = load_manifest(store, layout, columns=["id", "split"])
    held_out = held_out_frames(manifest, features) if context.config.corpus.has_valid_split else None
    fit = fit_kmeans(context.client, array, fitting_settings(settings, features), held_out)
    labels = store.open_zarr(layout.labels_store(iteration), mode="r")
    frames = Frames(
        array, stored_geometry(features), labels["labels"], labels["offsets"][:], stored_geometry(labels),
        settings.k, context.config.corpus.alignments, store.storage_options,
    )
    indices = stored_indices(features)
    jobs = plan_reference_jobs(manifest.ids().take(indices).to_pylist(), indices, features["offsets"][:], int(array.chunks[0]))
    tallies = {"reference": LabelTally(settings.k), "labels": LabelTally(settings.k)}

    def fold(pair: tuple[LabelTally, LabelTally]) -> None:
        tallies["reference"].merge(pair[0])
        tallies["labels"].merge(pair[1])

    shared = context.client.submit(np.array, fit.lloyd.centroids, pure=False)
    gather_parts(
        context.client, tally_job, jobs, [f"reference-{n}" for n in range(len(jobs))], context.label("reference"), fold,
        centroids=shared, frames=frames,
    )
    measured = {name: phone_measures(tally) for name, tally in tallies.items()}
    if measured["labels"] is None:
        raise ValueError(f"reference@{iteration}: no frame of iteration {iteration - 1}'s utterances has a phone alignment")
    result = {
        "describes": {
            "features": describe_features(features.attrs.asdict()), "iteration": iteration - 1, "k": settings.k,
            "label_rate": frames.labels_geometry.frame_rate,
            "utterances": len(indices), "all_utterances": len(indices) == len(manifest),
        },
        "reference": measured["reference"],
        "labels": measured["labels"],
        "fit": {"frames": fit.frames, "iterations": fit.lloyd.iterations, "inertia_per_frame": fit.lloyd.inertia / fit.frames},
    }
    data = json.dumps(result, indent=2, sort_keys=True).encode() + b"\n"
    store.write_bytes(stage.rel(REFERENCE), data)
    return StageResult(
        output_digest=digest_bytes(data),
        counts={"k": settings.k, "aligned_frames": measured["labels"]["aligned_frames"]},
        metrics=result,
    )


def reference_summary(record: StageRecord) -> str:
    metrics = record.metrics
    change = metrics["labels"]["pnmi"] - metrics["reference"]["pnmi"]
    return (
        f"at k={metrics['describes']['k']}, {metrics['describes']['label_rate']:g} Hz, same frames: labels PNMI "
        f"{metrics['labels']['pnmi']:.3f}, iteration {metrics['describes']['iteration']}'s features "
        f"{metrics['reference']['pnmi']:.3f} ({change:+.3f})"
    )


def quality_gate(context: StageContext, measured: StageRecord) -> None:
    """With `quality_gate`, stop the run before an iteration trains on labels whose PNMI gain at
    equal k over the previous iteration's features falls short."""
    gate = context.config.quality_gate
    if gate is None or context.settings.train is None:
        return
    labels = context.upstream("reference", "labels")
    previous = context.records.get("labels", context.iteration - 1)
    enforce_quality_gate(iteration_verdict(context.iteration, labels, previous, measured), gate.min_pnmi_gain)


REFERENCE_STAGE = StageSpec(
    name="reference",
    version=1,
    outputs=(REFERENCE,),
    key_config=reference_key_config,
    key_inputs=reference_key_inputs,
    work=reference,
    summary=reference_summary,
    verify_digest=file_digest(REFERENCE),
    after=quality_gate,
)
