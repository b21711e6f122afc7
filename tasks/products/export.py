"""`hubert-pipeline export`: an iteration's trained encoder and its quantizer as one folder, the bundle.

The bundle (tasks/products/bundle.py) is one folder
that a team uses elsewhere: a Hugging Face `HubertModel` (config.json, model.safetensors), the
same encoder as a torchaudio `wav2vec2_model` state dict, and, where the run fitted one on a
layer of this model, the quantizer (centroids + what they apply to). `hubert_pipeline.json`
records where it all came from and every digest, so `hubert-pipeline units` can refuse a bundle
whose parts do not belong together.
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infra.commit import StageRecord, read_record
from infra.digest import digest_bytes
from infra.store import ArtifactStore
from model.frames import SAMPLE_RATE
from model.hf_convert import NotExportable, hf_layer_index, require_conv_front_end, save_hf_pretrained
from model.presets import HubertConfig, frame_geometry
from model.weights import load_weights
from tasks.products import ExportError
from tasks.products.bundle import (
    BUNDLE,
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    BundleManifest,
    QuantizerManifest,
    torchaudio_encoder_arguments,
)
from tasks.run.layout import RunLayout, Weights
from tasks.run.records import load_centroids
from tasks.run.records import weights_digest as recorded_weights_digest

MASK_EMBEDDING = "mask_generator.mask_embedding"
LAYER_CONVENTION = (
    "layer L (1-based) is the output of transformer layer L before any final layer norm: torchaudio "
    "Wav2Vec2Model.extract_features(x, num_layers=L)[0][L-1]; Hugging Face HubertModel(x, "
    "output_hidden_states=True).hidden_states[hf_hidden_states_index] (transformers >= 5, with the exported "
    "config's tie_last_hidden_states: false); x is the 16 kHz waveform, layer-normalised over the utterance "
    "first when normalize_waveform is true"
)




@dataclass(frozen=True)
class Quantizer:
    """The k-means of iteration N+1, fitted on layer `layer` of iteration N's model."""

    features: StageRecord
    kmeans: StageRecord
    iteration: int

    @property
    def layer(self) -> int:
        return int(self.features.config["source"]["layer"])


def fitted_quantizer(store: ArtifactStore, layout: RunLayout, iteration: int, weights_digest: str) -> Quantizer | None:
    """Iteration N+1's k-means where its features are a layer of exactly these weights, else None."""
    later = iteration + 1
    features = read_record(store, layout.scope(later), "features")
    if features is None:
        return None
    source = features.config.get("source", {})
    if source.get("kind") != "hubert" or source.get("model_digest") != weights_digest:
        return None
    kmeans = read_record(store, layout.scope(later), "kmeans")
    if kmeans is None or kmeans.inputs.get("features") != features.output_digest:
        return None
    return Quantizer(features, kmeans, later)


@dataclass(frozen=True)
class ExportSummary:
    folder: Path
    manifest: BundleManifest
    quantizer: QuantizerManifest | None

    @property
    def has_quantizer(self) -> bool:
        return self.quantizer is not None


def _saved_weights(store: ArtifactStore, layout: RunLayout, iteration: int, weights: Weights) -> tuple[StageRecord, bytes, str]:
    """The train record, the checkpoint's bytes and its path; ExportError when either is absent."""
    train = read_record(store, layout.scope(iteration), "train")
    if train is None:
        raise ExportError(f"iteration {iteration} of {store.url(layout.run)} has no committed train stage")
    relpath = layout.weights(iteration, weights)
    if not store.exists(relpath):
        raise ExportError(f"--weights {weights}: {store.url(relpath)} does not exist (iteration {iteration} kept no {weights} checkpoint)")
    data = store.read_bytes(relpath)
    try:
        recorded = recorded_weights_digest(train, weights)
    except ValueError as error:
        raise ExportError(str(error)) from error
    if digest_bytes(data) != recorded:
        raise ExportError(f"{store.url(relpath)} is not what train@{iteration} committed (its digest differs from the record's)")
    return train, data, relpath


