"""The model bundle as one typed object: what `hubert-pipeline export` writes and `units` reads back.

    config.json, model.safetensors, preprocessor_config.json   Hugging Face HubertModel
    torchaudio_encoder.pt                                       state dict of torchaudio's wav2vec2_model
    hubert_pipeline.json                                        `BundleManifest`: where it came from, digests
    quantizer/centroids.npy, quantizer/quantizer.json           `QuantizerManifest`: the k-means fitted on one layer

`load_bundle` reads a folder (local or fsspec URL) and checks, before any work, that its parts
belong together: the encoder file is the one the manifest records, the quantizer was fitted on
exactly these weights, and its centroids are the ones it names and fit the model.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.digest import digest_bytes
from infra.paths import join_path, read_whole
from model.hf_convert import torchaudio_encoder_kwargs
from model.presets import HubertConfig

BUNDLE_FORMAT = "hubert-pipeline-bundle"
BUNDLE_VERSION = 1


@dataclass(frozen=True)
class BundleLayout:
    """File names inside a bundle folder."""

    torchaudio_encoder: str = "torchaudio_encoder.pt"
    manifest: str = "hubert_pipeline.json"
    quantizer_dir: str = "quantizer"
    centroids: str = "quantizer/centroids.npy"
    quantizer: str = "quantizer/quantizer.json"


BUNDLE = BundleLayout()


class BundleError(ValueError):
    """A bundle that is not one, or whose parts do not belong together; or a source with no audio."""

    retryable = False  # a retry reads the same bundle


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class ModelFrames(_Record):
    """The model's frames: frame i covers samples [i * hop, i * hop + window) at 16 kHz."""

    hop_samples: int
    window_samples: int
    frame_rate: float


class QuantizedFrames(_Record):
    """The frames the quantizer labels, with the sample rate they are counted at."""

    hop_samples: int
    window_samples: int
    sample_rate: int


class TorchaudioEncoder(_Record):
    file: str
    digest: str
    builder: str = "torchaudio.models.wav2vec2_model"
    kwargs: dict[str, Any]


class HuggingFaceModel(_Record):
    class_name: str = Field(alias="class")
    model_safetensors_digest: str


