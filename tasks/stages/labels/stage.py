"""Stage: every feature frame gets its nearest centroid's id, written to `labels.zarr` on Dask.

`labels.zarr` holds `labels` [total_frames] int16 of every utterance, with their `offsets` and
`utt_ids`, chunked like the features of every utterance: each Dask task takes some chunks' features
and writes the same rows of labels, so writers own whole chunks and the stage resumes per chunk
like the feature stage. Its attributes record the label rate and frame geometry, taken from the
features store.

Where the features come from is the features store's to say (tasks/frames/store.py): with `keep:
all` the tasks read them; with `keep: sample` the store holds only the k-means sample, and each
task computes its chunk's features from the iteration's source, as the feature stage would have,
rounded to the store's dtype, so the labels are those `keep: all` gives. With float16 features,
the labels of a fixed sample of chunks are compared with those of float32 features (computed
again where the store was read): `metrics.float16_agreement`, with a warning below 99%.

Before committing, the stage checks that labels, features and the manifest agree on every
utterance's frame count and names any that do not. Then it measures the labels (model/quality.py)
against phone alignments when the corpus has them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import zarr

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes, digest_digests, digest_json, digest_json_with_list
from infra.parts import gather_parts, run_parts
from infra.paths import fingerprint_source
from infra.zarr_io import EmptyArray, create_zarr_group, read_whole_arrays
from model.data import map_labels
from model.frames import FrameGeometry
from model.quality import LabelTally, frame_segments, label_agreement, label_measures, phone_measures
from tasks.corpus.alignments import ALIGNMENT_SUFFIXES, alignment_path, read_alignment
from tasks.corpus.manifest import Manifest, Utterance
from tasks.frames.chunks import Chunk, UtteranceSpan, chunk_grid, frame_offsets, inside_an_utterance
from tasks.frames.labelling import (
    LabelFeatures,
    LabelJob,
    chunks_per_task,
    float16_checked_chunks,
    plan_label_jobs,
    write_label_chunk,
)
from tasks.frames.store import (
    IDS_CHUNK,
    feature_source,
    grid_chunk_frames,
    id_batches,
    stored_chunk_digests,
    stored_geometry,
    stored_keep,
    write_ids,
)
from tasks.run.layout import LABELS_STORE
from tasks.run.records import load_centroids, load_manifest, manifest_rows
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)

FLOAT16_MIN_AGREEMENT = 0.99


class FrameCountMismatch(ValueError):
    """Labels, features and manifest disagree on how many frames an utterance has."""

    retryable = False  # a retry reads the same stores



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

    def __call__(self, job: LabelJob, labels: np.ndarray) -> LabelTally:
        return tally_labels(job, labels, self)




def _create_store(
    stage: Stage,
    attributes: dict[str, Any],
    chunk_frames: int,
    offsets: np.ndarray,
    ids: pa.Array,
    k: int,
    centroids_digest: str,
) -> None:
    """`labels.zarr`, chunked like the features of every utterance, with their offsets, ids (written
    a block at a time) and frame geometry."""
    create_zarr_group(
        stage.store,
        stage.rel(LABELS_STORE),
        attributes={
            "k": k,
            "label_rate": attributes["frame_rate"],
            "window_samples": attributes["window_samples"],
            "hop_samples": attributes["hop_samples"],
            "sample_rate": attributes["sample_rate"],
            "features": {
                **{key: attributes[key] for key in ("kind", "dim", "frame_rate")},
                "keep": attributes.get("keep", "all"), "dtype": attributes.get("dtype", "float32"),
            },
            "centroids_digest": centroids_digest,
            "stage_key": stage.key,
        },
        empty={
            "labels": EmptyArray(shape=(int(offsets[-1]),), chunks=(chunk_frames,), dtype="int16"),
            "utt_ids": EmptyArray(shape=(len(ids),), chunks=(IDS_CHUNK,), dtype="str"),
        },
        whole={"offsets": offsets},
        replace=not stage.fresh,
    )
    write_ids(stage.store.open_zarr(stage.rel(LABELS_STORE), mode="r+")["utt_ids"], ids)


@dataclass(frozen=True)
class StoredFrames:
    """What a features or labels store says of its utterances' frames: their offsets and ids (the
    store's `utt_ids`, read a block at a time, or an array at hand), the manifest index of each
    (None: every utterance of the manifest, in order) and its rows."""

    offsets: np.ndarray
    ids: zarr.Array | np.ndarray | pa.Array
    rows: int
    indices: np.ndarray | None = None

    @classmethod
    def read(cls, group: zarr.Group, rows: zarr.Array, with_indices: bool = False) -> StoredFrames:
        """Read from the store, concurrently: offsets and (`with_indices`, a `keep: sample` features
        store) the manifest indices; the rows are those of `rows`, the group's array."""
        held = read_whole_arrays(group, ["offsets", *(["utt_indices"] if with_indices else [])])
        return cls(held["offsets"], group["utt_ids"], int(rows.shape[0]), held.get("utt_indices"))


