"""What the feature stage computes per utterance: MFCC, or a transformer layer of a trained model
(from the run's store, or from an exported bundle for `hubert-pipeline units`).

A source pickles (it is sent to Dask workers) and describes everything that determines its
values, so the description goes into the stage key and the features store's attributes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torchaudio

from infra.commit import StageRecord
from infra.digest import digest_bytes
from infra.paths import read_whole
from infra.store import ArtifactStore
from model.frames import FrameGeometry
from model.layer_features import extract_layer_features_batch
from model.mfcc import MFCC_DIM, MFCC_GEOMETRY, mfcc_with_deltas
from model.presets import HubertConfig, frame_geometry
from model.weights import SavedWeights, load_weights
from tasks.corpus.audio import load_utterance_16k
from tasks.frames.chunks import FramesJob, check_finite
from tasks.run.layout import RunLayout, Weights
from tasks.run.records import trained_architecture, weights_digest


class FeatureSource(Protocol):
    """What the feature stage needs to know about a kind of features. Must pickle (sent to workers)."""

    kind: str
    dim: int
    geometry: FrameGeometry

    def describe(self) -> dict[str, Any]:
        """Everything that determines the values (goes into the stage key and the store's attributes).

        Includes `frame_rate`, `window_samples` and `hop_samples` (at 16 kHz): later stages derive
        frame times from these, never from constants of their own.
        """
        ...

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each (samples,) float32 at 16 kHz -> (geometry.num_frames(samples), dim) float32.

        Given a chunk's utterances at once, so a source can batch them.
        """
        ...


def _geometry_description(geometry: FrameGeometry) -> dict[str, Any]:
    return {"frame_rate": geometry.frame_rate, "window_samples": geometry.window, "hop_samples": geometry.hop}


@dataclass(frozen=True)
class MfccSource:
    kind: str = "mfcc"
    dim: int = MFCC_DIM
    geometry: FrameGeometry = MFCC_GEOMETRY

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, **_geometry_description(self.geometry), "recipe": "kaldi-mfcc13+d+dd"}

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        return [mfcc_with_deltas(waveform) for waveform in waveforms_16k]


class _ModelLayer:
    """What a layer of a HuBERT encoder is as features, whatever holds the weights."""

    layer: int
    architecture: HubertConfig
    kind: str

    @property
    def dim(self) -> int:
        return self.architecture.encoder_embed_dim

    @property
    def geometry(self) -> FrameGeometry:
        return frame_geometry(self.architecture)

    def _layer_description(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "dim": self.dim, **_geometry_description(self.geometry)}


@dataclass(frozen=True)
class HubertLayerSource(_ModelLayer):
    """Transformer layer `layer` of an earlier iteration's model, unmasked (50 frames/s for BASE).

    Workers load the model once per process (cached by its digest) and read it from the store, so
    they need no shared disk with the driver; the driver never loads it.
    """

    store: ArtifactStore
    model_relpath: str
    model_digest: str
    layer: int
    architecture: HubertConfig
    kind: str = "hubert"

    def describe(self) -> dict[str, Any]:
        return {**self._layer_description(), "model_digest": self.model_digest}

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.model_digest not in _ENCODERS:
            _ENCODERS.clear()
            saved = read_weights(self.store, self.model_relpath, self.model_digest)
            _ENCODERS[self.model_digest] = saved.encoder(), saved.architecture
        encoder, architecture = _ENCODERS[self.model_digest]
        with torch.inference_mode():
            return extract_layer_features_batch(encoder, waveforms_16k, self.layer, architecture)


