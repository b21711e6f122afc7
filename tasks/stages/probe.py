"""Stage: the downstream phone probe of a trained model (`probe@N`, after train@N), against MFCC.

Teams judge an encoder by what a small labelled set gets out of it. On `probe.train_minutes` of
training utterances (seeded by their ids) it trains, with the model frozen, the probes of
model/phone_probes.py, and scores them on validation utterances, which neither pretraining nor the
probe trained on: phone recognition with a linear CTC head over a learned softmax-weighted sum of
every layer (PER, SUPERB's way), and each layer's frame phone accuracy. MFCC goes through the
same probes on the same utterances in the same task, as the baseline. Phone sequences and frame
phones come from the alignments. Its settings are its key and the weights its input, so changing
how a model is probed never trains it again.

    iter-N/probe.json   PER (model, MFCC), frame accuracy per layer (and MFCC), the layer weights
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.paths import fingerprint_source
from model.phone_probes import ProbeData, ctc_phone_error_rate, frame_phone_accuracy, seeded_order
from model.quality import PhoneSegments, frame_segments
from tasks.corpus.alignments import ALIGNMENT_SUFFIXES, alignment_path, read_alignment
from tasks.corpus.audio import load_utterance_16k
from tasks.corpus.manifest import Manifest, Utterance
from tasks.frames.sources import FeatureSource, MfccSource, layer_source
from tasks.run.keys import key_settings
from tasks.run.layout import PROBE, Weights
from tasks.run.records import load_manifest, trained_architecture, weights_digest
from tasks.run.sections import ProbeConfig
from tasks.run.stage import StageContext, StageResult, StageSpec, file_digest

log = logging.getLogger(__name__)

BATCH = 16


@dataclass(frozen=True)
class ProbeSet:
    """The probe's utterances with their phone alignments: those it trains on, those it is scored on."""

    train: tuple[Utterance, ...]
    test: tuple[Utterance, ...]
    alignments: str
    storage_options: dict[str, Any]


def first_minutes(
    manifest: Manifest, positions: np.ndarray, minutes: float | None, seed: int, salt: str, alignments: str,
    storage_options: dict[str, Any],
) -> list[Utterance]:
    """Utterances at `positions` of the manifest with an alignment, ranked by a seeded hash of their
    ids, taken until `minutes` of audio (None: all); only the alignments of those looked at are read."""
    ids = manifest.ids().take(positions).to_pylist()
    seconds_of = manifest.seconds()[positions]
    chosen, seconds = [], 0.0
    for rank in seeded_order(ids, seed, salt):
        if minutes is not None and seconds >= 60 * minutes:
            break
        if read_alignment(alignment_path(alignments, ids[rank]), storage_options) is not None:
            chosen.append(int(positions[rank]))
            seconds += float(seconds_of[rank])
    return manifest.read(chosen) if chosen else []


def probe_set(manifest: Manifest, settings: ProbeConfig, alignments: str, storage_options: dict[str, Any]) -> ProbeSet:
    """Training utterances up to `train_minutes` and validation ones up to `test_minutes`, each with an alignment."""
    valid = manifest.is_valid()
    train = first_minutes(
        manifest, np.flatnonzero(~valid), settings.train_minutes, settings.seed, "probe-train", alignments, storage_options
    )
    test = first_minutes(
        manifest, np.flatnonzero(valid), settings.test_minutes, settings.seed, "probe-test", alignments, storage_options
    )
    if not train or not test:
        raise ValueError(
            f"the probe needs aligned training and validation utterances; it found {len(train)} and {len(test)}"
        )
    return ProbeSet(tuple(sorted(train, key=lambda u: u.id)), tuple(sorted(test, key=lambda u: u.id)), alignments, storage_options)


def phone_sequence(segments: PhoneSegments, index: dict[str, int]) -> list[int]:
    """The utterance's phones in order, repeats of one phone collapsed; CTC's classes count from 1."""
    sequence: list[int] = []
    for phone in segments.phones:
        if not sequence or sequence[-1] != index[phone] + 1:
            sequence.append(index[phone] + 1)
    return sequence


def source_features(source: FeatureSource, waveforms: list[torch.Tensor]) -> list[np.ndarray]:
    return [
        features.numpy().astype(np.float32)
        for start in range(0, len(waveforms), BATCH)
        for features in source.compute(waveforms[start : start + BATCH])
    ]


def probe_data(
    sources: list[FeatureSource], waveforms: list[torch.Tensor], segments: list[PhoneSegments], index: dict[str, int], ids: list[str]
) -> ProbeData:
    """The sources' features of the utterances, each frame's phone at that source's frame rate, and the phone sequences."""
    layers = [source_features(source, waveforms) for source in sources]
    geometry = sources[0].geometry
    frame_phones = []
    for own, features in zip(segments, layers[0]):
        at = frame_segments(own, geometry.centre_seconds(np.arange(features.shape[0])))
        names = np.asarray(own.phones)[np.maximum(at, 0)]
        frame_phones.append(np.where(at >= 0, [index[name] for name in names], -1).astype(np.int64))
    return ProbeData(layers, frame_phones, [phone_sequence(own, index) for own in segments], ids)