def _same_ids(stored: zarr.Array | np.ndarray | pa.Array, expected: pa.Array) -> bool:
    """Whether a store's ids are exactly `expected`, compared a block at a time."""
    if (len(stored) if isinstance(stored, (pa.Array, pa.ChunkedArray)) else stored.shape[0]) != len(expected):
        return False
    return all(mine == theirs for mine, theirs in zip(id_batches(stored), id_batches(expected)))


def check_frame_counts(
    utterances: Manifest | Sequence[Utterance], geometry: FrameGeometry, features: StoredFrames, labels: StoredFrames
) -> None:
    """Raise FrameCountMismatch naming every utterance whose frame counts disagree.

    The labels cover every utterance; the features those they hold (all, or the k-means sample).
    Worked from columns: the counts as arrays, the ids a block at a time."""
    manifest = Manifest.of(utterances)
    wanted = geometry.num_frames(manifest.samples_16k())
    count = len(manifest)
    indices = features.indices if features.indices is not None else np.arange(len(features.offsets) - 1)
    held = np.diff(features.offsets)
    ids = manifest.ids()
    problems = []
    inside = indices[(indices >= 0) & (indices < count)]
    in_feature_store = ids if features.indices is None else ids.take(pa.array(inside))
    if len(inside) != len(indices) or not _same_ids(features.ids, in_feature_store) or not _same_ids(labels.ids, ids):
        problems.append("utterance ids or their order differ between manifest, features and labels")
    else:
        in_features = wanted.copy()
        in_features[indices] = held
        in_labels = np.diff(labels.offsets)
        stored = np.zeros(count, dtype=bool)
        stored[indices] = True
        for index in np.flatnonzero((wanted != in_features) | (wanted != in_labels))[:1000].tolist():
            shown = int(in_features[index]) if stored[index] else "(not stored)"
            problems.append(f"{ids[index].as_py()}: audio gives {wanted[index]}, features {shown}, labels {in_labels[index]}")
    if labels.rows != int(wanted.sum()):
        problems.append(f"labels hold {labels.rows} frames, the audio gives {int(wanted.sum())}")
    if features.rows != int(held.sum()):
        problems.append(f"features hold {features.rows} frames, their offsets {int(held.sum())}")
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



def labels_key_config(context: StageContext) -> dict[str, Any]:
    """The alignments; with `keep: sample` also what determines the features computed on the fly:
    the feature stage's key config (its source, with the model's digest, and its dtype)."""
    config: dict[str, Any] = {"alignments": context.config.corpus.alignments}
    if context.settings.features.keep == "sample":
        config["features"] = context.upstream("labels", "features").config
    return config


def labels_key_inputs(context: StageContext) -> dict[str, str]:
    inputs = {
        "features": context.upstream("labels", "features").output_digest,
        "centroids": context.upstream("labels", "centroids").output_digest,
    }
    if context.iteration > 1:
        inputs["previous_labels"] = context.upstream("labels", "previous_labels").output_digest
    alignments = context.config.corpus.alignments
    if alignments is not None:
        inputs["alignments"] = fingerprint_source(alignments, ALIGNMENT_SUFFIXES, context.config.fsspec_options)
    if context.settings.features.keep == "sample":  # the audio whose features are computed on the fly
        inputs["manifest"] = context.upstream("labels", "manifest").output_digest
    return {**inputs, **context.split_inputs("labels")}


