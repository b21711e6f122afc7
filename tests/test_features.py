from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.compliance.kaldi
import torchaudio.functional

import tasks.stages.features
from infra.parts import PartsFailed
from infra.store import ArtifactStore
from tasks.frames.sources import MfccSource
from tasks.frames.store import MAX_CHUNK_TASKS, MIN_CHUNK_BYTES, MIN_CHUNK_FRAMES, choose_chunk_frames
from tasks.run.config import PretrainConfig, load_config
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest
from tests.support import run_chain, write_config


def reference_features(path: str, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """fairseq's dump_mfcc_feature.py, one utterance at a time (after our 16 kHz mono read)."""
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    waveform = torch.from_numpy(samples.mean(axis=1))
    if rate != 16_000:
        waveform = torchaudio.functional.resample(waveform, rate, 16_000)
    waveform = waveform.to(dtype)
    mfccs = torchaudio.compliance.kaldi.mfcc(waveform=waveform.view(1, -1), sample_frequency=16_000, use_energy=False)
    mfccs = mfccs.transpose(0, 1)
    deltas = torchaudio.functional.compute_deltas(mfccs)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).numpy()


def rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))


def prepared(tmp_path: Path, corpus: Path, client, name: str = "runs") -> tuple[PretrainConfig, ArtifactStore]:
    config = load_config(write_config(tmp_path / f"{name}.yaml", corpus, tmp_path / name, chunk_frames=256))
    return config, run_chain(config, client, "intake").store


def features_of(config: PretrainConfig, client):
    return run_chain(config, client, "features").records["features"]


def test_features_equal_kaldi_mfcc_computed_one_utterance_at_a_time(tmp_path: Path, salted_corpus: Path, client) -> None:
    config, store = prepared(tmp_path, salted_corpus, client)
    record = features_of(config, client)
    group = store.open_zarr("t/iter-1/features.zarr", mode="r")
    features, offsets, ids = group["features"][:], group["offsets"][:], list(group["utt_ids"][:])
    manifest = load_manifest(store, RunLayout("t"))
    assert ids == [u.id for u in manifest]
    assert record.counts["chunks"] > 3, "chunks this small must split utterances across writers"
    worst_ours = worst_torchaudio = 0.0
    for index, utterance in enumerate(manifest):
        expected_frames = 1 + (utterance.samples_16k - 400) // 160
        assert offsets[index + 1] - offsets[index] == expected_frames, utterance.id
        ours = features[offsets[index] : offsets[index + 1]]
        expected = reference_features(utterance.path)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-2)
        # Ours must be as close to torchaudio's float64 values as torchaudio's own float32 result is.
        # Both errors are float32 rounding (up to ~5e-4 on values of ~20 here), whose largest single
        # value moves with the CPU's kernels: held per utterance in RMS, and in the maximum over
        # the corpus.
        exact = reference_features(utterance.path, torch.float64)
        assert rms(ours - exact) <= 1.5 * rms(expected - exact) + 1e-6, utterance.id
        worst_ours = max(worst_ours, float(np.abs(ours - exact).max()))
        worst_torchaudio = max(worst_torchaudio, float(np.abs(expected - exact).max()))
    assert worst_ours <= 1.5 * worst_torchaudio + 1e-5
    assert features.shape == (offsets[-1], 39) and features.dtype == np.float32
    assert dict(group.attrs)["frame_rate"] == 100.0 and dict(group.attrs)["chunk_frames"] == 256


def test_default_chunks_are_object_store_sized_except_on_a_small_corpus() -> None:
    hour_of_mfcc, librispeech_of_layer = 360_000, 173_000_000
    for frames, dim in ((hour_of_mfcc, 39), (100 * hour_of_mfcc, 39), (10**6, 768), (librispeech_of_layer, 768)):
        chunk = choose_chunk_frames(frames, dim)
        assert chunk & (chunk - 1) == 0 and chunk >= MIN_CHUNK_FRAMES, (frames, dim)
        assert chunk * dim * 4 >= MIN_CHUNK_BYTES, (frames, dim)
        assert frames / chunk <= MAX_CHUNK_TASKS, (frames, dim)
    assert choose_chunk_frames(10**6, 768) == MIN_CHUNK_FRAMES
    ten_minutes = 60_000
    assert choose_chunk_frames(ten_minutes, 39) == MIN_CHUNK_FRAMES, "a demo-sized corpus keeps 4 tasks"


def test_a_second_run_is_skipped(tmp_path: Path, salted_corpus: Path, client) -> None:
    config, store = prepared(tmp_path, salted_corpus, client)
    first = features_of(config, client)
    assert features_of(config, client) == first


@dataclass(frozen=True)
class FailingMfcc(MfccSource):
    """MFCC that crashes on utterances of one length: a worker dying mid-stage, reproducibly."""

    fail_on_samples: int = -1

    def compute(self, waveforms_16k: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(waveform.shape[0] == self.fail_on_samples for waveform in waveforms_16k):
            raise RuntimeError("simulated crash")
        return super().compute(waveforms_16k)


def test_an_interrupted_stage_resumes_to_the_same_store(tmp_path: Path, salted_corpus: Path, client, monkeypatch) -> None:
    config, reference_store = prepared(tmp_path, salted_corpus, client, "reference")
    reference = features_of(config, client)

    config, store = prepared(tmp_path, salted_corpus, client, "resumed")
    # the last utterance: a stage stops at its first failed part, so the parts before it finish first
    victim = load_manifest(store, RunLayout("t"))[-1]
    with monkeypatch.context() as patched, pytest.raises(PartsFailed, match="simulated crash"):
        patched.setattr(tasks.stages.features, "feature_source", lambda context: FailingMfcc(fail_on_samples=victim.samples_16k))
        features_of(config, client)
    assert not store.exists("t/iter-1/features.commit.json")
    resumed = features_of(config, client)

    assert 0 < resumed.counts["chunks_resumed"] < resumed.counts["chunks"]
    assert resumed.output_digest == reference.output_digest
    ours = store.open_zarr("t/iter-1/features.zarr", mode="r")
    theirs = reference_store.open_zarr("t/iter-1/features.zarr", mode="r")
    for name in ("features", "offsets", "utt_ids"):
        np.testing.assert_array_equal(ours[name][:], theirs[name][:])