def measure_probes(
    model_layers: list[FeatureSource], chosen: ProbeSet, settings: ProbeConfig, mfcc: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One Dask task: the model's and MFCC's features of the probe set, and every probe on them
    (MFCC's taken as given where an earlier iteration probed it with the same settings on the same set)."""
    torch.set_num_threads(1)
    utterances = [*chosen.train, *chosen.test]
    segments = [read_alignment(alignment_path(chosen.alignments, u.id), chosen.storage_options) for u in utterances]
    index = {phone: n for n, phone in enumerate(sorted({p for own in segments for p in own.phones}))}
    waveforms = [load_utterance_16k(u, chosen.storage_options) for u in utterances]
    train, test = list(range(len(chosen.train))), list(range(len(chosen.train), len(utterances)))
    measured: dict[str, Any] = {} if mfcc is None else {"mfcc": mfcc}
    for name, sources in (("model", model_layers), ("mfcc", [MfccSource()])):
        if name in measured:
            continue
        data = probe_data(sources, waveforms, segments, index, [u.id for u in utterances])
        ctc = ctc_phone_error_rate(data, train, test, len(index), settings.seed, steps=settings.steps)
        accuracy = [
            frame_phone_accuracy(layer, data.frame_phones, train, test, len(index), settings.seed) for layer in data.layers
        ]
        measured[name] = {
            "per": ctc.per, "dev_per": ctc.dev_per, "dropout": ctc.dropout, "step": ctc.step,
            "layer_weights": ctc.layer_weights, "frame_accuracy": accuracy,
            "frame_rate": sources[0].geometry.frame_rate,
        }
        log.info("probe: %s PER %.3f, best frame accuracy %.3f", name, ctc.per, max(accuracy))
    return measured


def probed_weights(context: StageContext) -> Weights:
    return context.config.weights_for_next(context.iteration)


def probe_key_config(context: StageContext) -> dict[str, Any]:
    return {**key_settings(context.settings.probe), "weights": probed_weights(context), "alignments": context.config.corpus.alignments}


def probe_key_inputs(context: StageContext) -> dict[str, str]:
    return {
        "model": weights_digest(context.upstream("probe", "model"), probed_weights(context)),
        "manifest": context.upstream("probe", "manifest").output_digest,
        "alignments": fingerprint_source(context.config.corpus.alignments, ALIGNMENT_SUFFIXES, context.config.fsspec_options),
    }


def probe(context: StageContext, stage: Stage) -> StageResult:
    """Probe the iteration's trained model and MFCC on the same utterances; write probe.json."""
    settings, store = context.settings.probe, context.store
    trained = context.upstream("probe", "model")
    layers = [
        layer_source(store, context.layout, context.iteration, trained, layer, probed_weights(context))
        for layer in range(1, trained_architecture(trained).encoder_num_layers + 1)
    ]
    chosen = probe_set(load_manifest(store, context.layout), settings, context.config.corpus.alignments, store.storage_options)
    log.info(
        "%s: %d training utterances (%.1f min), %d validation utterances (%.1f min)", context.label("probe"),
        len(chosen.train), sum(u.seconds for u in chosen.train) / 60, len(chosen.test), sum(u.seconds for u in chosen.test) / 60,
    )
    baseline = earlier_baseline(context)
    if context.client is None:
        threads = torch.get_num_threads()  # measure_probes takes one, as a Dask task should
        try:
            measured = measure_probes(layers, chosen, settings, baseline)
        finally:
            torch.set_num_threads(threads)
    else:
        measured = context.client.submit(measure_probes, layers, chosen, settings, baseline, pure=False).result()
    result = {
        **measured,
        "weights": probed_weights(context),
        "train_minutes": round(sum(u.seconds for u in chosen.train) / 60, 3),
        "test_minutes": round(sum(u.seconds for u in chosen.test) / 60, 3),
    }
    data = json.dumps(result, indent=2, sort_keys=True).encode() + b"\n"
    store.write_bytes(stage.rel(PROBE), data)
    return StageResult(
        output_digest=digest_bytes(data),
        counts={"train_utterances": len(chosen.train), "test_utterances": len(chosen.test)},
        metrics=result,
    )


def earlier_baseline(context: StageContext) -> dict[str, Any] | None:
    """MFCC's probe results from the previous iteration's probe, where it ran with the same settings
    on the same manifest and alignments: the probes are deterministic, so they would be the same."""
    if context.iteration == 1 or (earlier := context.records.get("probe", context.iteration - 1)) is None:
        return None
    same_config = {k: v for k, v in earlier.config.items() if k != "weights"} == {
        k: v for k, v in probe_key_config(context).items() if k != "weights"
    }
    current = probe_key_inputs(context)
    same_inputs = all(earlier.inputs.get(name) == current[name] for name in ("manifest", "alignments"))
    return earlier.metrics["mfcc"] if same_config and same_inputs else None


def probe_summary(record: StageRecord) -> str:
    model, mfcc = record.metrics["model"], record.metrics["mfcc"]
    return (
        f"PER {model['per']:.3f} (MFCC {mfcc['per']:.3f}), best layer frame accuracy {max(model['frame_accuracy']):.3f} "
        f"(MFCC {mfcc['frame_accuracy'][0]:.3f}), {record.metrics['train_minutes']:.1f} min to train, "
        f"{record.metrics['test_minutes']:.1f} min held out"
    )


PROBE_STAGE = StageSpec(
    name="probe",
    version=1,
    outputs=(PROBE,),
    key_config=probe_key_config,
    key_inputs=probe_key_inputs,
    work=probe,
    summary=probe_summary,
    verify_digest=file_digest(PROBE),
)