class BundleManifest(_Record):
    """hubert_pipeline.json: the run, iteration and weights a bundle holds, and every digest."""

    format: str
    version: int
    run: str
    run_path: str
    iteration: int
    weights: str = Field(description="final | best")
    weights_path: str
    weights_digest: str = Field(description="= the train record's digest of these weights")
    train_record_key: str
    train_output_digest: str
    num_classes: int
    architecture: HubertConfig
    normalize_waveform: bool
    sample_rate: int
    frame_geometry: ModelFrames
    torchaudio_encoder: TorchaudioEncoder
    hugging_face: HuggingFaceModel
    quantizer: str | None = Field(description="the quantizer's description, relative to the bundle; null: none")

    def dumped(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class LayerConvention(_Record):
    description: str
    torchaudio: str
    hf_hidden_states_index: int
    final_layer_norm_applied: bool


class FittedIn(_Record):
    iteration: int
    features_record_key: str
    kmeans_record_key: str


class QuantizerManifest(_Record):
    """quantizer/quantizer.json: the k-means of a later iteration, fitted on one layer of these weights."""

    layer: int
    k: int
    dim: int
    label_rate: float
    frame_geometry: QuantizedFrames
    centroids: str = Field(description="the centroids' file, relative to this one's folder")
    centroids_digest: str
    model_digest: str
    normalize_waveform: bool
    layer_convention: LayerConvention
    distance: str
    fitted_in: FittedIn

    def dumped(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


@dataclass(frozen=True)
class Bundle:
    """An export folder, read and checked: its manifest, its quantizer and centroids."""

    folder: str
    manifest: BundleManifest
    quantizer: QuantizerManifest
    centroids: np.ndarray
    storage_options: dict[str, Any]

    @property
    def digests(self) -> dict[str, str]:
        """What units depend on: the weights, the encoder file, the centroids, and the layer."""
        return {
            "weights": self.manifest.weights_digest,
            "torchaudio_encoder": self.manifest.torchaudio_encoder.digest,
            "centroids": self.quantizer.centroids_digest,
            "layer": str(self.quantizer.layer),
        }

    @property
    def encoder_path(self) -> str:
        return join_path(self.folder, self.manifest.torchaudio_encoder.file)


def check_state_dict(data: bytes, path: str) -> None:
    """BundleError unless `data` is a state dict (names to tensors), read the way the workers read it:
    weights-only, so that a file planted in a bundle runs no code here either."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error of any kind means the same
        raise BundleError(f"{path} is not a state dict of tensors ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BundleError(f"{path} is not a state dict of tensors")


def torchaudio_encoder_arguments(architecture: HubertConfig) -> dict[str, Any]:
    """`torchaudio.models.wav2vec2_model`'s kwargs for an architecture, as a bundle's JSON holds them."""
    return json.loads(json.dumps(torchaudio_encoder_kwargs(architecture)))


def _read(folder: str, relpath: str, storage_options: dict[str, Any], what: str) -> bytes:
    try:
        return read_whole(join_path(folder, relpath), storage_options)
    except FileNotFoundError as error:
        raise BundleError(f"{folder} is not a complete bundle: no {relpath} ({what})") from error


def _parse(model: type[_Record], data: bytes, path: str) -> Any:
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise BundleError(f"{path} is not a hubert-pipeline {model.__name__} ({problems})") from error


def load_bundle(folder: str, storage_options: dict[str, Any] | None = None) -> Bundle:
    """Read a bundle and check that its encoder, weights and quantizer belong together."""
    options = dict(storage_options or {})
    manifest_path = join_path(folder, BUNDLE.manifest)
    manifest: BundleManifest = _parse(
        BundleManifest, _read(folder, BUNDLE.manifest, options, "written last by `hubert-pipeline export`"), manifest_path
    )
    if manifest.format != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path} is not a hubert-pipeline bundle manifest")
    if manifest.quantizer is None:
        raise BundleError(
            f"{folder} has no quantizer: no later iteration of run {manifest.run} clustered a layer of iteration "
            f"{manifest.iteration}'s model (end the run with an iteration that has features, kmeans and no train)"
        )
    quantizer: QuantizerManifest = _parse(
        QuantizerManifest, _read(folder, manifest.quantizer, options, "the quantizer's description"),
        join_path(folder, manifest.quantizer),
    )
    if quantizer.model_digest != manifest.weights_digest:
        raise BundleError(
            f"{join_path(folder, manifest.quantizer)} was fitted on weights {quantizer.model_digest[:12]}, "
            f"but the bundle's model is {manifest.weights_digest[:12]}: refusing to mix them"
        )
    encoder = manifest.torchaudio_encoder
    encoder_bytes = _read(folder, encoder.file, options, "the torchaudio encoder")
    if digest_bytes(encoder_bytes) != encoder.digest:
        raise BundleError(
            f"{join_path(folder, encoder.file)} is not the encoder {manifest_path} records (its content digest differs)"
        )
    check_state_dict(encoder_bytes, join_path(folder, encoder.file))
    centroids_path = posixpath.join(posixpath.dirname(manifest.quantizer), quantizer.centroids)
    centroids = np.load(io.BytesIO(_read(folder, centroids_path, options, "the centroids")), allow_pickle=False)
    if digest_bytes(centroids.tobytes()) != quantizer.centroids_digest:
        raise BundleError(f"{join_path(folder, centroids_path)} is not the centroids its quantizer.json records")
    architecture = manifest.architecture
    if encoder.kwargs != torchaudio_encoder_arguments(architecture):
        raise BundleError(
            f"{manifest_path}: the torchaudio encoder's kwargs are not those of the bundle's architecture; refusing "
            "to build a model from them"
        )
    if centroids.shape != (quantizer.k, architecture.encoder_embed_dim):
        raise BundleError(
            f"centroids of shape {centroids.shape} do not fit k={quantizer.k} and the model's "
            f"{architecture.encoder_embed_dim}-dim layers"
        )
    if not 1 <= quantizer.layer <= architecture.encoder_num_layers:
        raise BundleError(f"quantizer layer {quantizer.layer} is not a layer of the bundle's model")
    return Bundle(folder, manifest, quantizer, centroids, options)
