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

The feature source is a parameter: MFCC at iteration 1, a model layer after (same store layout).
"""

from __future__ import annotations

import io
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from distributed import Client
from prefect import task
from prefect.cache_policies import NONE

from infra.digest import digest_bytes, digest_digests, digest_json
from infra.parts import run_parts
from infra.store import ArtifactStore, EmptyArray, Stage, StageRecord, create_zarr_group, utc_now
from model.data import FrameGeometry
from model.hubert import HubertConfig, build_pretrain_model, hop, receptive_field
from model.layer_features import extract_layer_features_batch
from model.mfcc import FRAME_RATE, HOP_SAMPLES, MFCC_DIM, WINDOW_SAMPLES, mfcc_num_frames, mfcc_with_deltas
from tasks.audio import TARGET_SAMPLE_RATE, load_audio_16k
from tasks.config import FeaturesConfig, PretrainConfig
from tasks.manifest import Utterance
from tasks.retry import retry_transient

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
FEATURES_STORE = "features.zarr"
MAX_CHUNK_TASKS = 4096
MIN_CHUNK_FRAMES = 16384
MAX_CHUNK_BYTES = 256 * 2**20


class FeatureSource(Protocol):
    """What the feature stage needs to know about a kind of features. Must pickle (sent to workers)."""

    kind: str
    dim: int
    frame_rate: float

    def num_frames(self, samples_16k: int) -> int: ...

    def describe(self) -> dict[str, Any]:
        """Everything that determines the values (goes into the stage key and the store's attributes).

        Includes `frame_rate`, `window_samples` and `hop_samples` (at 16 kHz): later stages derive
        frame times from these, never from constants of their own.
        """
        ...

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each (samples,) float32 at 16 kHz -> (num_frames(samples), dim) float32.

        Given a chunk's utterances at once, so a source can batch them.
        """
        ...


@dataclass(frozen=True)
class MfccSource:
    kind: str = "mfcc"
    dim: int = MFCC_DIM
    frame_rate: float = FRAME_RATE

    def num_frames(self, samples_16k: int) -> int:
        return mfcc_num_frames(samples_16k)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "window_samples": WINDOW_SAMPLES,
            "hop_samples": HOP_SAMPLES,
            "recipe": "kaldi-mfcc13+d+dd",
        }

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        return [mfcc_with_deltas(waveform) for waveform in waveforms_16k]


@dataclass(frozen=True)
class HubertLayerSource:
    """Transformer layer `layer` of an earlier iteration's model, unmasked (50 frames/s for BASE).

    Workers load the model once per process (cached by its digest) and read it from the store, so
    they need no shared disk with the driver.
    """

    store: ArtifactStore
    model_relpath: str
    model_digest: str
    layer: int
    dim: int
    hop_samples: int
    window_samples: int
    kind: str = "hubert"

    @property
    def frame_rate(self) -> float:
        return TARGET_SAMPLE_RATE / self.hop_samples

    def num_frames(self, samples_16k: int) -> int:
        return FrameGeometry(hop=self.hop_samples, window=self.window_samples).num_frames(samples_16k)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layer": self.layer,
            "dim": self.dim,
            "frame_rate": self.frame_rate,
            "window_samples": self.window_samples,
            "hop_samples": self.hop_samples,
            "model_digest": self.model_digest,
        }

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.model_digest not in _ENCODERS:
            _ENCODERS.clear()
            _ENCODERS[self.model_digest] = _load_encoder(self.store, self.model_relpath)
        encoder, architecture = _ENCODERS[self.model_digest]
        with torch.inference_mode():
            return extract_layer_features_batch(encoder, waveforms_16k, self.layer, architecture)


# The encoder a worker process has loaded, by model digest (one at a time).
_ENCODERS: dict[str, tuple[torch.nn.Module, HubertConfig]] = {}


def _read_saved_model(store: ArtifactStore, relpath: str) -> tuple[dict[str, Any], HubertConfig]:
    saved = torch.load(io.BytesIO(store.read_bytes(relpath)), map_location="cpu", weights_only=False)
    return saved, HubertConfig.model_validate(saved["config"])


def _load_encoder(store: ArtifactStore, relpath: str) -> tuple[torch.nn.Module, HubertConfig]:
    saved, architecture = _read_saved_model(store, relpath)
    model = build_pretrain_model(architecture, num_classes=saved["num_classes"])
    model.load_state_dict(saved["model"])
    return model.wav2vec2.eval(), architecture


