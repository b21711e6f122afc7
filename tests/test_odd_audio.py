"""What a real corpus holds besides clean speech: each file either works or is reported, never a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from infra.commit import forget_stage
from infra.parts import PartsFailed
from tasks.frames.chunks import NonFiniteValues, UtteranceSpan, check_finite
from tasks.frames.labelling import LabelJob, checked_nearest_labels
from tasks.run.config import load_config
from tests.support import read_real, resample, run_chain, write_config


@pytest.fixture
def odd_corpus(tmp_path: Path, fsdd_dir: Path) -> Path:
    """Real speech, plus NaN/Inf float files, silence, clipping, DC offset, a long file, six channels,
    odd sample rates, and names with spaces and non-ASCII letters."""
    folder = tmp_path / "odd"
    folder.mkdir()
    sources = sorted(fsdd_dir.glob("*.wav"))
    for path in sources[:6]:
        soundfile.write(folder / path.name, read_real(path)[0], 8000, subtype="PCM_16")
    speech, rate = read_real(sources[10])
    with_nan = speech.copy()
    with_nan[100] = np.nan
    soundfile.write(folder / "has_nan.wav", with_nan, rate, subtype="FLOAT")
    with_inf = speech.copy()
    with_inf[[5, 50]] = [np.inf, -np.inf]
    soundfile.write(folder / "has_inf.wav", with_inf, rate, subtype="DOUBLE")
    soundfile.write(folder / "silence.wav", np.zeros(8000, dtype=np.float32), rate, subtype="PCM_16")
    soundfile.write(folder / "clipped.wav", np.clip(speech * 20, -1, 1), rate, subtype="PCM_16")
    soundfile.write(folder / "dc_offset.wav", 0.5 * speech + 0.4, rate, subtype="PCM_16")
    soundfile.write(folder / "long.wav", np.tile(speech, int(70 * rate / len(speech)) + 1), rate, subtype="PCM_16")
    soundfile.write(folder / "six_channels.wav", np.stack([speech * (c + 1) / 7 for c in range(6)], axis=1), rate, subtype="PCM_16")
    for odd_rate in (11_025, 22_050, 44_100, 48_000, 96_000):
        soundfile.write(folder / f"rate_{odd_rate}.flac", resample(speech, rate, odd_rate), odd_rate, subtype="PCM_16")
    soundfile.write(folder / "with spaces in it.wav", speech, rate, subtype="PCM_16")
    soundfile.write(folder / "Çà_ünïcødé_日本.wav", speech, rate, subtype="PCM_16")
    return folder


def test_an_odd_corpus_runs_through_labels_with_the_bad_files_named(tmp_path: Path, odd_corpus: Path, client) -> None:
    config = load_config(write_config(tmp_path / "cfg.yaml", odd_corpus, tmp_path / "runs"))
    chain = run_chain(config, client, "labels")

    report = chain.store.read_json(chain.layout.intake_report)
    reasons = {Path(rejection["path"]).name: (rejection["reason"], rejection["detail"]) for rejection in report["rejected"]}
    assert reasons.keys() == {"has_nan.wav", "has_inf.wav", "silence.wav"}
    assert reasons["has_nan.wav"] == ("non-finite", "1 NaN or Inf sample value(s), the first at sample 100")
    assert reasons["has_inf.wav"] == ("non-finite", "2 NaN or Inf sample value(s), the first at sample 5")
    assert reasons["silence.wav"][0] == "silent"

    manifest = {utterance.id: utterance for utterance in chain.utterances}
    expected = {"clipped", "dc_offset", "long", "six_channels", "with spaces in it", "Çà_ünïcødé_日本"}
    assert expected | {f"rate_{rate}" for rate in (11_025, 22_050, 44_100, 48_000, 96_000)} <= manifest.keys()
    assert len(manifest) == 6 + 11
    assert manifest["six_channels"].channels == 6 and manifest["rate_96000"].sample_rate == 96_000
    assert manifest["long"].seconds > 60

    features = chain.store.open_zarr(chain.layout.features_store(1), mode="r")
    assert np.isfinite(features["features"][:]).all()
    assert list(features["utt_ids"][:]) == [utterance.id for utterance in chain.utterances]
    labels = chain.records["labels"]
    assert labels.counts["frames"] == chain.records["features"].counts["frames"] and labels.counts["utterances"] == 17

    # Should a non-finite value get into the features after all, the label parts refuse it by name.
    array = chain.store.open_zarr(chain.layout.features_store(1), mode="r+")["features"]
    first = chain.utterances[0]
    array[3, 0] = np.nan
    forget_stage(chain.store, chain.layout.scope(1), "labels")
    with pytest.raises(PartsFailed, match=rf"1 frame\(s\) with NaN or Inf values, of utterance\(s\) {first.id} \("):
        run_chain(config, client, "labels")


def test_check_finite_names_the_utterances_of_the_bad_rows() -> None:
    spans = tuple(UtteranceSpan(i, f"u{i}", f"/c/u{i}.wav", 1600, offset, 10) for i, offset in enumerate((0, 10, 20)))
    block = np.zeros((20, 3), dtype=np.float32)
    check_finite(block, 10, spans[1:], "features of chunk-000001")
    block[[2, 15]] = [np.inf, 0, 0], [0, np.nan, 0]
    with pytest.raises(NonFiniteValues, match=r"chunk-000001: 2 frame\(s\) with NaN or Inf values, of utterance\(s\) u1 \(/c/u1.wav\), u2 \(/c/u2.wav\)"):
        check_finite(block, 10, spans[1:], "features of chunk-000001")


def test_the_label_stage_refuses_stored_features_with_nan_naming_the_utterance() -> None:
    spans = (UtteranceSpan(0, "u0", "/c/u0.wav", 16000, 0, 10), UtteranceSpan(1, "u1", "/c/u1.wav", 16000, 10, 10))
    job = LabelJob((0,), 0, 20, spans)
    rows = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    assert checked_nearest_labels(rows, rows[:3].copy(), job).tolist()[:3] == [0, 1, 2]
    rows[13, 2] = np.nan
    with pytest.raises(NonFiniteValues, match=r"1 frame\(s\) with NaN or Inf values, of utterance\(s\) u1 \(/c/u1.wav\)"):
        checked_nearest_labels(rows, rows[:3].copy(), job)
