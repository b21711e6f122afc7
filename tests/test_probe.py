"""The downstream probe: reproducible on MFCC, scored only on held-out utterances, chosen by their ids."""

from __future__ import annotations

from pathlib import Path

from model.phone_probes import ctc_phone_error_rate, edit_distance, frame_phone_accuracy, seeded_order
from tasks.corpus.alignments import alignment_path, read_alignment
from tasks.corpus.audio import load_audio_16k
from tasks.frames.sources import MfccSource
from tasks.run.records import RunRecords, load_manifest
from tasks.run.sections import ProbeConfig
from tasks.stages.probe import phone_sequence, probe_data, probe_set
from tests.support import CommittedRun


def test_edit_distance_and_phone_sequences() -> None:
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 4]) == 2 and edit_distance([5], [6]) == 1


def test_the_probe_on_mfcc_is_reproducible(demo_corpus: Path) -> None:
    wavs = sorted((demo_corpus / "wav").glob("*.wav"))
    ids = [path.stem for path in wavs]
    ranked = [wavs[i] for i in seeded_order(ids, 0, "test")]
    segments = [read_alignment(alignment_path(str(demo_corpus / "align"), path.stem)) for path in ranked]
    index = {phone: n for n, phone in enumerate(sorted({p for own in segments for p in own.phones}))}
    data = probe_data([MfccSource()], [load_audio_16k(str(path)) for path in ranked], segments, index, [p.stem for p in ranked])
    assert data.sequences[0] == phone_sequence(segments[0], index) and 0 not in data.sequences[0]
    cut = 3 * len(ranked) // 4
    train, test = list(range(cut)), list(range(cut, len(ranked)))
    once, again = (ctc_phone_error_rate(data, train, test, len(index), seed=3, steps=150, dropouts=(0.1,)) for _ in range(2))
    assert once == again and 0 < once.per < 1.5
    accuracy = frame_phone_accuracy(data.layers[0], data.frame_phones, train, test, len(index), seed=3)
    assert accuracy == frame_phone_accuracy(data.layers[0], data.frame_phones, train, test, len(index), seed=3) > 1 / len(index)


def test_the_probe_trains_on_training_utterances_and_scores_on_validation_ones(committed_run: CommittedRun) -> None:
    run = committed_run
    records = RunRecords(run.store, run.layout)
    manifest = load_manifest(run.store, run.layout)
    chosen = probe_set(manifest, ProbeConfig(train_minutes=0.5), run.config.corpus.alignments, {})
    assert {u.split for u in chosen.train} == {"train"} and {u.split for u in chosen.test} == {"valid"}
    assert 30 <= sum(u.seconds for u in chosen.train) < 30 + max(u.seconds for u in manifest)
    measured = records.get("probe", 1).metrics
    assert measured["mfcc"] == records.get("probe", 2).metrics["mfcc"]  # the baseline of the same set, taken over
    assert len(measured["model"]["frame_accuracy"]) == 6 and len(measured["model"]["layer_weights"]) == 6
    assert abs(sum(measured["model"]["layer_weights"]) - 1) < 1e-3
