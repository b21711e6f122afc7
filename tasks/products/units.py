"""`hubert-pipeline units`: an exported bundle's encoder layer and quantizer applied to any corpus, on Dask.

Two stages on the skeleton every pipeline stage runs on (tasks/run/stage.py), in the output
folder OUT instead of a run:

- intake: the corpus probed as a run's intake probes it (tasks/corpus/checks.py; bad files go
  into the report, not fatal), its manifest written;
- units: every frame's nearest centroid, labelled as the label stage labels a store of the
  k-means sample (tasks/frames/labelling.py): on the same chunk grid as a features store
  (tasks/frames/store.py), each task computing its chunk's layer features from the bundle's
  encoder, taking each frame's nearest centroid, writing that chunk of `units.zarr` and marking
  it done.

The bundle is checked before any work (tasks/products/bundle.py). A killed run resumes from its
chunks; a re-run with the same bundle and source skips both stages without starting a cluster
and rewrites only `units.jsonl` (as asked: deduplicated or not).

    OUT/manifest.parquet, intake_report.json, intake_report.parquet   + intake.commit.json
    OUT/units.zarr      units int16 [frames], offsets [utts + 1], utt_ids, frame geometry
    OUT/report.json     counts, rejected files, the bundle's digests   + units.commit.json
    OUT/units.jsonl     {"id", "units"} per utterance ({"id", "units", "durations"} with --dedup)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from distributed import Client

from infra.cluster import dask_client
from infra.commit import Stage, read_record
from infra.digest import digest_bytes, digest_digests, digest_json
from infra.parts import run_parts
from infra.store import ArtifactStore
from infra.zarr_io import EmptyArray, create_zarr_group
from model.frames import SAMPLE_RATE
from tasks.corpus.checks import take_in
from tasks.corpus.formats import fingerprint
from tasks.corpus.manifest import ManifestError, ManifestRows
from tasks.frames.chunks import ManifestSlice, frame_offsets
from tasks.frames.labelling import LabelFeatures, plan_label_jobs, write_label_chunk
from tasks.frames.sources import BundleLayerSource
from tasks.frames.store import IDS_CHUNK, choose_chunk_frames, id_batches, stored_chunk_digests, write_ids
from tasks.products.bundle import Bundle, BundleError
from tasks.run.config import CorpusConfig
from tasks.run.layout import INTAKE_REJECTIONS, INTAKE_REPORT, LEGACY_MANIFEST, MANIFEST
from tasks.run.records import manifest_relpath, read_manifest
from tasks.run.stage import CommittedStage, StageResult, StageSpec, run_stage

log = logging.getLogger(__name__)

UNITS_STORE = "units.zarr"
UNITS_JSONL = "units.jsonl"
UNITS_REPORT = "report.json"


@dataclass
class UnitsContext:
    """What the units stages are handed: the output folder (the store), the bundle, the corpus
    source, and a Dask client started on first use (a re-run that has nothing to do starts none)."""

    store: ArtifactStore
    bundle: Bundle
    source: str
    storage_options: dict[str, Any]
    start_client: Any = field(repr=False)

    @property
    def client(self) -> Client:
        return self.start_client()

    def folder(self, stage: str) -> str:
        return ""

    def label(self, stage: str) -> str:
        return f"units ({stage})"

    def for_one_run(self) -> UnitsContext:
        return replace(self)

    def layer_source(self) -> BundleLayerSource:
        return BundleLayerSource(
            encoder_path=self.bundle.encoder_path,
            encoder_digest=self.bundle.manifest.torchaudio_encoder.digest,
            encoder_kwargs=self.bundle.manifest.torchaudio_encoder.kwargs,
            layer=self.bundle.quantizer.layer,
            architecture=self.bundle.manifest.architecture,
            storage_options=self.bundle.storage_options,
        )


def _limits(context: UnitsContext) -> CorpusConfig:
    """The corpus limits a run's intake takes by default."""
    return CorpusConfig(source=context.source)


def probe(context: UnitsContext, stage: Stage) -> StageResult:
    """Probe every file of the source on Dask; write the manifest and the intake report."""
    try:
        taken = take_in(context.client, _limits(context), context.storage_options, "units (probing)")
    except ManifestError as error:
        raise BundleError(str(error)) from error
    context.store.write_json(INTAKE_REPORT, taken.report())
    context.store.write_bytes(INTAKE_REJECTIONS, taken.rejections)
    counts = taken.counts
    if not counts["utterances"]:
        raise BundleError(f"no usable audio in {context.source}: all {counts['rejected']} files rejected")
    context.store.write_bytes(MANIFEST, taken.manifest)
    return StageResult(
        output_digest=digest_bytes(taken.manifest),
        counts={"utterances": counts["utterances"], "rejected": counts["rejected"]},
    )


def _manifest(store: ArtifactStore) -> str:
    return manifest_relpath(store, MANIFEST, LEGACY_MANIFEST)


PROBE = StageSpec[UnitsContext](
    name="intake",
    version=1,
    outputs=(MANIFEST, INTAKE_REPORT, INTAKE_REJECTIONS),
    key_config=lambda context: {"source": context.source, "min_seconds": _limits(context).min_seconds},
    key_inputs=lambda context: {"source": fingerprint(_limits(context), context.storage_options)},
    work=probe,
    summary=lambda record: f"{record.counts['utterances']} utterances, {record.counts['rejected']} rejected",
    verify_digest=lambda committed: digest_bytes(committed.store.read_bytes(_manifest(committed.store))),
)


