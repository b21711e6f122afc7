"""Stage: frame features of every utterance (or of the k-means sample) into one Zarr store, on Dask.

`features.zarr` holds `features` [frames, dim] (float32, or float16 with `features.dtype`; the
utterances concatenated in manifest order), `offsets` [n_utts + 1] int64 and `utt_ids` [n_utts];
its attributes record the feature kind, dim, frame rate, chunking, dtype and what it keeps. With
`features.keep: sample` it holds only the training utterances k-means fits on
(tasks/frames/store.py chooses them), with their own offsets and `utt_indices`, their places in
the manifest; the label stage computes the others' features when it labels them.

Frame counts follow from sample counts, so the whole layout is known before any audio is read.
Each Dask task owns one Zarr chunk of frames: it computes every utterance overlapping the chunk
(an utterance crossing a chunk boundary is computed by both neighbours and each keeps its part),
writes the whole chunk, then leaves a marker with the chunk's digest. No two writers ever touch
the same chunk, and a stage cut off halfway resumes from its marked chunks. The values do not
depend on the number of workers or on resumes.

The feature source (tasks/frames/sources.py) is MFCC at iteration 1 and a layer of the previous
iteration's model after; the store's layout is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import zarr

from infra.commit import Stage, StageRecord
from infra.digest import digest_array, digest_bytes, digest_digests, digest_json_with_list
from infra.parts import run_parts
from infra.zarr_io import EmptyArray, create_zarr_group
from model.frames import SAMPLE_RATE
from tasks.corpus.manifest import Manifest
from tasks.frames.chunks import ChunkJob, frame_offsets, plan_chunks
from tasks.frames.sources import FeatureSource, compute_chunk
from tasks.frames.store import (
    IDS_CHUNK,
    as_stored,
    chosen_layer,
    feature_source,
    grid_chunk_frames,
    id_batches,
    kmeans_sample,
    model_input,
    stored_chunk_digests,
    write_ids,
)
from tasks.run.keys import key_settings
from tasks.run.layout import FEATURES_STORE
from tasks.run.records import load_manifest, manifest_rows
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)


def write_feature_chunk(
    job: ChunkJob, source: FeatureSource, dtype: str, stage: Stage, features: zarr.Array
) -> dict[str, Any]:
    """One Dask task: compute, write one whole Zarr chunk (as `dtype`), then mark it done.

    `features` is the array as the driver opened it: tasks write without fetching its metadata
    again (two requests per task saved on object storage).
    """
    torch.set_num_threads(1)
    block = as_stored(compute_chunk(job, source, stage.store.storage_options), dtype, job)
    features[job.start : job.stop] = block
    info = {
        "part": job.part,
        "digest": digest_array(block),
        "audio_seconds": sum(span.samples_16k for span in job.utterances) / SAMPLE_RATE,
    }
    stage.mark_part(job.part, info)
    return info


def _create_store(
    stage: Stage, source: FeatureSource, ids: pa.Array, indices: np.ndarray | None, offsets: np.ndarray,
    chunk_frames: int, dtype: str,
) -> None:
    """The store, its arrays empty but `offsets`, `utt_ids` (written a block at a time) and (for a
    sample) `utt_indices`."""
    whole = {"offsets": offsets}
    if indices is not None:
        whole["utt_indices"] = indices
    create_zarr_group(
        stage.store,
        stage.rel(FEATURES_STORE),
        attributes={
            **source.describe(), "sample_rate": SAMPLE_RATE, "chunk_frames": chunk_frames, "stage_key": stage.key,
            "dtype": dtype, "keep": "all" if indices is None else "sample",
        },
        # Uncompressed: zstd saved ~12% on MFCC and cost a fifth of the stage's time.
        empty={
            "features": EmptyArray(
                shape=(int(offsets[-1]), source.dim), chunks=(chunk_frames, source.dim), dtype=dtype, compressors=None
            ),
            "utt_ids": EmptyArray(shape=(len(ids),), chunks=(IDS_CHUNK,), dtype="str"),
        },
        whole=whole,
        replace=not stage.fresh,
    )
    write_ids(stage.store.open_zarr(stage.rel(FEATURES_STORE), mode="r+")["utt_ids"], ids)


def features_key_config(context: StageContext) -> dict[str, Any]:
    """The features section (its storage settings where not defaults) and the source; with `keep:
    sample` also the k-means settings that choose the sample."""
    settings = context.settings.features
    config = {**key_settings(settings), "source": feature_source(context).describe()}
    if settings.keep == "sample":
        kmeans = context.settings.kmeans
        config["sample"] = {"sample_fraction": kmeans.sample_fraction, "max_frames": kmeans.max_frames, "seed": kmeans.seed}
    return config


def features_key_inputs(context: StageContext) -> dict[str, str]:
    return {"manifest": context.upstream("features", "manifest").output_digest, **model_input(context)}


def features(context: StageContext, stage: Stage) -> StageResult:
    """Compute the features of every utterance (or of the k-means sample) into `features.zarr`, one
    Dask task per chunk (resuming from the chunks an interrupted run finished)."""
    label = f"features@{context.iteration}"
    settings = context.settings.features
    source = feature_source(context)
    utterances = load_manifest(context.store, context.layout, columns=["id", "samples", "sample_rate", "split"])
    indices = None
    if settings.keep == "sample":
        indices = kmeans_sample(utterances, frame_offsets(utterances, source.geometry.num_frames), context.settings.kmeans)
    stored = utterances if indices is None else utterances.take(indices)
    offsets = frame_offsets(stored, source.geometry.num_frames)
    chunk_frames = grid_chunk_frames(settings, int(offsets[-1]), source.dim)
    jobs = plan_chunks(manifest_rows(context.store, context.layout), offsets, chunk_frames, indices)
    done = stage.done_parts()
    if not done:
        _create_store(stage, source, stored.ids(), indices, offsets, chunk_frames, settings.dtype)
    choice = None if source.kind == "mfcc" else chosen_layer(context)
    if choice is not None:
        log.info("%s: layer %d (%s)", label, *choice)
    kept = "" if indices is None else f" of the k-means sample ({len(stored)} of {len(utterances)} utterances)"
    log.info(
        "%s: %s as %s, %d frames%s in %d chunk(s) of %d",
        label, source.kind, settings.dtype, int(offsets[-1]), kept, len(jobs), chunk_frames,
    )
    clock = time.perf_counter()
    array = context.store.open_zarr(stage.rel(FEATURES_STORE), mode="r+")["features"]
    parts = run_parts(
        context.client, stage, jobs, write_feature_chunk, label, done, source=source, dtype=settings.dtype, features=array
    )
    compute_seconds = time.perf_counter() - clock
    audio_seconds = int(stored.samples_16k().sum()) / SAMPLE_RATE
    computed_audio_seconds = sum(parts[job.part]["audio_seconds"] for job in jobs if job.part not in done)
    return StageResult(
        output_digest=features_digest([parts[job.part]["digest"] for job in jobs], offsets, id_batches(stored.ids()), indices),
        counts={
            "utterances": len(stored),
            "frames": int(offsets[-1]),
            "dim": source.dim,
            "chunks": len(jobs),
            "chunks_resumed": len(done),
            "audio_hours": round(audio_seconds / 3600, 4),
            **({} if indices is None else corpus_counts(utterances, source)),
        },
        metrics={
            "frame_rate": source.geometry.frame_rate,
            "keep": settings.keep,
            "dtype": settings.dtype,
            "audio_seconds_per_second": round(computed_audio_seconds / compute_seconds, 2) if len(done) < len(jobs) else None,
            **({} if choice is None else {"layer": choice[0], "layer_choice": choice[1]}),
        },
    )


def corpus_counts(utterances: Manifest, source: FeatureSource) -> dict[str, int | float]:
    """What the whole corpus has, beside what a sample store holds."""
    samples_16k = utterances.samples_16k()
    return {
        "corpus_utterances": len(utterances),
        "corpus_frames": int(source.geometry.num_frames(samples_16k).sum()),
        "corpus_audio_hours": round(int(samples_16k.sum()) / SAMPLE_RATE / 3600, 4),
    }


def features_digest(
    chunk_digests: list[str], offsets: np.ndarray, utt_ids: Iterable[list[str]], indices: np.ndarray | None = None
) -> str:
    """The stage's output digest: its chunks' digests in grid order, the offsets and the ids (given
    in batches, `id_batches`; digested as one list) and for a sample store, the utterances'
    manifest indices."""
    digested = {"features": digest_digests(chunk_digests), "offsets": digest_bytes(offsets.tobytes())}
    if indices is not None:
        digested["utt_indices"] = digest_bytes(indices.astype(np.int64).tobytes())
    return digest_json_with_list(digested, "utt_ids", utt_ids)


def verify_features(committed: CommittedStage) -> str:
    """The output digest recomputed from every stored chunk."""
    group = committed.store.open_zarr(committed.rel(FEATURES_STORE), mode="r")
    indices = group["utt_indices"][:] if "utt_indices" in group else None
    return features_digest(stored_chunk_digests(group["features"]), group["offsets"][:], id_batches(group["utt_ids"]), indices)


def features_summary(record: StageRecord) -> str:
    counts = record.counts
    kept = f" of {counts['corpus_frames']} (the k-means sample)" if "corpus_frames" in counts else ""
    return f"{counts['frames']} frames{kept} x {counts['dim']}, {record.metrics.get('dtype', 'float32')}"


FEATURES = StageSpec(
    name="features",
    version=1,
    outputs=(FEATURES_STORE,),
    key_config=features_key_config,
    key_inputs=features_key_inputs,
    work=features,
    summary=features_summary,
    verify_digest=verify_features,
)
