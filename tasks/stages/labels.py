"""Stage: every feature frame gets its nearest centroid's id, written to `labels.zarr` on Dask.

`labels.zarr` holds `labels` [total_frames] int16, and the features store's `offsets` and `utt_ids`,
chunked like the features: each Dask task reads one features chunk and writes the same rows of
labels, so writers own whole chunks and the stage resumes per chunk like the feature stage. Its
attributes record the label rate and frame geometry, taken from the features store.

Before committing, the stage checks that labels, features and the manifest agree on every
utterance's frame count and names any that do not. Then it measures the labels (model/quality.py)
against phone alignments when the corpus has them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from infra.digest import digest_array, digest_digests, digest_json
from infra.parts import gather_parts, run_parts
from infra.paths import fingerprint_source
from infra.store import EmptyArray, Stage, StageRecord, create_zarr_group
from model.frames import FrameGeometry
from model.data import map_labels
from model.kmeans import nearest_centroids
from model.quality import LabelTally, frame_segments, label_agreement, label_measures, phone_measures
from tasks.alignments import ALIGNMENT_SUFFIXES, alignment_path, read_alignment
from tasks.artifacts import load_centroids, load_manifest, stored_chunk_digests, stored_geometry
from tasks.chunks import UtteranceSpan, check_finite, chunk_grid, inside_an_utterance, utterance_spans
from tasks.layout import FEATURES_STORE, LABELS_STORE
from tasks.manifest import Utterance
from tasks.splits import split_inputs
from tasks.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_TASK = 8
TASKS_PER_WORKER = 4


class FrameCountMismatch(ValueError):
    """Labels, features and manifest disagree on how many frames an utterance has."""


@dataclass(frozen=True)
class LabelJob:
    """A run of whole, consecutive chunks: frames [start, stop), chunk edges at `chunk_starts`."""

    chunk_starts: tuple[int, ...]
    first_chunk: int
    stop: int
    utterances: tuple[UtteranceSpan, ...]  # those overlapping [start, stop)

    @property
    def start(self) -> int:
        return self.chunk_starts[0]

    @property
    def part(self) -> str:
        return f"chunks-{self.first_chunk:06d}-{self.first_chunk + len(self.chunk_starts) - 1:06d}"

    def chunk_digests(self, labels: np.ndarray) -> list[str]:
        """One digest per chunk, so the stage's digest does not depend on how chunks were grouped."""
        edges = [*self.chunk_starts, self.stop]
        return [digest_array(labels[a - self.start : b - self.start]) for a, b in zip(edges, edges[1:])]


@dataclass(frozen=True)
class PreviousLabels:
    """The previous iteration's labels, to measure how far this iteration's moved (opened by the driver)."""

    labels: zarr.Array
    offsets: np.ndarray
    geometry: FrameGeometry
    k: int

    def on_frames_of(self, spans: tuple[UtteranceSpan, ...], geometry: FrameGeometry) -> dict[int, np.ndarray]:
        """Each utterance's previous labels mapped onto this iteration's frames (by nearest frame
        centre, as training maps labels onto model frames), read in one request for the spans."""
        first, last = spans[0].index, spans[-1].index
        block = self.labels[self.offsets[first] : self.offsets[last + 1]].astype(np.int64)
        mapped = {}
        for span in spans:
            own = block[self.offsets[span.index] - self.offsets[first] : self.offsets[span.index + 1] - self.offsets[first]]
            mapped[span.index] = map_labels(torch.from_numpy(own), self.geometry, geometry, span.frames).numpy()
        return mapped


@dataclass(frozen=True)
class Measuring:
    """What a label task needs to tally its chunk for the quality measures (model/quality.py)."""

    k: int
    geometry: FrameGeometry
    alignments: str | None
    storage_options: dict[str, Any]
    previous: PreviousLabels | None = None