@dataclass(frozen=True)
class FrameLayout:
    """Every utterance's frames as the labels lay them out: offsets, ids and chunk size of the grid."""

    offsets: np.ndarray
    ids: pa.Array
    chunk_frames: int
    digest: str  # what the labels' digest takes for offsets and ids


def frame_layout(
    context: StageContext, utterances: Manifest, features: zarr.Group, stored: zarr.Array, held: StoredFrames,
    features_digest: str,
) -> FrameLayout:
    """A store of every utterance lends its layout (and its digest covers it); for a store of the
    k-means sample, the layout `keep: all` would have is made from the manifest."""
    if held.indices is None:
        return FrameLayout(held.offsets, utterances.ids(), int(stored.chunks[0]), features_digest)
    offsets = frame_offsets(utterances, stored_geometry(features).num_frames)
    ids = utterances.ids()
    chunk_frames = grid_chunk_frames(context.settings.features, int(offsets[-1]), int(features.attrs["dim"]))
    return FrameLayout(offsets, ids, chunk_frames, layout_digest(offsets, ids))


def label_features(context: StageContext, features: zarr.Group, stored: zarr.Array, grid: list[Chunk]) -> LabelFeatures:
    """How the label tasks get their features from this features store (`stored`: its array)."""
    dtype, keep = str(features.attrs.get("dtype", "float32")), stored_keep(features)
    needs_source = keep == "sample" or dtype != "float32"
    return LabelFeatures(
        dtype=dtype,
        source=feature_source(context) if needs_source else None,
        storage_options=context.store.storage_options,
        stored=stored if keep == "all" else None,
        checked=float16_checked_chunks(grid) if dtype == "float16" else frozenset(),
    )


def float16_agreement(label: str, checks: list[dict[str, int]]) -> dict[str, Any] | None:
    """The share of checked frames whose label float32 features keep; warned about below 99%."""
    if not checks:
        return None
    frames = sum(check["frames"] for check in checks)
    share = sum(check["agreeing"] for check in checks) / max(frames, 1)
    if share < FLOAT16_MIN_AGREEMENT:
        log.warning(
            "%s: float16 features give the float32 label on only %.2f%% of %d checked frames (below %.0f%%): "
            "consider features.dtype float32", label, 100 * share, frames, 100 * FLOAT16_MIN_AGREEMENT,
        )
    return {"share": round(share, 6), "frames": frames, "minimum": FLOAT16_MIN_AGREEMENT}