@dataclass(frozen=True)
class BundleLayerSource(_ModelLayer):
    """Layer `layer` of an exported encoder (`torchaudio_encoder.pt` of a bundle, tasks/products/export.py).

    Built with `torchaudio.models.wav2vec2_model(**encoder_kwargs)`, so applying a bundle needs no
    run store and no transformers. Workers read the file themselves (local or fsspec URL), check
    its digest and cache the encoder by it.
    """

    encoder_path: str
    encoder_digest: str
    encoder_kwargs: dict[str, Any]
    layer: int
    architecture: HubertConfig
    storage_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "hubert"

    def describe(self) -> dict[str, Any]:
        return {**self._layer_description(), "encoder_digest": self.encoder_digest}

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.encoder_digest not in _ENCODERS:
            _ENCODERS.clear()
            _ENCODERS[self.encoder_digest] = (self._load(), self.architecture)
        encoder, architecture = _ENCODERS[self.encoder_digest]
        with torch.inference_mode():
            return extract_layer_features_batch(encoder, waveforms_16k, self.layer, architecture)

    def _load(self) -> torch.nn.Module:
        data = read_whole(self.encoder_path, self.storage_options)
        if digest_bytes(data) != self.encoder_digest:
            raise ValueError(f"{self.encoder_path} changed: its digest is not the one the bundle records")
        encoder = torchaudio.models.wav2vec2_model(**self.encoder_kwargs)
        encoder.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), strict=True)
        return encoder.eval()


# The encoder a worker process has loaded, by model digest (one at a time).
_ENCODERS: dict[str, tuple[torch.nn.Module, HubertConfig]] = {}


class AlteredWeights(ValueError):
    """A weights file whose content is not what the record that names it says."""

    retryable = False


def read_weights(store: ArtifactStore, relpath: str, digest: str) -> SavedWeights:
    """Saved weights (model/weights.py) read from the store, refused unless their digest is the
    one the train record gives: weights replaced behind a record are never used."""
    data = store.read_bytes(relpath)
    if digest_bytes(data) != digest:
        raise AlteredWeights(
            f"{store.url(relpath)} is not the weights its train record names (digest {digest_bytes(data)[:12]}, "
            f"recorded {digest[:12]}): it was replaced after the commit; `hubert-pipeline verify --deep` names it"
        )
    return load_weights(data)


def layer_source(
    store: ArtifactStore, layout: RunLayout, iteration: int, trained: StageRecord, layer: int, weights: Weights = "final"
) -> HubertLayerSource:
    """Layer `layer` of the model iteration `iteration` trained (its best or final weights),
    described from its train record alone."""
    architecture = trained_architecture(trained)
    if layer > architecture.encoder_num_layers:
        raise ValueError(
            f"features.layer {layer} does not exist: iteration {iteration}'s model has "
            f"{architecture.encoder_num_layers} layers"
        )
    return HubertLayerSource(
        store=store, model_relpath=layout.weights(iteration, weights), model_digest=weights_digest(trained, weights),
        layer=layer, architecture=architecture,
    )


def compute_chunk(job: FramesJob, source: FeatureSource, storage_options: dict[str, Any]) -> np.ndarray:
    """The (stop - start, dim) float32 block of features for one job's frames (a chunk, or a run of them)."""
    waveforms = [load_utterance_16k(span.utterance, storage_options) for span in job.utterances]
    for span, waveform in zip(job.utterances, waveforms):
        if waveform.shape[0] != span.samples_16k:
            raise ValueError(
                f"utterance {span.id} ({span.path}): {waveform.shape[0]} samples at 16 kHz, "
                f"intake recorded {span.samples_16k}; the audio changed since intake"
            )
    block = np.empty((job.stop - job.start, source.dim), dtype=np.float32)
    for span, features in zip(job.utterances, source.compute(waveforms)):
        if tuple(features.shape) != (span.frames, source.dim):
            raise ValueError(
                f"utterance {span.id}: feature source gave shape {tuple(features.shape)}, "
                f"expected ({span.frames}, {source.dim})"
            )
        low, high = span.overlap(job.start, job.stop)
        block[low - job.start : high - job.start] = features[low - span.offset : high - span.offset].numpy()
    check_finite(block, job.start, job.utterances, f"features of {job.part}")
    return block
