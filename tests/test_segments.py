"""Long recordings cut into spans (`corpus.segment`): at their quiet points, no longer than asked,
each span's frames the frame formula of its samples; the spans train and export to fairseq."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from model.mfcc import MFCC_GEOMETRY
from tasks.corpus.manifest import resampled_lengths
from tasks.corpus.segments import cut_spans
from tasks.products.fairseq import export_fairseq_labels
from tasks.run.config import PretrainConfig, SegmentConfig
from tests.support import TWO_ITERATION_TRAIN, run_chain

RATE = 16_000


def test_fixed_windows_are_equal_and_no_longer_than_asked() -> None:
    noise = np.random.default_rng(0).normal(0, 0.1, 47 * RATE + 123).astype(np.float32)
    spans = cut_spans(noise, RATE, SegmentConfig(max_seconds=10, method="fixed"))
    lengths = [stop - start for start, stop in spans]
    assert len(spans) == 5 and max(lengths) <= 10 * RATE and max(lengths) - min(lengths) <= 1
    assert spans[0][0] == 0 and spans[-1][1] == noise.shape[0] and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert cut_spans(noise[: 9 * RATE], RATE, SegmentConfig(max_seconds=10)) == [(0, 9 * RATE)]
    with pytest.raises(ValueError, match="at most half of max_seconds"):
        SegmentConfig(max_seconds=10, min_seconds=6)


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path) -> Path:
    """A 10-minute recording: the demo corpus's speech five times over, with pauses of 0.3 to 0.7 s
    of faint noise between utterances."""
    rng = np.random.default_rng(3)
    pieces = []
    for _ in range(5):
        for path in sorted((demo_corpus / "wav").glob("*.wav")):
            speech, rate = soundfile.read(path, dtype="float32")
            assert rate == RATE
            pieces += [speech, rng.normal(0, 1e-4, int(rng.uniform(0.3, 0.7) * RATE)).astype(np.float32)]
    folder = tmp_path_factory.mktemp("book") / "audio"
    folder.mkdir()
    recording = np.concatenate(pieces)
    assert recording.shape[0] >= 600 * RATE
    soundfile.write(folder / "book.flac", recording, RATE, subtype="PCM_16")
    return folder


@pytest.mark.slow
def test_a_long_recording_is_cut_at_quiet_points_and_trains_and_exports_labels(book, tmp_path: Path, client) -> None:
    folder = book
    config = PretrainConfig.model_validate(
        {
            "run": "t", "store": str(tmp_path / "runs"),
            "corpus": {"source": str(folder), "segment": {"max_seconds": 20}},
            "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 12}, "train": TWO_ITERATION_TRAIN}],
        }
    )
    chain = run_chain(config, client, "train")
    spans = list(chain.utterances)
    assert len(spans) >= 30 and [u.id for u in spans][:2] == ["book-00000", "book-00001"]
    assert all(u.recording == "book" and u.samples <= 20 * RATE for u in spans)
    assert spans[0].start == 0 and all(a.start + a.samples == b.start for a, b in zip(spans, spans[1:]))
    whole = soundfile.read(folder / "book.flac", dtype="float32")[0]
    power = 10 * np.log10(np.square(whole[: len(whole) // 160 * 160].astype(np.float64)).reshape(-1, 160).mean(axis=1) + 1e-10)
    quiet = np.percentile(power, 10) + 3.0  # the pauses' faint noise; speech is 40-60 dB above it
    for span in spans[1:]:  # every cut where it is quiet, never in speech
        assert power[span.start // 160] <= quiet, f"cut at {span.start / RATE:.2f} s: {power[span.start // 160]:.1f} dB"
    fixed = [20 * RATE * n // 160 for n in range(1, len(whole) // (20 * RATE))]
    assert (power[fixed] > quiet).mean() > 0.5  # where 20 s windows would have cut: mostly in speech
    assert chain.records["intake"].counts["recordings_cut"] == 1

    labels = chain.store.open_zarr(chain.layout.labels_store(1), "r")
    samples_16k = resampled_lengths(np.array([u.samples for u in spans]), np.array([u.sample_rate for u in spans]))
    np.testing.assert_array_equal(np.diff(labels["offsets"][:]), MFCC_GEOMETRY.num_frames(samples_16k))
    assert chain.records["train"].counts.get("steps", TWO_ITERATION_TRAIN["steps"]) == TWO_ITERATION_TRAIN["steps"]

    [split] = export_fairseq_labels(chain.store, chain.layout, 1, tmp_path / "km")
    lines = split.tsv.read_text().splitlines()
    root, rows = lines[0], [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(spans)
    first = soundfile.read(Path(root) / rows[0][0], dtype="float32")[0]
    np.testing.assert_array_equal(first, whole[: spans[0].samples])  # the span's own samples, written for fairseq
    assert [int(samples) for _, samples in rows] == [u.samples for u in spans]
    km = split.km.read_text().splitlines()
    assert [len(line.split()) for line in km] == np.diff(labels["offsets"][:]).tolist()
