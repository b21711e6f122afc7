"""`hubert-pipeline units`: an exported bundle's encoder layer and quantizer applied to any corpus, on Dask.

The bundle (tasks/products/export.py) is checked before any work: its torchaudio encoder must be the file
`hubert_pipeline.json` records, its quantizer must have been fitted on exactly those weights, and
its centroids must be the ones the quantizer names. Files are probed as intake probes them (bad
ones go into the report, not fatal), resampled to 16 kHz on read, and cut into the chunk grid
the chunked stages use: one Dask task computes one chunk's layer features, takes each frame's
nearest centroid, writes that chunk of `units.zarr` and marks it done (infra/store.py's commit
protocol on a store rooted at OUT). A killed run resumes from its chunks; a re-run with the same
bundle and source skips the work and rewrites only `units.jsonl` (as asked: deduplicated or not).

    OUT/units.zarr      units int16 [frames], offsets [utts + 1], utt_ids, frame geometry
    OUT/units.jsonl     {"id", "units"} per utterance ({"id", "units", "durations"} with --dedup)
    OUT/report.json     counts, rejected files, the bundle's digests
    OUT/units.commit.json
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from infra.cluster import dask_client
from infra.commit import Stage
from infra.digest import digest_bytes, digest_digests, digest_json
from infra.parts import run_parts
from infra.paths import fingerprint_source, join_path, read_whole
from infra.store import ArtifactStore, utc_now
from infra.zarr_io import EmptyArray, create_zarr_group
from model.frames import SAMPLE_RATE
from model.kmeans import nearest_centroids
from model.presets import HubertConfig
from tasks.corpus.checks import probe_candidates
from tasks.corpus.manifest import AUDIO_SUFFIXES, ManifestError, check_unique_ids, list_candidates
from tasks.frames.chunks import ChunkJob, frame_offsets, plan_chunks
from tasks.frames.sources import BundleLayerSource, compute_chunk
from tasks.products.export import BUNDLE_FORMAT
from tasks.run.config import CorpusConfig
from tasks.run.layout import BUNDLE

log = logging.getLogger(__name__)

UNITS_VERSION = 1
UNITS_STORE = "units.zarr"
UNITS_JSONL = "units.jsonl"
UNITS_REPORT = "report.json"
OUTPUTS = (UNITS_STORE, UNITS_REPORT)
MIN_CHUNK_FRAMES = 512
MAX_CHUNK_FRAMES = 16384
CHUNKS_PER_WORKER = 4


class BundleError(ValueError):
    """A bundle that is not one, or whose parts do not belong together; or a source with no audio."""

    retryable = False  # a retry reads the same bundle


@dataclass(frozen=True)
class Bundle:
    """An export folder, read and checked: its manifest, its quantizer's description and centroids."""

    folder: str
    manifest: dict[str, Any]
    quantizer: dict[str, Any]
    centroids: np.ndarray
    storage_options: dict[str, Any]

    @property
    def architecture(self) -> HubertConfig:
        return HubertConfig.model_validate(self.manifest["architecture"])

    @property
    def digests(self) -> dict[str, str]:
        """What the units depend on: the weights, the encoder file, the centroids, and the layer."""
        return {
            "weights": self.manifest["weights_digest"],
            "torchaudio_encoder": self.manifest["torchaudio_encoder"]["digest"],
            "centroids": self.quantizer["centroids_digest"],
            "layer": str(self.quantizer["layer"]),
        }

    def source(self) -> BundleLayerSource:
        encoder = self.manifest["torchaudio_encoder"]
        return BundleLayerSource(
            encoder_path=join_path(self.folder, encoder["file"]),
            encoder_digest=encoder["digest"],
            encoder_kwargs=encoder["kwargs"],
            layer=int(self.quantizer["layer"]),
            architecture=self.architecture,
            storage_options=self.storage_options,
        )


def _read_json(folder: str, relpath: str, storage_options: dict[str, Any], what: str) -> dict[str, Any]:
    path = join_path(folder, relpath)
    try:
        return json.loads(read_whole(path, storage_options))
    except FileNotFoundError as error:
        raise BundleError(f"{folder} is not a complete bundle: no {relpath} ({what})") from error
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not JSON ({error.msg})") from error


def _read_file(folder: str, relpath: str, storage_options: dict[str, Any]) -> bytes:
    try:
        return read_whole(join_path(folder, relpath), storage_options)
    except FileNotFoundError as error:
        raise BundleError(f"{folder} is not a complete bundle: no {relpath}") from error