def label_units(context: UnitsContext, stage: Stage) -> StageResult:
    """Every frame of every utterance labelled with the bundle's quantizer, into `units.zarr`."""
    store, bundle = context.store, context.bundle
    utterances = read_manifest(store, _manifest(store), columns=["id", "samples", "sample_rate"])
    rows = ManifestRows(store, _manifest(store), read_record(store, "", "intake").output_digest)
    source = context.layer_source()
    samples_16k = utterances.samples_16k()
    offsets = frame_offsets(samples_16k, source.geometry.num_frames)
    chunk_frames = choose_chunk_frames(int(offsets[-1]), source.dim)
    jobs = plan_label_jobs(rows, offsets, chunk_frames, per_task=1)
    done = stage.done_parts()
    if not done:
        create_zarr_group(
            store, UNITS_STORE,
            attributes={
                "k": bundle.quantizer.k, "layer": bundle.quantizer.layer, "label_rate": source.geometry.frame_rate,
                "hop_samples": source.geometry.hop, "window_samples": source.geometry.window, "sample_rate": SAMPLE_RATE,
                "chunk_frames": chunk_frames, "bundle": bundle.digests, "stage_key": stage.key,
            },
            empty={
                "units": EmptyArray(shape=(int(offsets[-1]),), chunks=(chunk_frames,), dtype="int16"),
                "utt_ids": EmptyArray(shape=(len(utterances),), chunks=(IDS_CHUNK,), dtype="str"),
            },
            whole={"offsets": offsets},
            replace=not stage.fresh,
        )
        write_ids(store.open_zarr(UNITS_STORE, mode="r+")["utt_ids"], utterances.ids())
    array = store.open_zarr(UNITS_STORE, mode="r+")["units"]
    features = LabelFeatures("float32", source, context.storage_options)
    # Made by a task, not scattered: if the worker holding it dies, Dask makes it again.
    shared = context.client.submit(np.array, bundle.centroids, pure=False)
    clock = time.perf_counter()
    parts = run_parts(
        context.client, stage, jobs, write_label_chunk, "units", done, centroids=shared, features=features, labels=array
    )
    seconds = time.perf_counter() - clock
    computed = sum(_audio_samples(job.source, samples_16k) for job in jobs if job.part not in done) / SAMPLE_RATE
    rejected = store.read_json(INTAKE_REPORT)["rejected"]
    counts = {
        "utterances": len(utterances),
        "frames": int(offsets[-1]),
        "rejected": len(rejected),
        "chunks": len(jobs),
        "chunks_resumed": len(done),
        "audio_hours": round(int(samples_16k.sum()) / SAMPLE_RATE / 3600, 4),
    }
    store.write_json(
        UNITS_REPORT,
        {
            "source": context.source,
            "counts": counts,
            "rejected": rejected,
            "bundle": {"folder": bundle.folder, "run": bundle.manifest.run, "iteration": bundle.manifest.iteration, **bundle.digests},
            "audio_seconds_per_second": round(computed / seconds, 2) if computed else None,
        },
    )
    digests = [digest for job in jobs for digest in parts[job.part]["digests"]]
    return StageResult(output_digest=units_digest(digests, offsets), counts=counts)


def _audio_samples(utterances: ManifestSlice, samples_16k: np.ndarray) -> int:
    """The 16 kHz samples of a job's utterances (those at its edges counted whole)."""
    return int(samples_16k[utterances.first : utterances.first + len(utterances.offsets) - 1].sum())


def units_digest(chunk_digests: list[str], offsets: np.ndarray) -> str:
    return digest_json({"units": digest_digests(chunk_digests), "offsets": digest_bytes(offsets.tobytes())})


def verify_units(committed: CommittedStage) -> str:
    group = committed.store.open_zarr(UNITS_STORE, mode="r")
    return units_digest(stored_chunk_digests(group["units"]), group["offsets"][:])


UNITS = StageSpec[UnitsContext](
    name="units",
    version=2,
    outputs=(UNITS_STORE, UNITS_REPORT),
    key_config=lambda context: {},
    key_inputs=lambda context: {
        **context.bundle.digests, "manifest": read_record(context.store, "", "intake").output_digest,
    },
    work=label_units,
    summary=lambda record: f"{record.counts['frames']} units of {record.counts['utterances']} utterances",
    verify_digest=verify_units,
)


def collapse_runs(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one unit collapsed: the units, and how many frames each run covers."""
    if units.size == 0:
        return units, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], units[1:] != units[:-1]]))
    return units[starts], np.diff(np.concatenate([starts, [units.size]]))


def _units_lines(group: zarr.Group, deduplicated: bool) -> Iterator[str]:
    array, offsets = group["units"], group["offsets"][:]
    ids = (name for batch in id_batches(group["utt_ids"]) for name in batch)
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
    """Units of every usable file of `source` into `out`; returns the report's counts."""
    options = dict(storage_options or {})
    store = ArtifactStore(out, options)
    with contextlib.ExitStack() as stack:
        started: list[Client] = []

        def start_client() -> Client:
            if not started:
                started.append(stack.enter_context(dask_client(address=dask_address, n_workers=n_workers)))
            return started[0]

        context = UnitsContext(store, bundle, source, options, start_client)
        for spec in (PROBE, UNITS):
            run_stage(spec, context)
    write_units_jsonl(store, dedup)
    return store.read_json(UNITS_REPORT)["counts"]