def labels(context: StageContext, stage: Stage) -> StageResult:
    """Label every frame into `labels.zarr`, check frame counts, and measure the labels."""
    label = f"labels@{context.iteration}"
    store, client, iteration = context.store, context.client, context.iteration
    features_record = context.upstream("labels", "features")
    kmeans_record = context.upstream("labels", "centroids")
    utterances = load_manifest(store, context.layout, columns=["id", "samples", "sample_rate", "split"])
    k = int(kmeans_record.counts["k"])
    features_group = store.open_zarr(context.layout.features_store(iteration), mode="r")
    features_array = features_group["features"]
    held = StoredFrames.read(features_group, features_array, with_indices=stored_keep(features_group) == "sample")
    layout = frame_layout(context, utterances, features_group, features_array, held, features_record.output_digest)
    offsets, total = layout.offsets, int(layout.offsets[-1])
    grid = chunk_grid(total, layout.chunk_frames)
    done = stage.done_parts()
    if not done:
        _create_store(
            stage, features_group.attrs.asdict(), layout.chunk_frames, offsets, layout.ids, k, kmeans_record.output_digest
        )
    labels_group = store.open_zarr(stage.rel(LABELS_STORE), mode="r+")
    labels_array = labels_group["labels"]
    # A store this run created holds the layout's offsets and ids; one an earlier attempt created is read.
    labelled = (
        StoredFrames.read(labels_group, labels_array) if done
        else StoredFrames(layout.offsets, layout.ids, int(labels_array.shape[0]))
    )
    features = label_features(context, features_group, features_array, grid)
    # Computing features costs far more than labelling them: then a task takes one chunk, as in the feature stage.
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    per_task = 1
    if features.stored is not None:
        stored = features.stored
        per_task = chunks_per_task(len(grid), workers, stored.chunks[0] * stored.shape[1] * stored.dtype.itemsize)
    jobs = plan_label_jobs(manifest_rows(store, context.layout), offsets, layout.chunk_frames, per_task)
    if features.stored is None:
        log.info("%s: features of %d utterances computed on the fly (features.keep: sample)", label, len(utterances))
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
    parts = run_parts(
        client, stage, jobs, write_label_chunk, label, done, on_result=fold,
        centroids=shared, features=features, labels=labels_array, tally=measuring,
    )
    resumed = [job for job in jobs if job.part in done]
    if resumed:
        gather_parts(
            client, tally_written_part, resumed, [f"tally-{job.part}" for job in resumed],
            f"{label} (tallying resumed parts)", tally.merge, labels=labels_array, measuring=measuring,
        )
    tally.runs -= runs_continuing_across_chunks(jobs, parts, offsets)

    check_frame_counts(utterances, measuring.geometry, held, labelled)
    valid_frames = int(np.diff(offsets)[utterances.is_valid()].sum())
    measures = {"labels": label_measures(tally), "quality": phone_measures(tally)}
    agreement = label_agreement(tally)
    float16 = float16_agreement(label, [parts[job.part]["float16_check"] for job in jobs if "float16_check" in parts[job.part]])
    return StageResult(
        output_digest=labels_digest([digest for job in jobs for digest in parts[job.part]["digests"]], layout.digest),
        counts={
            "frames": total, "utterances": len(utterances), "k": k, "chunks": len(grid),
            "train_frames": total - valid_frames, "valid_frames": valid_frames,
            "chunks_resumed": sum(len(job.chunk_starts) for job in jobs if job.part in done),
        },
        metrics={
            "label_rate": float(features_group.attrs["frame_rate"]),
            **{key: value for key, value in measures["labels"].items() if key != "frames"},
            "quality": measures["quality"],
            **({} if agreement is None else {"agreement": {"previous_iteration": iteration - 1, **agreement}}),
            **({} if float16 is None else {"float16_agreement": float16}),
        },
    )


def previous_labels(context: StageContext) -> PreviousLabels:
    """The previous iteration's committed labels, opened for the label tasks."""
    group = context.store.open_zarr(context.layout.labels_store(context.iteration - 1), mode="r")
    return PreviousLabels(group["labels"], group["offsets"][:], stored_geometry(group), int(group.attrs["k"]))


def labels_digest(chunk_digests: list[str], layout: str) -> str:
    """The stage's output digest: its chunks' digests in grid order, and a digest of the offsets and
    ids: the features' digest where the features store holds every utterance (the labels store
    copies its offsets and ids), else `layout_digest`."""
    return digest_json({"labels": digest_digests(chunk_digests), "offsets": layout})


def layout_digest(offsets: np.ndarray, ids: pa.Array | np.ndarray | zarr.Array) -> str:
    """The digest of every utterance's offsets and ids, for labels whose features store holds a sample."""
    return digest_json_with_list({"offsets": digest_bytes(offsets.astype(np.int64).tobytes())}, "utt_ids", id_batches(ids))


def verify_labels(committed: CommittedStage) -> str:
    """The output digest recomputed from every stored chunk."""
    group = committed.store.open_zarr(committed.rel(LABELS_STORE), mode="r")
    layout = committed.record.inputs["features"]
    if group.attrs["features"].get("keep", "all") == "sample":
        layout = layout_digest(group["offsets"][:], group["utt_ids"])
    return labels_digest(stored_chunk_digests(group["labels"]), layout)


def labels_summary(record: StageRecord) -> str:
    quality = record.metrics.get("quality")
    phones = f", PNMI {quality['pnmi']:.3f}, phone purity {quality['phone_purity']:.3f}" if quality else ""
    float16 = record.metrics.get("float16_agreement")
    kept = f", float16 features keep {100 * float16['share']:.2f}% of labels" if float16 else ""
    return f"{record.counts['frames']} frames, {record.metrics['used_clusters']} clusters used{phones}{kept}"


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