def write_label_chunk(
    job: LabelJob, stage: Stage, centroids: np.ndarray, features: zarr.Array, labels: zarr.Array, measuring: Measuring
) -> dict[str, Any]:
    """One Dask task: label some features chunks, write the same rows of labels, tally them, mark it done.

    A label costs little to compute, so on object storage a task per chunk would spend most of its
    time waiting on requests; a task takes several chunks, which zarr reads and writes
    concurrently, and writes one marker. The arrays come opened by the driver (no metadata
    requests per task). The returned info carries the part's tally for the driver to fold in; the
    marker keeps the rest, including the part's first and last label, which join runs of one
    label across part edges.
    """
    torch.set_num_threads(1)
    rows = features[job.start : job.stop]
    check_finite(rows, job.start, job.utterances, f"features read for labels {job.part}")
    chunk = nearest_centroids(rows, centroids)[0].numpy().astype(np.int16)
    tally = tally_labels(job, chunk, measuring)
    labels[job.start : job.stop] = chunk
    info = {
        "part": job.part,
        "digests": job.chunk_digests(chunk),
        "first_label": int(chunk[0]),
        "last_label": int(chunk[-1]),
    }
    stage.mark_part(job.part, info)
    return {**info, "tally": tally}


def _create_store(
    stage: Stage,
    attributes: dict[str, Any],
    features: zarr.Array,
    offsets: np.ndarray,
    ids: np.ndarray,
    k: int,
    centroids_digest: str,
) -> None:
    """`labels.zarr`, chunked like the features, with their offsets, ids and frame geometry."""
    create_zarr_group(
        stage.store,
        stage.rel(LABELS_STORE),
        attributes={
            "k": k,
            "label_rate": attributes["frame_rate"],
            "window_samples": attributes["window_samples"],
            "hop_samples": attributes["hop_samples"],
            "sample_rate": attributes["sample_rate"],
            "features": {key: attributes[key] for key in ("kind", "dim", "frame_rate")},
            "centroids_digest": centroids_digest,
            "stage_key": stage.key,
        },
        empty={"labels": EmptyArray(shape=(features.shape[0],), chunks=(features.chunks[0],), dtype="int16")},
        whole={"offsets": offsets, "utt_ids": ids},
    )


def check_frame_counts(utterances: list[Utterance], features: zarr.Group, labels: zarr.Group) -> None:
    """Raise FrameCountMismatch naming every utterance whose frame counts disagree."""
    geometry = stored_geometry(features)
    feature_counts = np.diff(features["offsets"][:])
    label_counts = np.diff(labels["offsets"][:])
    ids = list(features["utt_ids"][:])
    problems = []
    if ids != [u.id for u in utterances] or list(labels["utt_ids"][:]) != ids:
        problems.append("utterance ids or their order differ between manifest, features and labels")
    else:
        for utterance, in_features, in_labels in zip(utterances, feature_counts, label_counts):
            wanted = geometry.num_frames(utterance.samples_16k)
            if not wanted == in_features == in_labels:
                problems.append(f"{utterance.id}: audio gives {wanted}, features {in_features}, labels {in_labels}")
    if labels["labels"].shape[0] != features["features"].shape[0]:
        problems.append(f"labels hold {labels['labels'].shape[0]} frames, features {features['features'].shape[0]}")
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FrameCountMismatch(f"frame counts disagree for {len(problems)} utterance(s):\n  {listed}{more}")


def tally_labels(job: LabelJob, labels: np.ndarray, measuring: Measuring) -> LabelTally:
    """Label counts, runs within each utterance's piece and (with alignments) phone/label pairs.

    Runs are counted as if each job started a new one; `runs_continuing_across_chunks` takes
    back those that go on over a job's edge inside an utterance.
    """
    previous = measuring.previous
    tally = LabelTally(measuring.k, previous_k=None if previous is None else previous.k)
    tally.label_counts += np.bincount(labels, minlength=measuring.k)
    earlier = {} if previous is None else previous.on_frames_of(job.utterances, measuring.geometry)
    for span in job.utterances:
        low, high = span.overlap(job.start, job.stop)
        piece = labels[low - job.start : high - job.start]
        tally.runs += 1 + int(np.count_nonzero(np.diff(piece)))
        if previous is not None:
            tally.add_previous(piece, earlier[span.index][low - span.offset : high - span.offset])
        if measuring.alignments is None:
            continue
        segments = read_alignment(alignment_path(measuring.alignments, span.id), measuring.storage_options)
        if segments is None:
            continue
        tally.aligned_utterances += int(low == span.offset)
        times = measuring.geometry.centre_seconds(np.arange(low, high) - span.offset)
        tally.add_aligned(segments, frame_segments(segments, times), piece)
    return tally


