"""Stage: frame features of every utterance into one Zarr store, computed on Dask.

`features.zarr` holds `features` [total_frames, dim] float32 (utterances concatenated in manifest
order), `offsets` [n_utts + 1] int64 and `utt_ids` [n_utts]; its attributes record the feature
kind, dim, frame rate and chunking.

Frame counts follow from sample counts, so the whole layout is known before any audio is read.
Each Dask task owns one Zarr chunk of frames: it computes every utterance overlapping the chunk
(an utterance crossing a chunk boundary is computed by both neighbours and each keeps its part),
writes the whole chunk, then leaves a marker with the chunk's digest. No two writers ever touch
the same chunk, and a stage cut off halfway resumes from its marked chunks. The values do not
depend on the number of workers or on resumes.

The feature source (tasks/feature_sources.py) is MFCC at iteration 1 and a layer of the previous
iteration's model after; the store's layout is the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import zarr

from infra.digest import digest_array, digest_bytes, digest_digests, digest_json
from infra.parts import run_parts
from infra.store import EmptyArray, Stage, StageRecord, create_zarr_group
from model.frames import SAMPLE_RATE
from tasks.artifacts import load_manifest, stored_chunk_digests, weights_digest
from tasks.chunks import ChunkJob, frame_offsets, plan_chunks
from tasks.feature_sources import FeatureSource, MfccSource, compute_chunk, layer_source
from tasks.layout import FEATURES_STORE
from tasks.manifest import Utterance
from tasks.stage import CommittedStage, StageContext, StageResult, StageSpec

log = logging.getLogger(__name__)

MAX_CHUNK_TASKS = 4096
MIN_CHUNK_FRAMES = 16384
MAX_CHUNK_BYTES = 256 * 2**20


def choose_chunk_frames(total_frames: int, dim: int) -> int:
    """A power of two: at least MIN_CHUNK_FRAMES, few enough chunks for Dask, small enough for memory."""
    wanted = max(MIN_CHUNK_FRAMES, -(-total_frames // MAX_CHUNK_TASKS))
    frames = 1 << (wanted - 1).bit_length()
    ceiling = 1 << (MAX_CHUNK_BYTES // (4 * dim)).bit_length() - 1
    return max(256, min(frames, ceiling))


def write_feature_chunk(job: ChunkJob, source: FeatureSource, stage: Stage, features: zarr.Array) -> dict[str, Any]:
    """One Dask task: compute, write one whole Zarr chunk, then mark it done.

    `features` is the array as the driver opened it: tasks write without fetching its metadata
    again (two requests per task saved on object storage).
    """
    torch.set_num_threads(1)
    block = compute_chunk(job, source, stage.store.storage_options)
    features[job.start : job.stop] = block
    info = {
        "part": job.part,
        "digest": digest_array(block),
        "audio_seconds": sum(span.samples_16k for span in job.utterances) / SAMPLE_RATE,
    }
    stage.mark_part(job.part, info)
    return info


def _create_store(
    stage: Stage, source: FeatureSource, utterances: list[Utterance], offsets: np.ndarray, chunk_frames: int
) -> None:
    create_zarr_group(
        stage.store,
        stage.rel(FEATURES_STORE),
        attributes={**source.describe(), "sample_rate": SAMPLE_RATE, "chunk_frames": chunk_frames, "stage_key": stage.key},
        # Uncompressed: zstd saved ~12% on MFCC and cost a fifth of the stage's time.
        empty={
            "features": EmptyArray(
                shape=(int(offsets[-1]), source.dim), chunks=(chunk_frames, source.dim), dtype="float32", compressors=None
            )
        },
        whole={"offsets": offsets, "utt_ids": np.array([utterance.id for utterance in utterances])},
    )


def chosen_layer(context: StageContext) -> tuple[int, str]:
    """The layer to take (`features.layer`, or with 'auto' the best by PNMI in the previous
    iteration's layer profile) and why."""
    layer = context.settings.features.layer
    previous = context.iteration - 1
    if layer != "auto":
        return layer, "features.layer"
    profile = context.upstream("features", "model").metrics.get("layer_profile")
    if not profile or profile.get("best_layer") is None:
        raise ValueError(
            f"features@{context.iteration}: layer 'auto' needs iteration {previous}'s layer profile with PNMI, and its "
            f"train record has none (trained before profiles existed, or without alignments): name a layer, or "
            f"re-run with --force train@{previous}"
        )
    best = next(row for row in profile["layers"] if row["layer"] == profile["best_layer"])
    return best["layer"], (
        f"highest PNMI ({best['pnmi']:.4f} at k={profile['k']} on {profile['utterances']} utterances) "
        f"in iteration {previous}'s layer profile"
    )


def feature_source(context: StageContext) -> FeatureSource:
    """MFCC, or a layer of the previous iteration's trained model."""
    if context.settings.features.kind == "mfcc":
        return MfccSource()
    trained = context.upstream("features", "model")
    layer, _ = chosen_layer(context)
    previous = context.iteration - 1
    return layer_source(context.store, context.layout, previous, trained, layer, context.config.weights_for_next(previous))


def features_key_config(context: StageContext) -> dict[str, Any]:
    return {**context.settings.features.model_dump(), "source": feature_source(context).describe()}


def features_key_inputs(context: StageContext) -> dict[str, str]:
    inputs = {"manifest": context.upstream("features", "manifest").output_digest}
    if context.settings.features.kind == "hubert":
        previous = context.iteration - 1
        trained = context.upstream("features", "model")
        inputs["model"] = weights_digest(trained, context.config.weights_for_next(previous))
    return inputs


def features(context: StageContext, stage: Stage) -> StageResult:
    """Compute every utterance's features into `features.zarr`, one Dask task per chunk (resuming
    from the chunks an interrupted run finished)."""
    label = f"features@{context.iteration}"
    source = feature_source(context)
    utterances = load_manifest(context.store, context.layout)
    offsets = frame_offsets(utterances, source.geometry.num_frames)
    chunk_frames = context.settings.features.chunk_frames or choose_chunk_frames(int(offsets[-1]), source.dim)
    jobs = plan_chunks(utterances, offsets, chunk_frames)
    done = stage.done_parts()
    if not done:
        _create_store(stage, source, utterances, offsets, chunk_frames)
    choice = None if source.kind == "mfcc" else chosen_layer(context)
    if choice is not None:
        log.info("%s: layer %d (%s)", label, *choice)
    log.info("%s: %s, %d frames in %d chunk(s) of %d", label, source.kind, int(offsets[-1]), len(jobs), chunk_frames)
    clock = time.perf_counter()
    array = context.store.open_zarr(stage.rel(FEATURES_STORE), mode="r+")["features"]
    parts = run_parts(context.client, stage, jobs, write_feature_chunk, label, done, source=source, features=array)
    compute_seconds = time.perf_counter() - clock
    audio_seconds = sum(utterance.samples_16k for utterance in utterances) / SAMPLE_RATE
    computed_audio_seconds = sum(parts[job.part]["audio_seconds"] for job in jobs if job.part not in done)
    return StageResult(
        output_digest=features_digest(
            [parts[job.part]["digest"] for job in jobs], offsets, [utterance.id for utterance in utterances]
        ),
        counts={
            "utterances": len(utterances),
            "frames": int(offsets[-1]),
            "dim": source.dim,
            "chunks": len(jobs),
            "chunks_resumed": len(done),
            "audio_hours": round(audio_seconds / 3600, 4),
        },
        metrics={
            "frame_rate": source.geometry.frame_rate,
            "audio_seconds_per_second": round(computed_audio_seconds / compute_seconds, 2) if len(done) < len(jobs) else None,
            **({} if choice is None else {"layer": choice[0], "layer_choice": choice[1]}),
        },
    )


def features_digest(chunk_digests: list[str], offsets: np.ndarray, utt_ids: list[str]) -> str:
    """The stage's output digest: its chunks' digests in grid order, the offsets and the ids."""
    return digest_json(
        {"features": digest_digests(chunk_digests), "offsets": digest_bytes(offsets.tobytes()), "utt_ids": utt_ids}
    )


def verify_features(committed: CommittedStage) -> str:
    """The output digest recomputed from every stored chunk."""
    group = committed.store.open_zarr(committed.rel(FEATURES_STORE), mode="r")
    return features_digest(
        stored_chunk_digests(group["features"]), group["offsets"][:], [str(name) for name in group["utt_ids"][:]]
    )


def features_summary(record: StageRecord) -> str:
    return f"{record.counts['frames']} frames x {record.counts['dim']}"


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