def export_model(
    store: ArtifactStore, layout: RunLayout, iteration: int, out_dir: Path, weights: Weights = "final", overwrite: bool = False
) -> ExportSummary:
    """Write iteration `iteration`'s encoder (and its quantizer, if the run fitted one) as a bundle in `out_dir`.

    A folder that holds anything is refused unless `overwrite`: a bundle replaces files of its
    own names (and its quantizer folder), which may be someone's."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        held = sorted(entry.name for entry in out_dir.iterdir())
        raise ExportError(
            f"{out_dir} is not empty ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}): give an empty or new "
            "folder, or --overwrite to write the bundle over what is there"
        )
    train, data, relpath = _saved_weights(store, layout, iteration, weights)
    weights_digest = digest_bytes(data)
    try:
        saved = load_weights(data)
    except ValueError as error:
        raise ExportError(f"{store.url(relpath)}: {error}") from error
    architecture, state, encoder_state = saved.architecture, saved.state, saved.encoder_state()
    try:
        require_conv_front_end(architecture)
    except NotExportable as error:
        raise ExportError(f"iteration {iteration}'s model: {error}") from error
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUNDLE.manifest).unlink(missing_ok=True)  # written last: a half-written bundle has none
    save_hf_pretrained(out_dir, encoder_state, architecture, state.get(MASK_EMBEDDING))
    buffer = io.BytesIO()
    torch.save(encoder_state, buffer)
    (out_dir / BUNDLE.torchaudio_encoder).write_bytes(buffer.getvalue())
    fitted = fitted_quantizer(store, layout, iteration, weights_digest)
    shutil.rmtree(out_dir / BUNDLE.quantizer_dir, ignore_errors=True)
    quantizer = None if fitted is None else _write_quantizer(store, layout, out_dir, fitted, architecture, weights_digest)
    geometry = frame_geometry(architecture)
    manifest = BundleManifest.model_validate({
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "run": layout.run,
        "run_path": store.url(layout.run),
        "iteration": iteration,
        "weights": weights,
        "weights_path": store.url(relpath),
        "weights_digest": weights_digest,
        "train_record_key": train.key,
        "train_output_digest": train.output_digest,
        "num_classes": saved.num_classes,
        "architecture": architecture,
        "normalize_waveform": architecture.normalize_waveform,
        "sample_rate": SAMPLE_RATE,
        "frame_geometry": {"hop_samples": geometry.hop, "window_samples": geometry.window, "frame_rate": geometry.frame_rate},
        "torchaudio_encoder": {
            "file": BUNDLE.torchaudio_encoder,
            "digest": digest_bytes(buffer.getvalue()),
            "builder": "torchaudio.models.wav2vec2_model",
            "kwargs": torchaudio_encoder_arguments(architecture),
        },
        "hugging_face": {
            "class": "transformers.HubertModel",
            "model_safetensors_digest": digest_bytes((out_dir / "model.safetensors").read_bytes()),
        },
        "quantizer": None if quantizer is None else BUNDLE.quantizer,
    })
    (out_dir / BUNDLE.manifest).write_text(json.dumps(manifest.dumped(), indent=2) + "\n")
    return ExportSummary(out_dir, manifest, quantizer)


def _write_quantizer(
    store: ArtifactStore, layout: RunLayout, out_dir: Path, quantizer: Quantizer, architecture: HubertConfig, weights_digest: str
) -> QuantizerManifest:
    centroids = load_centroids(store, layout, quantizer.iteration)
    if digest_bytes(centroids.tobytes()) != quantizer.kmeans.output_digest:
        raise ExportError(f"the centroids of kmeans@{quantizer.iteration} are not what its record says it committed")
    source = quantizer.features.config["source"]
    geometry = frame_geometry(architecture)
    if (source["hop_samples"], source["window_samples"]) != (geometry.hop, geometry.window):
        raise ExportError(f"features@{quantizer.iteration} has a frame geometry the model of iteration {quantizer.iteration - 1} does not")
    folder = out_dir / BUNDLE.quantizer_dir
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    (out_dir / BUNDLE.centroids).write_bytes(buffer.getvalue())
    description = QuantizerManifest.model_validate({
        "layer": quantizer.layer,
        "k": int(centroids.shape[0]),
        "dim": int(centroids.shape[1]),
        "label_rate": geometry.frame_rate,
        "frame_geometry": {"hop_samples": geometry.hop, "window_samples": geometry.window, "sample_rate": SAMPLE_RATE},
        "centroids": posixpath.basename(BUNDLE.centroids),
        "centroids_digest": quantizer.kmeans.output_digest,
        "model_digest": weights_digest,
        "normalize_waveform": architecture.normalize_waveform,
        "layer_convention": {
            "description": LAYER_CONVENTION,
            "torchaudio": f"Wav2Vec2Model.extract_features(x, num_layers={quantizer.layer})[0][{quantizer.layer - 1}]",
            "hf_hidden_states_index": hf_layer_index(quantizer.layer, architecture),
            "final_layer_norm_applied": False,
        },
        "distance": "squared euclidean, nearest centroid",
        "fitted_in": {
            "iteration": quantizer.iteration,
            "features_record_key": quantizer.features.key,
            "kmeans_record_key": quantizer.kmeans.key,
        },
    })
    (out_dir / BUNDLE.quantizer).write_text(json.dumps(description.dumped(), indent=2) + "\n")
    return description
