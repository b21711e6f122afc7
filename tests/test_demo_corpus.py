"""The synthetic demo corpus: reproducible, well-formed, and with alignments that match the audio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from devtools.demo_corpus import MAX_WORDS, MIN_WORDS, SPEAKERS, DemoCorpusSummary, make_sentence, synthesize_demo_corpus
from devtools.espeak import EspeakSynthesizer

SAMPLE_RATE = 16_000
SIBILANTS = {"s", "S", "z"}
VOWELS = {"a", "aa", "A:", "E", "I", "i", "i:", "0", "O:", "V", "U", "u:", "@", "3", "3:", "aI", "eI", "oU", "aU"}


def _corpus_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def _alignment(root: Path, entry: dict) -> list[tuple[float, float, str]]:
    lines = (root / "align" / f"{Path(entry['audio_filepath']).stem}.tsv").read_text().splitlines()
    assert lines[0] == "start_sec\tend_sec\tphone"
    rows = [line.split("\t") for line in lines[1:]]
    return [(float(start), float(end), phone) for start, end, phone in rows]


def _audio(root: Path, entry: dict) -> np.ndarray:
    samples, sample_rate = soundfile.read(root / entry["audio_filepath"], dtype="float32")
    assert sample_rate == SAMPLE_RATE
    return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoCorpusSummary]:
    root = tmp_path_factory.mktemp("demo") / "corpus"
    return root, synthesize_demo_corpus(root, minutes=0.5, seed=0)


def test_same_seed_gives_byte_identical_corpora(tmp_path: Path) -> None:
    first = synthesize_demo_corpus(tmp_path / "first", minutes=0.3, seed=7)
    second = synthesize_demo_corpus(tmp_path / "second", minutes=0.3, seed=7)
    assert first.model_dump(exclude={"out_dir"}) == second.model_dump(exclude={"out_dir"})
    assert _corpus_files(tmp_path / "first") == _corpus_files(tmp_path / "second")
    other = synthesize_demo_corpus(tmp_path / "other", minutes=0.3, seed=8)
    assert _manifest(tmp_path / "other") != _manifest(tmp_path / "first")
    assert first.seconds >= 18 and other.seconds >= 18


def test_manifest_matches_files_and_summary(corpus: tuple[Path, DemoCorpusSummary]) -> None:
    root, summary = corpus
    entries = _manifest(root)
    assert summary.utterances == len(entries)
    assert summary.speakers == len({entry["speaker"] for entry in entries}) >= 6
    assert summary.seconds == pytest.approx(sum(entry["duration"] for entry in entries))
    assert 30 <= summary.seconds < 30 + 7
    assert sorted(path.name for path in (root / "wav").iterdir()) == sorted(
        Path(entry["audio_filepath"]).name for entry in entries
    )
    for entry in entries:
        assert set(entry) == {"audio_filepath", "duration", "speaker", "text"}
        assert re.fullmatch(rf"wav/{entry['speaker']}_\d{{5}}\.wav", entry["audio_filepath"])
        info = soundfile.info(root / entry["audio_filepath"])
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
        assert entry["duration"] == info.frames / SAMPLE_RATE
        assert 1.0 < entry["duration"] < 7.0
        assert MIN_WORDS <= len(entry["text"].split()) <= MAX_WORDS


def test_alignments_are_ordered_and_cover_the_speech(corpus: tuple[Path, DemoCorpusSummary]) -> None:
    root, _ = corpus
    phones: set[str] = set()
    for entry in _manifest(root):
        rows = _alignment(root, entry)
        assert len(rows) >= MIN_WORDS
        for (start, end, phone), next_row in zip(rows, [*rows[1:], None]):
            assert 0 <= start < end <= entry["duration"]
            assert phone and not phone.startswith("_")
            if next_row is not None:
                assert end <= next_row[0]
        assert sum(end - start for start, end, _ in rows) > 0.6 * entry["duration"]
        phones |= {phone for _, _, phone in rows}
    assert len(phones) >= 25


def test_labelled_segments_carry_the_speech_energy(corpus: tuple[Path, DemoCorpusSummary]) -> None:
    """Pauses (unlabelled) must be near-silent, and sibilants noisier than vowels: the
    alignment really lines up with the audio, not just with the text."""
    root, _ = corpus
    labelled_rms, gap_rms = [], []
    crossings: dict[str, list[float]] = {"sibilant": [], "vowel": []}
    for entry in _manifest(root):
        audio = _audio(root, entry)
        labelled = np.zeros(len(audio), dtype=bool)
        for start, end, phone in _alignment(root, entry):
            segment = slice(round(start * SAMPLE_RATE), round(end * SAMPLE_RATE))
            labelled[segment] = True
            kind = "sibilant" if phone in SIBILANTS else "vowel" if phone in VOWELS else None
            if kind and segment.stop - segment.start > 1:
                crossings[kind].append(float(np.mean(np.diff(np.signbit(audio[segment])))))
        labelled_rms.append(np.sqrt(np.mean(audio[labelled] ** 2)))
        if not labelled.all():
            gap_rms.append(np.sqrt(np.mean(audio[~labelled] ** 2)))
    assert gap_rms, "expected unlabelled pauses (leading/trailing silence)"
    assert np.mean(labelled_rms) > 10 * np.mean(gap_rms)
    assert np.mean(crossings["sibilant"]) > 2 * np.mean(crossings["vowel"])


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "leftover.txt").write_text("from another run")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        synthesize_demo_corpus(tmp_path, minutes=0.05, seed=0)


def test_sentences_are_deterministic_and_within_length() -> None:
    first = [make_sentence(np.random.default_rng(3)) for _ in range(3)]
    assert first == [make_sentence(np.random.default_rng(3)) for _ in range(3)]
    rng = np.random.default_rng(0)
    for _ in range(500):
        sentence = make_sentence(rng)
        assert MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
        assert sentence[0].isupper() and sentence.endswith(".")


def test_every_speaker_voice_loads_and_unknown_voices_fail() -> None:
    synthesizer = EspeakSynthesizer()
    assert synthesizer.sample_rate == 22_050
    for speaker in SPEAKERS:
        utterance = synthesizer.synthesize("A quiet test.", speaker.voice, speaker.rate_wpm, speaker.pitch)
        assert utterance.waveform.dtype == np.float32 and utterance.seconds > 0.5
        assert len(utterance.phones) >= 5
    assert len({speaker.voice for speaker in SPEAKERS}) >= 6
    assert {speaker.name[0] for speaker in SPEAKERS} == {"m", "f"}
    with pytest.raises(RuntimeError, match="no-such-voice"):
        synthesizer.synthesize("Hello.", "no-such-voice", 170, 50)
