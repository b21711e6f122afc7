"""Stage: the layer profile of a trained model, every transformer layer clustered and measured on a fixed sample.

After each training (`profile@N`, reading train@N's committed weights) it measures, on the same
seeded sample of utterances, each layer's k-means labels against phone alignments (PNMI, phone
and cluster purity, the paper's way: model/quality.py) and, where speakers are known, how much
speaker identity the layer carries (model/probes.py); MFCC at the same k on the same sample is
the reference line. One Dask task per layer; the model is loaded on the workers
(tasks/frames/sources.py), never here. `features.layer: auto` takes the layer with the highest
PNMI. A measurement is a stage of its own so that changing how a model is measured never trains
it again: its settings are its key, the weights its input.

    iter-N/profile.json   the profile, as the record's metrics hold it
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import Client, as_completed

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.paths import fingerprint_source
from model.kmeans import initial_centroids, lloyd, lloyd_partial, lloyd_schedule, nearest_centroids
from model.probes import speaker_probe_accuracy
from model.quality import LabelTally, frame_segments, phone_measures
from tasks.corpus.alignments import ALIGNMENT_SUFFIXES, alignment_path, read_alignment
from tasks.corpus.audio import load_utterance_16k
from tasks.corpus.manifest import Manifest, Utterance
from tasks.frames.sources import FeatureSource, HubertLayerSource, MfccSource, layer_source
from tasks.run.keys import key_settings
from tasks.run.layout import LAYER_PROFILE, Weights
from tasks.run.records import load_manifest, trained_architecture, weights_digest
from tasks.run.sections import LayerProfileConfig
from tasks.run.stage import StageContext, StageResult, StageSpec, file_digest

log = logging.getLogger(__name__)

LLOYD_ITERATIONS = 50


def profile_sample(utterances: Manifest | Sequence[Utterance], count: int, seed: int) -> list[Utterance]:
    """`count` utterances chosen by a seeded hash of their ids (the lowest sha256 of `seed:id`): the
    same whatever the corpus order. Ranked from the id column; only the chosen become records."""
    manifest = Manifest.of(utterances)
    ids = manifest.ids()
    keys = np.empty(len(ids), dtype=np.uint64)
    for start in range(0, len(ids), 65_536):
        keys[start : start + 65_536] = [
            int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")
            for name in ids.slice(start, 65_536).to_pylist()
        ]
    chosen = np.argsort(keys, kind="stable")[:count]
    return sorted(manifest.take(np.sort(chosen)), key=lambda u: u.id)


@dataclass(frozen=True)
class ProfileSample:
    utterances: tuple[Utterance, ...]
    alignments: str | None
    storage_options: dict[str, Any]
    k: int
    seed: int


def measure_source(source: FeatureSource, sample: ProfileSample) -> dict[str, Any]:
    """One Dask task: the sample's features from `source`, clustered at k and measured."""
    torch.set_num_threads(1)
    waveforms = [load_utterance_16k(u, sample.storage_options) for u in sample.utterances]
    features = [f.numpy().astype(np.float32) for f in source.compute(waveforms)]
    rows = np.concatenate(features)
    k = min(sample.k, rows.shape[0])
    centroids = initial_centroids(rows, k, "k-means++", sample.seed)

    def step(current: np.ndarray, stride: int) -> list[dict[str, Any]]:
        return [lloyd_partial(rows, current, 0, stride)]

    fit = lloyd(step, centroids, LLOYD_ITERATIONS, lloyd_schedule(rows.shape[0], k))
    labels = nearest_centroids(rows, fit.centroids)[0].numpy()
    tally = LabelTally(k)
    start = 0
    for utterance, own in zip(sample.utterances, features):
        piece = labels[start : start + own.shape[0]]
        start += own.shape[0]
        segments = None if sample.alignments is None else read_alignment(alignment_path(sample.alignments, utterance.id), sample.storage_options)
        if segments is not None:
            times = source.geometry.centre_seconds(np.arange(own.shape[0]))
            tally.add_aligned(segments, frame_segments(segments, times), piece)
            tally.aligned_utterances += 1
    quality = phone_measures(tally) or {}
    speakers = [u.speaker for u in sample.utterances]
    probe = None
    if all(speaker is not None for speaker in speakers):
        means = np.stack([own.mean(axis=0) for own in features if own.shape[0]])
        probe = speaker_probe_accuracy(means, [s for s, own in zip(speakers, features) if own.shape[0]], sample.seed)
    return {
        "pnmi": quality.get("pnmi"),
        "phone_purity": quality.get("phone_purity"),
        "cluster_purity": quality.get("cluster_purity"),
        "speaker_probe_accuracy": probe,
        "frames": int(rows.shape[0]),
    }