def load_bundle(folder: str, storage_options: dict[str, Any] | None = None) -> Bundle:
    """Read a bundle and check that its encoder, weights and quantizer belong together."""
    options = dict(storage_options or {})
    manifest = _read_json(folder, BUNDLE.manifest, options, "written last by `hubert-pipeline export`")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{join_path(folder, BUNDLE.manifest)} is not a hubert-pipeline bundle manifest")
    if manifest.get("quantizer") is None:
        raise BundleError(
            f"{folder} has no quantizer: no later iteration of run {manifest['run']} clustered a layer of iteration "
            f"{manifest['iteration']}'s model (end the run with an iteration that has features, kmeans and no train)"
        )
    quantizer = _read_json(folder, manifest["quantizer"], options, "the quantizer's description")
    if quantizer["model_digest"] != manifest["weights_digest"]:
        raise BundleError(
            f"{join_path(folder, manifest['quantizer'])} was fitted on weights {quantizer['model_digest'][:12]}, "
            f"but the bundle's model is {manifest['weights_digest'][:12]}: refusing to mix them"
        )
    encoder = manifest["torchaudio_encoder"]
    if digest_bytes(_read_file(folder, encoder["file"], options)) != encoder["digest"]:
        raise BundleError(
            f"{join_path(folder, encoder['file'])} is not the encoder {join_path(folder, BUNDLE.manifest)} records "
            "(its content digest differs)"
        )
    centroids_path = posixpath.join(posixpath.dirname(manifest["quantizer"]), quantizer["centroids"])
    centroids = np.load(io.BytesIO(_read_file(folder, centroids_path, options)))
    if digest_bytes(centroids.tobytes()) != quantizer["centroids_digest"]:
        raise BundleError(f"{join_path(folder, centroids_path)} is not the centroids its quantizer.json records")
    bundle = Bundle(folder, manifest, quantizer, centroids, options)
    architecture = bundle.architecture
    if centroids.shape != (quantizer["k"], architecture.encoder_embed_dim):
        raise BundleError(
            f"centroids of shape {centroids.shape} do not fit k={quantizer['k']} and the model's "
            f"{architecture.encoder_embed_dim}-dim layers"
        )
    if not 1 <= quantizer["layer"] <= architecture.encoder_num_layers:
        raise BundleError(f"quantizer layer {quantizer['layer']} is not a layer of the bundle's model")
    return bundle