def hubert_layer_source(
    store: ArtifactStore, run: str, previous_iteration: int, trained: StageRecord, layer: int
) -> HubertLayerSource:
    """The feature source for layer `layer` of iteration `previous_iteration`'s final model."""
    relpath = posixpath.join(run, f"iter-{previous_iteration}", "model", "final.pt")
    saved, architecture = _read_saved_model(store, relpath)
    if layer > architecture.encoder_num_layers:
        raise ValueError(
            f"features.layer {layer} does not exist: iteration {previous_iteration}'s "
            f"'{saved['architecture']}' model has {architecture.encoder_num_layers} layers"
        )
    return HubertLayerSource(
        store=store,
        model_relpath=relpath,
        model_digest=trained.output_digest,
        layer=layer,
        dim=architecture.encoder_embed_dim,
        hop_samples=hop(architecture),
        window_samples=receptive_field(architecture),
    )


@dataclass(frozen=True)
class UtteranceSpan:
    """Where one utterance's frames sit in the concatenated features array."""

    id: str
    path: str
    samples_16k: int
    offset: int
    frames: int


@dataclass(frozen=True)
class ChunkJob:
    index: int
    start: int
    stop: int
    utterances: tuple[UtteranceSpan, ...]

    @property
    def part(self) -> str:
        return f"chunk-{self.index:06d}"