def measure_on_workers(client: Client, sources: list[FeatureSource], sample: ProfileSample) -> list[dict[str, Any]]:
    """`measure_source` of every source on the workers, in the sources' order, with a log line as
    each finishes (a profile of a large model takes minutes)."""
    futures = client.map(measure_source, sources, sample=sample, pure=False)
    index = {future.key: position for position, future in enumerate(futures)}
    results: list[dict[str, Any]] = [{} for _ in futures]
    for done, future in enumerate(as_completed(futures), start=1):
        results[index[future.key]] = future.result()
        layer = getattr(sources[index[future.key]], "layer", None)
        log.info("layer profile: %s measured (%d of %d)", "MFCC" if layer is None else f"layer {layer}", done, len(futures))
    return results


def layer_profile(
    client: Client | None, layers: list[HubertLayerSource], utterances: Manifest | Sequence[Utterance], settings: LayerProfileConfig,
    alignments: str | None, storage_options: dict[str, Any],
) -> dict[str, Any]:
    """Every layer's measures (and MFCC's, as the reference) on the seeded sample, and the best layer by PNMI.

    On `client`'s workers, one task per layer; without a client (a stage run alone), here, one after another.
    """
    sample = ProfileSample(
        tuple(profile_sample(utterances, settings.utterances, settings.seed)), alignments, storage_options,
        settings.k, settings.seed,
    )
    sources: list[FeatureSource] = [MfccSource(), *layers]
    if client is None:
        threads = torch.get_num_threads()  # measure_source takes one, as a Dask task should
        try:
            mfcc, *measured = [measure_source(source, sample) for source in sources]
        finally:
            torch.set_num_threads(threads)
    else:
        mfcc, *measured = measure_on_workers(client, sources, sample)
    rows = [{"layer": source.layer, **measures} for source, measures in zip(layers, measured)]
    scored = [row for row in rows if row["pnmi"] is not None]
    best = max(scored, key=lambda row: row["pnmi"]) if scored else None
    log.info(
        "layer profile (k=%d, %d utterances): PNMI by layer %s; MFCC %s",
        settings.k, len(sample.utterances), [None if r["pnmi"] is None else round(r["pnmi"], 3) for r in rows],
        None if mfcc["pnmi"] is None else round(mfcc["pnmi"], 3),
    )
    return {
        "k": settings.k,
        "utterances": len(sample.utterances),
        "seed": settings.seed,
        "layers": rows,
        "mfcc": mfcc,
        "best_layer": None if best is None else best["layer"],
    }


def profiled_weights(context: StageContext) -> Weights:
    """The weights the next iteration takes (best where chosen and kept, else final): those measured."""
    return context.config.weights_for_next(context.iteration)


def profile_key_config(context: StageContext) -> dict[str, Any]:
    return {
        **key_settings(context.settings.profile),
        "weights": profiled_weights(context),
        "alignments": context.config.corpus.alignments,
    }


def profile_key_inputs(context: StageContext) -> dict[str, str]:
    inputs = {
        "model": weights_digest(context.upstream("profile", "model"), profiled_weights(context)),
        "manifest": context.upstream("profile", "manifest").output_digest,
    }
    alignments = context.config.corpus.alignments
    if alignments is not None:
        inputs["alignments"] = fingerprint_source(alignments, ALIGNMENT_SUFFIXES, context.config.fsspec_options)
    return inputs


def profile(context: StageContext, stage: Stage) -> StageResult:
    """Measure every layer of the iteration's trained model and write profile.json."""
    trained = context.upstream("profile", "model")
    weights = profiled_weights(context)
    architecture = trained_architecture(trained)
    layers = [
        layer_source(context.store, context.layout, context.iteration, trained, layer, weights)
        for layer in range(1, architecture.encoder_num_layers + 1)
    ]
    measured = {
        "weights": weights,
        **layer_profile(
            context.client, layers, load_manifest(context.store, context.layout), context.settings.profile,
            context.config.corpus.alignments, context.store.storage_options,
        ),
    }
    data = json.dumps(measured, indent=2, sort_keys=True).encode() + b"\n"
    context.store.write_bytes(stage.rel(LAYER_PROFILE), data)
    return StageResult(
        output_digest=digest_bytes(data),
        counts={"layers": len(layers), "utterances": measured["utterances"]},
        metrics=measured,
    )


def best_layer_row(measured: dict[str, Any]) -> dict[str, Any] | None:
    """The profile's row of its best layer (by PNMI), or None where nothing was measured against phones."""
    return next((row for row in measured.get("layers", []) if row["layer"] == measured.get("best_layer")), None)


def profile_summary(record: StageRecord) -> str:
    best = best_layer_row(record.metrics)
    mfcc = record.metrics["mfcc"].get("pnmi")
    if best is None:
        return f"{record.counts['layers']} layers measured on {record.counts['utterances']} utterances (no phone alignments)"
    return (
        f"best layer {best['layer']}: PNMI {best['pnmi']:.3f} at k={record.metrics['k']} "
        f"(MFCC {'-' if mfcc is None else f'{mfcc:.3f}'} on the same {record.counts['utterances']} utterances)"
    )


PROFILE = StageSpec(
    name="profile",
    version=1,
    outputs=(LAYER_PROFILE,),
    key_config=profile_key_config,
    key_inputs=profile_key_inputs,
    work=profile,
    summary=profile_summary,
    verify_digest=file_digest(LAYER_PROFILE),
)