def choose_chunk_frames(total_frames: int, workers: int) -> int:
    """A few chunks per worker (balance), each as large as that allows (an utterance across a chunk
    edge is computed by both chunks), a multiple of 256 frames."""
    wanted = -(-total_frames // (CHUNKS_PER_WORKER * max(workers, 1)))
    return min(MAX_CHUNK_FRAMES, max(MIN_CHUNK_FRAMES, -(-wanted // 256) * 256))


def write_unit_chunk(
    job: ChunkJob, source: BundleLayerSource, centroids: np.ndarray, stage: Stage, units: zarr.Array, audio_options: dict[str, Any]
) -> dict[str, Any]:
    """One Dask task: layer features of one chunk, nearest centroids, write the chunk, mark it done."""
    torch.set_num_threads(1)
    block = compute_chunk(job, source, audio_options)
    chunk = nearest_centroids(block, centroids)[0].numpy().astype(np.int16)
    units[job.start : job.stop] = chunk
    info = {
        "part": job.part,
        "digest": digest_bytes(chunk.tobytes()),
        "audio_seconds": sum(span.samples_16k for span in job.utterances) / SAMPLE_RATE,
    }
    stage.mark_part(job.part, info)
    return info


def collapse_runs(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one unit collapsed: the units, and how many frames each run covers."""
    if units.size == 0:
        return units, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], units[1:] != units[:-1]]))
    return units[starts], np.diff(np.concatenate([starts, [units.size]]))


def _units_lines(group: zarr.Group, deduplicated: bool) -> Iterator[str]:
    array, offsets, ids = group["units"], group["offsets"][:], group["utt_ids"][:]
    step = max(int(array.chunks[0]), 1) * 8
    loaded_start, loaded = 0, np.zeros(0, dtype=np.int16)
    for utt_id, start, stop in zip(ids, offsets[:-1].tolist(), offsets[1:].tolist()):
        if stop > loaded_start + loaded.shape[0]:
            loaded_start = start
            loaded = array[start : max(stop, min(start + step, array.shape[0]))]
        units = loaded[start - loaded_start : stop - loaded_start]
        entry: dict[str, Any] = {"id": str(utt_id)}
        if deduplicated:
            collapsed, durations = collapse_runs(units)
            entry.update(units=collapsed.tolist(), durations=durations.tolist())
        else:
            entry["units"] = units.tolist()
        yield json.dumps(entry)


def write_units_jsonl(store: ArtifactStore, deduplicated: bool) -> None:
    group = store.open_zarr(UNITS_STORE, mode="r")
    store.write_text(UNITS_JSONL, "".join(line + "\n" for line in _units_lines(group, deduplicated)))


def units(
    bundle: Bundle,
    source: str,
    out: str,
    *,
    dedup: bool = False,
    dask_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    n_workers: int | None = None,
) -> dict[str, Any]:
    """Units of every usable file of `source` into `out`; returns the report."""
    options = dict(storage_options or {})
    store = ArtifactStore(out, options)
    try:
        candidates = list_candidates(source, options)
    except ManifestError as error:
        raise BundleError(str(error)) from error
    if not candidates:
        raise BundleError(f"no .wav or .flac files in {source}")
    check_unique_ids(candidates)
    stage = Stage(
        store, "", "units", version=UNITS_VERSION, config={},
        inputs={**bundle.digests, "source": fingerprint_source(source, AUDIO_SUFFIXES, options)},
    )
    if stage.committed() is None:
        with dask_client(address=dask_address, n_workers=n_workers) as client:
            _compute_units(bundle, source, candidates, stage, client, options)
    else:
        log.info("units: committed earlier for this bundle and source, skipping")
    write_units_jsonl(store, dedup)
    return store.read_json(UNITS_REPORT)["counts"]


def _compute_units(bundle: Bundle, source: str, candidates: list, stage: Stage, client: Any, options: dict[str, Any]) -> None:
    started_at = utc_now()
    stage.prepare((*OUTPUTS, UNITS_JSONL))  # units.jsonl is rewritten from units.zarr once committed
    store = stage.store
    layer_source = bundle.source()
    utterances, rejections = probe_candidates(client, candidates, CorpusConfig(source=source), options, "units (probing)")
    if not utterances:
        raise BundleError(f"no usable audio in {source}: all {len(rejections)} files rejected")
    for rejection in rejections:
        log.warning("units: skipping %s (%s): %s", rejection.path, rejection.reason, rejection.detail)
    offsets = frame_offsets(utterances, layer_source.geometry.num_frames)
    done = stage.done_parts()
    if done:
        chunk_frames = int(store.open_zarr(UNITS_STORE, mode="r").attrs["chunk_frames"])
    else:
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        chunk_frames = choose_chunk_frames(int(offsets[-1]), workers)
        geometry = layer_source.geometry
        create_zarr_group(
            store, UNITS_STORE,
            attributes={
                "k": int(bundle.quantizer["k"]), "layer": int(bundle.quantizer["layer"]), "label_rate": geometry.frame_rate,
                "hop_samples": geometry.hop, "window_samples": geometry.window, "sample_rate": SAMPLE_RATE,
                "chunk_frames": chunk_frames, "bundle": bundle.digests, "stage_key": stage.key,
            },
            empty={"units": EmptyArray(shape=(int(offsets[-1]),), chunks=(chunk_frames,), dtype="int16")},
            whole={"offsets": offsets, "utt_ids": np.array([utterance.id for utterance in utterances])},
            replace=not stage.fresh,
        )
    jobs = plan_chunks(utterances, offsets, chunk_frames)
    array = store.open_zarr(UNITS_STORE, mode="r+")["units"]
    # Made by a task, not scattered: if the worker holding it dies, Dask makes it again.
    shared = client.submit(np.array, bundle.centroids, pure=False)
    clock = time.perf_counter()
    parts = run_parts(
        client, stage, jobs, write_unit_chunk, "units", done,
        source=layer_source, centroids=shared, units=array, audio_options=options,
    )
    seconds = time.perf_counter() - clock
    audio_seconds = sum(utterance.samples_16k for utterance in utterances) / SAMPLE_RATE
    computed = sum(parts[job.part]["audio_seconds"] for job in jobs if job.part not in done)
    counts = {
        "utterances": len(utterances),
        "frames": int(offsets[-1]),
        "rejected": len(rejections),
        "chunks": len(jobs),
        "chunks_resumed": len(done),
        "audio_hours": round(audio_seconds / 3600, 4),
    }
    report = {
        "source": source,
        "counts": counts,
        "rejected": [rejection.model_dump() for rejection in rejections],
        "rejected_by_reason": dict(Counter(rejection.reason for rejection in rejections)),
        "bundle": {"folder": bundle.folder, "run": bundle.manifest["run"], "iteration": bundle.manifest["iteration"], **bundle.digests},
        "audio_seconds_per_second": round(computed / seconds, 2) if computed else None,
    }
    store.write_json(UNITS_REPORT, report)
    stage.commit(
        outputs=list(OUTPUTS),
        output_digest=digest_json({"units": digest_digests(parts[job.part]["digest"] for job in jobs), "offsets": digest_bytes(offsets.tobytes())}),
        started_at=started_at,
        counts=counts,
    )
