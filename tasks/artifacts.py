"""Reading what stages committed: the manifest, centroids, and what a trained model is.

Shared by the stages that consume these artifacts, so that no stage imports another to read
its neighbour's output.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from infra.commit import StageRecord
from infra.digest import digest_array
from infra.store import ArtifactStore
from model.frames import FrameGeometry
from model.presets import HUBERT_CONFIGS, HubertConfig
from tasks.chunks import chunk_grid
from tasks.layout import RunLayout, Weights
from tasks.manifest import Utterance, manifest_from_jsonl


def load_manifest(store: ArtifactStore, layout: RunLayout) -> list[Utterance]:
    """The utterances intake accepted, in manifest order."""
    return manifest_from_jsonl(store.read_text(layout.manifest))


def load_centroids(store: ArtifactStore, layout: RunLayout, iteration: int) -> np.ndarray:
    """The (k, dim) float32 centroids of an iteration's k-means."""
    return read_npy(store, layout.centroids(iteration))


def read_npy(store: ArtifactStore, relpath: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(relpath)))


def stored_chunk_digests(array: zarr.Array) -> list[str]:
    """`digest_array` of each chunk of the grid along an array's first axis, as stored (read a few at a time)."""
    grid = chunk_grid(array.shape[0], array.chunks[0])
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda chunk: digest_array(array[chunk.start : chunk.stop]), grid))


def trained_architecture(train: StageRecord) -> HubertConfig:
    """The architecture a train record's model has, without loading its weights.

    The record carries it (`metrics.architecture`); records from before it did name their preset.
    """
    recorded = train.metrics.get("architecture")
    if recorded is not None:
        return HubertConfig.model_validate(recorded)
    return HUBERT_CONFIGS[train.config["model"]]


def weights_digest(train: StageRecord, weights: Weights) -> str:
    """The digest of a train record's best or final weights (`metrics.weights_digests`; for
    records from before it, the final weights', which is the record's output digest)."""
    digests = train.metrics.get("weights_digests", {"final": train.output_digest})
    if weights not in digests:
        raise ValueError(
            f"the train record in {train.scope} lists no {weights} weights (it had no validation split); "
            f"it has {sorted(digests)}"
        )
    return digests[weights]


def published_digests(record: StageRecord) -> set[str]:
    """Every digest a later stage may name as its input from this record: its output digest, and a
    train record's weights (a consumer names the best or the final ones)."""
    return {record.output_digest, *record.metrics.get("weights_digests", {}).values()}


def stored_geometry(group: zarr.Group) -> FrameGeometry:
    """The frame geometry a features or labels store records in its attributes."""
    return FrameGeometry(hop=int(group.attrs["hop_samples"]), window=int(group.attrs["window_samples"]))
