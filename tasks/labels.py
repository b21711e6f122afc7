"""Stage: every feature frame gets its nearest centroid's id, written to `labels.zarr` on Dask.

`labels.zarr` holds `labels` [total_frames] int16, and the features store's `offsets` and `utt_ids`,
chunked like the features: each Dask task reads one features chunk and writes the same rows of
labels, so writers own whole chunks and the stage resumes per chunk like the feature stage. Its
attributes record the label rate and frame geometry, taken from the features store.

Before committing, the stage checks that labels, features and the manifest agree on every
utterance's frame count and names any that do not. Then it measures the labels (tasks/quality.py)
against phone alignments when the corpus has them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client, Future
from prefect import task
from prefect.cache_policies import NONE

from infra.digest import digest_bytes, digest_digests, digest_json
from infra.parts import run_parts
from infra.paths import fingerprint_source
from infra.store import ArtifactStore, Stage, StageRecord, utc_now
from tasks.audio import TARGET_SAMPLE_RATE
from tasks.config import PretrainConfig
from tasks.features import FEATURES_STORE, overlapping_utterances
from tasks.kmeans import load_centroids, nearest_centroids
from tasks.manifest import Utterance
from tasks.quality import LabelTally, alignment_path, frame_segments, label_measures, phone_measures, read_alignment
from tasks.retry import retry_transient

log = logging.getLogger(__name__)

LABELS_VERSION = 1
LABELS_STORE = "labels.zarr"
ALIGNMENT_SUFFIXES = (".tsv",)
TALLY_FAN_IN = 16


class FrameCountMismatch(ValueError):
    """Labels, features and manifest disagree on how many frames an utterance has."""


@dataclass(frozen=True)
class LabelJob:
    index: int
    start: int
    stop: int

    @property
    def part(self) -> str:
        return f"chunk-{self.index:06d}"


def write_label_chunk(job: LabelJob, stage: Stage, centroids: np.ndarray) -> dict[str, Any]:
    """One Dask task: label one features chunk, write the same rows of labels, mark it done."""
    torch.set_num_threads(1)
    rows = stage.store.open_zarr(stage.rel(FEATURES_STORE), mode="r")["features"][job.start : job.stop]
    labels = nearest_centroids(rows, centroids)[0].numpy().astype(np.int16)
    stage.store.open_zarr(stage.rel(LABELS_STORE), mode="r+")["labels"][job.start : job.stop] = labels
    info = {"part": job.part, "digest": digest_bytes(labels.tobytes())}
    stage.mark_part(job.part, info)
    return info


def _create_store(stage: Stage, features: zarr.Group, k: int, centroids_digest: str) -> None:
    group = stage.store.open_zarr(stage.rel(LABELS_STORE), mode="w")
    total, chunk_frames = features["features"].shape[0], features["features"].chunks[0]
    group.create_array("labels", shape=(total,), chunks=(chunk_frames,), dtype="int16")
    for name in ("offsets", "utt_ids"):
        source = features[name]
        group.create_array(name, shape=source.shape, chunks=source.shape, dtype=source.dtype)[:] = source[:]
    attributes = dict(features.attrs)
    group.attrs.update(
        {
            "k": k,
            "label_rate": attributes["frame_rate"],
            "window_samples": attributes["window_samples"],
            "hop_samples": attributes["hop_samples"],
            "sample_rate": attributes["sample_rate"],
            "features": {key: attributes[key] for key in ("kind", "dim", "frame_rate")},
            "centroids_digest": centroids_digest,
            "stage_key": stage.key,
        }
    )


def expected_frames(samples_16k: int, window: int, hop: int) -> int:
    return 0 if samples_16k < window else 1 + (samples_16k - window) // hop


def check_frame_counts(utterances: list[Utterance], features: zarr.Group, labels: zarr.Group) -> None:
    """Raise FrameCountMismatch naming every utterance whose frame counts disagree."""
    window, hop = features.attrs["window_samples"], features.attrs["hop_samples"]
    feature_counts = np.diff(features["offsets"][:])
    label_counts = np.diff(labels["offsets"][:])
    ids = list(features["utt_ids"][:])
    problems = []
    if ids != [u.id for u in utterances] or list(labels["utt_ids"][:]) != ids:
        problems.append("utterance ids or their order differ between manifest, features and labels")
    else:
        for utterance, in_features, in_labels in zip(utterances, feature_counts, label_counts):
            wanted = expected_frames(utterance.samples_16k, window, hop)
            if not wanted == in_features == in_labels:
                problems.append(f"{utterance.id}: audio gives {wanted}, features {in_features}, labels {in_labels}")
    if labels["labels"].shape[0] != features["features"].shape[0]:
        problems.append(f"labels hold {labels['labels'].shape[0]} frames, features {features['features'].shape[0]}")
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise FrameCountMismatch(f"frame counts disagree for {len(problems)} utterance(s):\n  {listed}{more}")


@dataclass(frozen=True)
class TallyJob:
    start: int
    stop: int
    utterances: tuple[tuple[str, int, int], ...]  # (id, offset, frames) overlapping [start, stop)


def tally_chunk(
    job: TallyJob,
    store: ArtifactStore,
    labels_relpath: str,
    k: int,
    geometry: tuple[int, int],
    alignments: str | None,
) -> LabelTally:
    """Label counts, runs and (with alignments) phone/label pairs of one chunk."""
    array = store.open_zarr(labels_relpath, mode="r")["labels"]
    labels = array[job.start : job.stop].astype(np.int64)
    tally = LabelTally(k)
    tally.label_counts += np.bincount(labels, minlength=k)
    window, hop = geometry
    for utterance_id, offset, frames in job.utterances:
        low, high = max(job.start, offset), min(job.stop, offset + frames)
        piece = labels[low - job.start : high - job.start]
        tally.runs += 1 + int(np.count_nonzero(np.diff(piece)))
        if low > offset and int(array[low - 1]) == int(piece[0]):
            tally.runs -= 1  # the run goes on from the previous chunk
        if alignments is None:
            continue
        segments = read_alignment(alignment_path(alignments, utterance_id), store.storage_options)
        if segments is None:
            continue
        tally.aligned_utterances += int(low == offset)
        times = ((np.arange(low, high) - offset) * hop + window / 2) / TARGET_SAMPLE_RATE
        tally.add_aligned(segments, frame_segments(segments, times), piece)
    return tally


def merge_tallies(*tallies: LabelTally) -> LabelTally:
    merged = LabelTally(tallies[0].k)
    for tally in tallies:
        merged.merge(tally)
    return merged


def _reduce_on_cluster(client: Client, futures: list[Future]) -> LabelTally:
    """Merge tallies in a tree on the workers: the driver receives one."""
    while len(futures) > 1:
        futures = [
            client.submit(merge_tallies, *futures[i : i + TALLY_FAN_IN], pure=False)
            for i in range(0, len(futures), TALLY_FAN_IN)
        ]
    return futures[0].result()


def measure_labels(
    client: Client, stage: Stage, labels: zarr.Group, k: int, alignments: str | None
) -> dict[str, Any]:
    offsets = labels["offsets"][:]
    ids = list(labels["utt_ids"][:])
    total, chunk_frames = labels["labels"].shape[0], labels["labels"].chunks[0]
    jobs = []
    for start in range(0, total, chunk_frames):
        stop = min(start + chunk_frames, total)
        spans = tuple(
            (ids[i], int(offsets[i]), int(offsets[i + 1] - offsets[i]))
            for i in overlapping_utterances(offsets, start, stop)
        )
        jobs.append(TallyJob(start, stop, spans))
    geometry = (int(labels.attrs["window_samples"]), int(labels.attrs["hop_samples"]))
    futures = client.map(
        tally_chunk, jobs, store=stage.store, labels_relpath=stage.rel(LABELS_STORE), k=k,
        geometry=geometry, alignments=alignments, pure=False,
    )
    tally = _reduce_on_cluster(client, futures)
    return {"labels": label_measures(tally), "quality": phone_measures(tally)}


def labels_stage(
    config: PretrainConfig, iteration: int, store: ArtifactStore, features: StageRecord, kmeans: StageRecord
) -> Stage:
    inputs = {"features": features.output_digest, "centroids": kmeans.output_digest}
    alignments = config.corpus.alignments
    if alignments is not None:
        inputs["alignments"] = fingerprint_source(alignments, ALIGNMENT_SUFFIXES, config.storage_options)
    return Stage(
        store, config.run, f"iter-{iteration}", "labels",
        version=LABELS_VERSION,
        config={"alignments": alignments},
        inputs=inputs,
    )


def run_labels(
    config: PretrainConfig,
    iteration: int,
    store: ArtifactStore,
    client: Client,
    features: StageRecord,
    kmeans: StageRecord,
    utterances: list[Utterance],
) -> StageRecord:
    """Label every frame into `iter-N/labels.zarr` and measure the labels (skipped if committed)."""
    stage = labels_stage(config, iteration, store, features, kmeans)
    if (record := stage.committed()) is not None:
        log.info("labels@%d: committed earlier (%d frames), skipping", iteration, record.counts["frames"])
        return record
    started_at = utc_now()
    stage.prepare([LABELS_STORE])
    centroids = load_centroids(store, config.run, iteration)
    k = centroids.shape[0]
    features_group = store.open_zarr(stage.rel(FEATURES_STORE), mode="r")
    total, chunk_frames = features_group["features"].shape[0], features_group["features"].chunks[0]
    done = stage.done_parts()
    if not done:
        _create_store(stage, features_group, k, kmeans.output_digest)
    jobs = [LabelJob(i, start, min(start + chunk_frames, total)) for i, start in enumerate(range(0, total, chunk_frames))]
    [shared] = client.scatter([centroids], broadcast=True, hash=False)
    parts = run_parts(client, stage, jobs, write_label_chunk, f"labels@{iteration}", done, centroids=shared)

    labels_group = store.open_zarr(stage.rel(LABELS_STORE), mode="r")
    check_frame_counts(utterances, features_group, labels_group)
    measures = measure_labels(client, stage, labels_group, k, config.corpus.alignments)
    record = stage.commit(
        outputs=[LABELS_STORE],
        output_digest=digest_json(
            {"labels": digest_digests(parts[job.part]["digest"] for job in jobs), "offsets": features.output_digest}
        ),
        started_at=started_at,
        counts={"frames": int(total), "utterances": len(utterances), "k": k, "chunks": len(jobs), "chunks_resumed": len(done)},
        metrics={
            "label_rate": float(labels_group.attrs["label_rate"]),
            **{key: value for key, value in measures["labels"].items() if key != "frames"},
            "quality": measures["quality"],
        },
    )
    quality = measures["quality"]
    log.info(
        "labels@%d: %d frames, %d clusters used%s",
        iteration, total, measures["labels"]["used_clusters"],
        f", PNMI {quality['pnmi']:.3f}, phone purity {quality['phone_purity']:.3f}" if quality else "",
    )
    return record


def export_fairseq_labels(store: ArtifactStore, run: str, iteration: int, out_dir: Path, split: str) -> Path:
    """Write fairseq's `<split>.km` (one line of labels per utterance, manifest order) and `dict.km.txt`."""
    group = store.open_zarr(f"{run}/iter-{iteration}/{LABELS_STORE}", mode="r")
    offsets, array = group["offsets"][:], group["labels"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{split}.km"
    temporary = target.with_suffix(".km.partial")
    chunk_frames = array.chunks[0]
    with temporary.open("w") as handle:
        loaded_start, loaded = 0, np.zeros(0, dtype=np.int16)
        for start, stop in zip(offsets[:-1], offsets[1:]):
            if stop > loaded_start + loaded.shape[0]:
                loaded_start = (start // chunk_frames) * chunk_frames
                loaded = array[loaded_start : max(stop, min(loaded_start + 4 * chunk_frames, array.shape[0]))]
            handle.write(" ".join(map(str, loaded[start - loaded_start : stop - loaded_start].tolist())) + "\n")
    temporary.replace(target)
    (out_dir / "dict.km.txt").write_text("".join(f"{label} 1\n" for label in range(int(group.attrs["k"]))))
    return target


labels_task = task(run_labels, name="labels", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NONE)