def choose_chunk_frames(total_frames: int, dim: int) -> int:
    """A power of two: at least MIN_CHUNK_FRAMES, few enough chunks for Dask, small enough for memory."""
    wanted = max(MIN_CHUNK_FRAMES, -(-total_frames // MAX_CHUNK_TASKS))
    frames = 1 << (wanted - 1).bit_length()
    ceiling = 1 << (MAX_CHUNK_BYTES // (4 * dim)).bit_length() - 1
    return max(256, min(frames, ceiling))


def frame_offsets(utterances: list[Utterance], source: FeatureSource) -> np.ndarray:
    frames = [source.num_frames(utterance.samples_16k) for utterance in utterances]
    return np.concatenate([[0], np.cumsum(frames, dtype=np.int64)]).astype(np.int64)


def overlapping_utterances(offsets: np.ndarray, start: int, stop: int) -> list[int]:
    """Indices of the utterances with frames in [start, stop), given concatenation offsets."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    return [i for i in range(max(first, 0), last) if offsets[i + 1] > start and offsets[i] < stop]


def utterance_spans(utterances: list[Utterance], offsets: np.ndarray, start: int, stop: int) -> tuple[UtteranceSpan, ...]:
    """The utterances whose frames overlap [start, stop), with where their frames sit."""
    return tuple(
        UtteranceSpan(
            id=utterances[i].id,
            path=utterances[i].path,
            samples_16k=utterances[i].samples_16k,
            offset=int(offsets[i]),
            frames=int(offsets[i + 1] - offsets[i]),
        )
        for i in overlapping_utterances(offsets, start, stop)
    )


def plan_chunks(utterances: list[Utterance], offsets: np.ndarray, chunk_frames: int) -> list[ChunkJob]:
    """One job per Zarr chunk, with the utterances whose frames overlap it."""
    total = int(offsets[-1])
    jobs = []
    for index, start in enumerate(range(0, total, chunk_frames)):
        stop = min(start + chunk_frames, total)
        jobs.append(ChunkJob(index=index, start=start, stop=stop, utterances=utterance_spans(utterances, offsets, start, stop)))
    return jobs


def compute_chunk(job: ChunkJob, source: FeatureSource, storage_options: dict[str, Any]) -> np.ndarray:
    """The (stop - start, dim) block of features for one chunk."""
    waveforms = [load_audio_16k(span.path, storage_options) for span in job.utterances]
    for span, waveform in zip(job.utterances, waveforms):
        if waveform.shape[0] != span.samples_16k:
            raise ValueError(
                f"utterance {span.id} ({span.path}): {waveform.shape[0]} samples at 16 kHz, "
                f"intake recorded {span.samples_16k}; the file changed since intake"
            )
    block = np.empty((job.stop - job.start, source.dim), dtype=np.float32)
    for span, features in zip(job.utterances, source.compute(waveforms)):
        if tuple(features.shape) != (span.frames, source.dim):
            raise ValueError(
                f"utterance {span.id}: feature source gave shape {tuple(features.shape)}, "
                f"expected ({span.frames}, {source.dim})"
            )
        low, high = max(job.start, span.offset), min(job.stop, span.offset + span.frames)
        block[low - job.start : high - job.start] = features[low - span.offset : high - span.offset].numpy()
    return block


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
        "digest": digest_bytes(block.tobytes()),
        "audio_seconds": sum(span.samples_16k for span in job.utterances) / TARGET_SAMPLE_RATE,
    }
    stage.mark_part(job.part, info)
    return info


def _create_store(
    stage: Stage, source: FeatureSource, utterances: list[Utterance], offsets: np.ndarray, chunk_frames: int
) -> None:
    create_zarr_group(
        stage.store,
        stage.rel(FEATURES_STORE),
        attributes={**source.describe(), "sample_rate": TARGET_SAMPLE_RATE, "chunk_frames": chunk_frames, "stage_key": stage.key},
        # Uncompressed: zstd saved ~12% on MFCC and cost a fifth of the stage's time.
        empty={
            "features": EmptyArray(
                shape=(int(offsets[-1]), source.dim), chunks=(chunk_frames, source.dim), dtype="float32", compressors=None
            )
        },
        whole={"offsets": offsets, "utt_ids": np.array([utterance.id for utterance in utterances])},
    )


def features_stage(
    config: PretrainConfig, iteration: int, store: ArtifactStore, intake: StageRecord, source: FeatureSource
) -> Stage:
    features: FeaturesConfig = config.iterations[iteration - 1].features
    description = source.describe()
    inputs = {"manifest": intake.output_digest}
    if "model_digest" in description:
        inputs["model"] = description["model_digest"]
    return Stage(
        store, config.run, f"iter-{iteration}", "features",
        version=FEATURES_VERSION,
        config={**features.model_dump(), "source": description},
        inputs=inputs,
    )


def run_features(
    config: PretrainConfig,
    iteration: int,
    store: ArtifactStore,
    client: Client,
    intake: StageRecord,
    utterances: list[Utterance],
    source: FeatureSource,
) -> StageRecord:
    """Compute `iter-N/features.zarr` (skipped if committed; resumes from finished chunks)."""
    stage = features_stage(config, iteration, store, intake, source)
    if (record := stage.committed()) is not None:
        log.info("features@%d: committed earlier (%d frames), skipping", iteration, record.counts.get("frames", 0))
        return record
    started_at = utc_now()
    stage.prepare([FEATURES_STORE])
    offsets = frame_offsets(utterances, source)
    chunk_frames = config.iterations[iteration - 1].features.chunk_frames or choose_chunk_frames(
        int(offsets[-1]), source.dim
    )
    jobs = plan_chunks(utterances, offsets, chunk_frames)
    done = stage.done_parts()
    if not done:
        _create_store(stage, source, utterances, offsets, chunk_frames)
    log.info(
        "features@%d: %s, %d frames in %d chunk(s) of %d", iteration, source.kind, int(offsets[-1]), len(jobs), chunk_frames
    )
    clock = time.perf_counter()
    features = store.open_zarr(stage.rel(FEATURES_STORE), mode="r+")["features"]
    parts = run_parts(
        client, stage, jobs, write_feature_chunk, f"features@{iteration}", done, source=source, features=features
    )
    compute_seconds = time.perf_counter() - clock
    audio_seconds = sum(utterance.samples_16k for utterance in utterances) / TARGET_SAMPLE_RATE
    computed_audio_seconds = sum(parts[job.part]["audio_seconds"] for job in jobs if job.part not in done)
    record = stage.commit(
        outputs=[FEATURES_STORE],
        output_digest=digest_json(
            {
                "features": digest_digests(parts[job.part]["digest"] for job in jobs),
                "offsets": digest_bytes(offsets.tobytes()),
                "utt_ids": [utterance.id for utterance in utterances],
            }
        ),
        started_at=started_at,
        counts={
            "utterances": len(utterances),
            "frames": int(offsets[-1]),
            "dim": source.dim,
            "chunks": len(jobs),
            "chunks_resumed": len(done),
            "audio_hours": round(audio_seconds / 3600, 4),
        },
        metrics={
            "frame_rate": source.frame_rate,
            "audio_seconds_per_second": round(computed_audio_seconds / compute_seconds, 2) if len(done) < len(jobs) else None,
        },
    )
    log.info("features@%d: committed %d frames in %.1f s", iteration, int(offsets[-1]), record.seconds)
    return record


features_task = task(
    run_features, name="features", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NONE
)