def tally_written_part(job: LabelJob, labels: zarr.Array, measuring: Measuring) -> LabelTally:
    """A part written by an earlier attempt (resume): read it back and tally it."""
    return tally_labels(job, labels[job.start : job.stop], measuring)


def runs_continuing_across_chunks(jobs: list[LabelJob], edges: dict[str, dict[str, Any]], offsets: np.ndarray) -> int:
    """Runs counted twice: one label going on over a job's edge that falls inside an utterance.

    `edges` holds each part's info (its marker's), with its first and last label."""
    return sum(
        int(inside_an_utterance(offsets, job.start) and edges[previous.part]["last_label"] == edges[job.part]["first_label"])
        for previous, job in zip(jobs, jobs[1:])
    )


def chunks_per_task(chunks: int, workers: int) -> int:
    """Enough tasks to keep every worker busy and balanced, as few as that allows, at most 8 chunks each."""
    return max(1, min(MAX_CHUNKS_PER_TASK, chunks // (TASKS_PER_WORKER * max(workers, 1))))


def plan_label_jobs(utterances: list[Utterance], offsets: np.ndarray, chunk_frames: int, per_task: int) -> list[LabelJob]:
    """Consecutive runs of `per_task` chunks of the grid; every chunk belongs to exactly one job."""
    grid = chunk_grid(int(offsets[-1]), chunk_frames)
    jobs = []
    for first in range(0, len(grid), per_task):
        chunks = grid[first : first + per_task]
        start, stop = chunks[0].start, chunks[-1].stop
        jobs.append(LabelJob(tuple(chunk.start for chunk in chunks), first, stop, utterance_spans(utterances, offsets, start, stop)))
    return jobs


def labels_key_config(context: StageContext) -> dict[str, Any]:
    return {"alignments": context.config.corpus.alignments}


def labels_key_inputs(context: StageContext) -> dict[str, str]:
    inputs = {
        "features": context.upstream("labels", "features").output_digest,
        "centroids": context.upstream("labels", "centroids").output_digest,
    }
    if context.iteration > 1:
        inputs["previous_labels"] = context.upstream("labels", "previous_labels").output_digest
    alignments = context.config.corpus.alignments
    if alignments is not None:
        inputs["alignments"] = fingerprint_source(alignments, ALIGNMENT_SUFFIXES, context.config.storage_options)
    return {**inputs, **split_inputs(context, "labels")}


def labels(context: StageContext, stage: Stage) -> StageResult:
    """Label every frame into `labels.zarr`, check frame counts, and measure the labels."""
    label = f"labels@{context.iteration}"
    store, client, iteration = context.store, context.client, context.iteration
    features_record = context.upstream("labels", "features")
    kmeans_record = context.upstream("labels", "centroids")
    utterances = load_manifest(store, context.layout)
    k = int(kmeans_record.counts["k"])
    features_group = store.open_zarr(stage.rel(FEATURES_STORE), mode="r")
    features_array, offsets, ids = features_group["features"], features_group["offsets"][:], features_group["utt_ids"][:]
    total, chunk_frames = features_array.shape[0], features_array.chunks[0]
    chunks = -(-total // chunk_frames)
    done = stage.done_parts()
    if not done:
        _create_store(stage, features_group.attrs.asdict(), features_array, offsets, ids, k, kmeans_record.output_digest)
    labels_group = store.open_zarr(stage.rel(LABELS_STORE), mode="r+")
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    jobs = plan_label_jobs(utterances, offsets, chunk_frames, chunks_per_task(chunks, workers))
    previous = previous_labels(context) if iteration > 1 else None
    measuring = Measuring(
        k, stored_geometry(features_group), context.config.corpus.alignments, store.storage_options, previous
    )
    tally = LabelTally(k, previous_k=None if previous is None else previous.k)

    def fold(result: dict[str, Any]) -> dict[str, Any]:
        """Add a part's tally to the stage's and keep the rest (its marker's info)."""
        tally.merge(result.pop("tally"))
        return result

    # Loaded by a task, not scattered: if the worker holding it dies, Dask loads it again.
    shared = client.submit(load_centroids, store, context.layout, iteration, pure=False)
    arrays = {"features": features_array, "labels": labels_group["labels"]}
    parts = run_parts(
        client, stage, jobs, write_label_chunk, label, done, on_result=fold, centroids=shared, measuring=measuring, **arrays
    )
    resumed = [job for job in jobs if job.part in done]
    if resumed:
        futures = client.map(tally_written_part, resumed, labels=arrays["labels"], measuring=measuring, pure=False)
        gather_parts(futures, f"{label} (tallying resumed parts)", tally.merge)
    tally.runs -= runs_continuing_across_chunks(jobs, parts, offsets)

    check_frame_counts(utterances, features_group, labels_group)
    frames = np.diff(offsets)
    valid_frames = int(sum(int(count) for utterance, count in zip(utterances, frames) if utterance.split == "valid"))
    measures = {"labels": label_measures(tally), "quality": phone_measures(tally)}
    agreement = label_agreement(tally)
    return StageResult(
        output_digest=labels_digest(
            [digest for job in jobs for digest in parts[job.part]["digests"]], features_record.output_digest
        ),
        counts={
            "frames": int(total), "utterances": len(utterances), "k": k, "chunks": chunks,
            "train_frames": int(total) - valid_frames, "valid_frames": valid_frames,
            "chunks_resumed": sum(len(job.chunk_starts) for job in jobs if job.part in done),
        },
        metrics={
            "label_rate": float(features_group.attrs["frame_rate"]),
            **{key: value for key, value in measures["labels"].items() if key != "frames"},
            "quality": measures["quality"],
            **({} if agreement is None else {"agreement": {"previous_iteration": iteration - 1, **agreement}}),
        },
    )


def previous_labels(context: StageContext) -> PreviousLabels:
    """The previous iteration's committed labels, opened for the label tasks."""
    group = context.store.open_zarr(context.layout.labels_store(context.iteration - 1), mode="r")
    return PreviousLabels(group["labels"], group["offsets"][:], stored_geometry(group), int(group.attrs["k"]))


def labels_digest(chunk_digests: list[str], features_digest: str) -> str:
    """The stage's output digest: its chunks' digests in grid order, and the features' digest
    (whose offsets and ids the labels store copies)."""
    return digest_json({"labels": digest_digests(chunk_digests), "offsets": features_digest})


def verify_labels(committed: CommittedStage) -> str:
    """The output digest recomputed from every stored chunk."""
    array = committed.store.open_zarr(committed.rel(LABELS_STORE), mode="r")["labels"]
    return labels_digest(stored_chunk_digests(array), committed.record.inputs["features"])


def labels_summary(record: StageRecord) -> str:
    quality = record.metrics.get("quality")
    phones = f", PNMI {quality['pnmi']:.3f}, phone purity {quality['phone_purity']:.3f}" if quality else ""
    return f"{record.counts['frames']} frames, {record.metrics['used_clusters']} clusters used{phones}"


LABELS = StageSpec(
    name="labels",
    version=1,
    outputs=(LABELS_STORE,),
    key_config=labels_key_config,
    key_inputs=labels_key_inputs,
    work=labels,
    summary=labels_summary,
    verify_digest=verify_labels,
)
