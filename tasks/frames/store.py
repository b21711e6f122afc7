"""What the features store holds, as the stage that writes it and the stages that read it agree.

An iteration's features come from one source (tasks/frames/sources.py): MFCC at iteration 1, a
layer of the previous iteration's model after. `features.keep` says which utterances the store
holds: every one (`all`), or only the training utterances k-means fits on (`sample`), each with
its own offsets and its manifest index (`utt_indices`); with `sample` the label stage computes
every utterance's features again on the fly, from the same source. `features.dtype` says how
the values are stored (float32 or float16); whoever reads them computes in float32.

The chunk grid of every utterance's frames does not depend on the dtype or on what is kept: a
label task with `keep: sample` computes the very chunks the feature stage computes with `keep:
all`, so the same utterances are batched together and the labels are those of `keep: all`.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from infra.digest import digest_array
from model.frames import FrameGeometry
from tasks.corpus.manifest import Manifest
from tasks.corpus.splits import hash_fractions
from tasks.frames.chunks import FramesJob, check_finite, chunk_grid
from tasks.frames.sources import FeatureSource, MfccSource, layer_source
from tasks.run.records import weights_digest
from tasks.run.sections import FeaturesConfig, KMeansConfig
from tasks.run.stage import StageContext

MAX_CHUNK_TASKS = 4096
MIN_CHUNK_FRAMES = 16384
MIN_CHUNK_BYTES = 8 * 2**20
"""Low-dimensional features (MFCC: 39 floats a frame) get chunks of at least this many bytes: each
chunk is one object-store GET or PUT, whose fixed cost (request signing and parsing here, a first
byte's latency on a remote store) wants objects of several MB."""
MIN_CHUNKS = 8
"""MIN_CHUNK_BYTES yields to MIN_CHUNK_FRAMES where it would cut the corpus into fewer chunks than
this: a corpus of minutes keeps a few tasks to spread over the workers."""
MAX_CHUNK_BYTES = 256 * 2**20
IDS_CHUNK = 65_536
"""Utterance ids per chunk of a store's `utt_ids`: written and read a block at a time."""
SAMPLE_SALT = "kmeans-sample"
"""Prefixed to an utterance id before hashing, so the k-means sample is not the validation split's hash."""


def choose_chunk_frames(total_frames: int, dim: int) -> int:
    """A power of two (rounded up): at least MIN_CHUNK_FRAMES, and MIN_CHUNK_BYTES where the corpus
    has MIN_CHUNKS such chunks; few enough chunks for Dask, small enough for memory.

    Sized for float32 whatever the stored dtype, so that the grid never depends on it."""
    frame_bytes = 4 * dim
    by_bytes = min(MIN_CHUNK_BYTES // frame_bytes, total_frames // MIN_CHUNKS)
    wanted = max(MIN_CHUNK_FRAMES, by_bytes, -(-total_frames // MAX_CHUNK_TASKS))
    frames = 1 << (wanted - 1).bit_length()
    ceiling = 1 << (MAX_CHUNK_BYTES // frame_bytes).bit_length() - 1
    return max(256, min(frames, ceiling))


def grid_chunk_frames(settings: FeaturesConfig, total_frames: int, dim: int) -> int:
    """`features.chunk_frames`, or one chosen from the frames to cut."""
    return settings.chunk_frames or choose_chunk_frames(total_frames, dim)


def chosen_layer(context: StageContext) -> tuple[int, str]:
    """The layer to take (`features.layer`, or with 'auto' the best by PNMI in the previous
    iteration's layer profile) and why."""
    layer = context.settings.features.layer
    previous = context.iteration - 1
    if layer != "auto":
        return layer, "features.layer"
    profile = context.upstream("features", "profile").metrics
    if profile.get("best_layer") is None:
        raise ValueError(
            f"features@{context.iteration}: layer 'auto' needs iteration {previous}'s layer profile with PNMI, and "
            f"profile@{previous} measured none (no phone alignments): name a layer"
        )
    best = next(row for row in profile["layers"] if row["layer"] == profile["best_layer"])
    return best["layer"], (
        f"highest PNMI ({best['pnmi']:.4f} at k={profile['k']} on {profile['utterances']} utterances) "
        f"in iteration {previous}'s layer profile"
    )


def feature_source(context: StageContext) -> FeatureSource:
    """MFCC, or a layer of the previous iteration's trained model: the iteration's features, for
    the feature stage and for a label stage that computes them on the fly."""
    if context.settings.features.kind == "mfcc":
        return MfccSource()
    trained = context.upstream("features", "model")
    layer, _ = chosen_layer(context)
    previous = context.iteration - 1
    return layer_source(context.store, context.layout, previous, trained, layer, context.config.weights_for_next(previous))


def model_input(context: StageContext) -> dict[str, str]:
    """`{"model": digest}` of the weights a hubert source reads; empty for MFCC."""
    if context.settings.features.kind != "hubert":
        return {}
    previous = context.iteration - 1
    return {"model": weights_digest(context.upstream("features", "model"), context.config.weights_for_next(previous))}


def kmeans_sample(utterances: Manifest, offsets: np.ndarray, settings: KMeansConfig) -> np.ndarray:
    """Manifest indices (in order) of the training utterances a `keep: sample` store holds.

    Whole utterances, ranked by `sha256("<seed>:kmeans-sample:<id>")`, lowest first, until their
    frames reach `sample_fraction` of the training frames (at most `max_frames`): the sample k-means
    fits on, within one utterance of its size. The rank of an utterance depends on its id and the
    seed alone, so adding files to a corpus moves few utterances in or out."""
    utterances = Manifest.of(utterances)
    frames = np.diff(offsets)
    training = np.flatnonzero(~utterances.is_valid())
    wanted = settings.sample_fraction * int(frames[training].sum())
    if settings.max_frames is not None:
        wanted = min(wanted, settings.max_frames)
    salted = pc.binary_join_element_wise(f"{SAMPLE_SALT}", utterances.ids().take(pa.array(training)), ":")
    ranked = training[np.argsort(hash_fractions(salted, settings.seed), kind="stable")]
    before = np.concatenate([[0], np.cumsum(frames[ranked], dtype=np.int64)[:-1]])
    return np.sort(ranked[: int(np.searchsorted(before, wanted, side="left"))]).astype(np.int64)


def id_batches(ids: pa.Array | pa.ChunkedArray | np.ndarray | zarr.Array, size: int = IDS_CHUNK) -> Iterator[list[str]]:
    """Utterance ids as lists of `size` (an Arrow column, a numpy array or a store's `utt_ids`)."""
    for start in range(0, len(ids) if not isinstance(ids, zarr.Array) else ids.shape[0], size):
        if isinstance(ids, (pa.Array, pa.ChunkedArray)):
            yield ids.slice(start, size).to_pylist()
        else:
            yield [str(name) for name in ids[start : start + size]]


def write_ids(array: zarr.Array, ids: pa.Array | pa.ChunkedArray) -> None:
    """Fill a store's `utt_ids` (chunked by IDS_CHUNK) from an Arrow column, a chunk at a time."""
    for start, block in zip(range(0, len(ids), IDS_CHUNK), id_batches(ids)):
        array[start : start + len(block)] = np.array(block, dtype=object)


def stored_keep(group: zarr.Group) -> str:
    """'all' or 'sample': what a features store holds (stores from before the setting hold all)."""
    return str(group.attrs.get("keep", "all"))


def stored_indices(group: zarr.Group) -> np.ndarray:
    """The manifest index of each utterance a features store holds."""
    if "utt_indices" in group:
        return group["utt_indices"][:]
    return np.arange(group["utt_ids"].shape[0])


def as_stored(block: np.ndarray, dtype: str, job: FramesJob) -> np.ndarray:
    """A float32 block of features as a store of `dtype` holds it.

    A value beyond float16's range (±65504) would be stored as Inf: that is an error naming its
    utterances, never a silent Inf in k-means."""
    if dtype == "float32":
        return block
    stored = block.astype(dtype)
    check_finite(stored, job.start, job.utterances, f"features of {job.part} as {dtype} (beyond its range)")
    return stored


def stored_chunk_digests(array: zarr.Array) -> list[str]:
    """`digest_array` of each chunk of the grid along an array's first axis, as stored (read a few at a time)."""
    grid = chunk_grid(array.shape[0], array.chunks[0])
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda chunk: digest_array(array[chunk.start : chunk.stop]), grid))


def stored_geometry(group: zarr.Group) -> FrameGeometry:
    """The frame geometry a features or labels store records in its attributes."""
    return FrameGeometry(hop=int(group.attrs["hop_samples"]), window=int(group.attrs["window_samples"]))

