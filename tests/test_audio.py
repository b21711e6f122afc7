from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional

from tasks.corpus.audio import AudioError, decode_audio, load_audio_16k, resampled_length
from tasks.corpus.formats import list_candidates
from tasks.corpus.manifest import ManifestError
from tasks.corpus.places import misplaced


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000])
@pytest.mark.parametrize("samples", [1, 399, 12345, 48000])
def test_resampled_length_matches_torchaudio(rate: int, samples: int) -> None:
    waveform = torch.zeros(samples)
    assert resampled_length(samples, rate) == torchaudio.functional.resample(waveform, rate, 16_000).shape[0]


def test_real_8k_speech_is_resampled_to_16k(fsdd_dir: Path) -> None:
    path = sorted(fsdd_dir.glob("*.wav"))[0]
    native, rate = soundfile.read(path, dtype="float32")
    assert rate == 8000
    waveform = load_audio_16k(str(path))
    assert waveform.dtype == torch.float32
    assert waveform.shape[0] == resampled_length(len(native), rate)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"hello, not audio", "unreadable"), (b"RIFF\x00\x00\x00\x00WAVEjunk", "unreadable")],
)
def test_broken_files_are_named_by_reason(content: bytes, reason: str) -> None:
    with pytest.raises(AudioError) as caught:
        decode_audio(content)
    assert caught.value.reason == reason


def test_truncated_wav_and_flac_are_detected(tmp_path: Path) -> None:
    tone = (0.3 * np.sin(np.arange(16000) / 10)).astype(np.float32)
    for suffix in ("wav", "flac"):
        path = tmp_path / f"tone.{suffix}"
        soundfile.write(path, tone, 16000, subtype="PCM_16")
        data = path.read_bytes()
        with pytest.raises(AudioError) as caught:
            decode_audio(data[: len(data) // 2])
        assert caught.value.reason in ("truncated", "corrupt")


def test_sources_folder_tsv_and_jsonl_list_the_same_files(tmp_path: Path, fsdd_dir: Path) -> None:
    files = sorted(fsdd_dir.glob("*.wav"))[:3]
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{fsdd_dir}\n" + "".join(f"{p.name}\t{soundfile.info(p).frames}\n" for p in files))
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(f'{{"audio_filepath": "{p}", "speaker": "{p.stem.split("_")[1]}"}}\n' for p in files))
    from_tsv = list_candidates(str(tsv))
    from_jsonl = list_candidates(str(jsonl))
    assert [c.path for c in from_tsv] == [c.path for c in from_jsonl] == [str(p) for p in files]
    assert [c.id for c in from_tsv] == [p.stem for p in files]
    assert from_tsv[0].expected_samples == soundfile.info(files[0]).frames
    assert from_jsonl[0].speaker == "george"
    folder = list_candidates(str(fsdd_dir))
    assert len(folder) == 300 and folder[0].path == str(files[0])


def test_relative_manifest_paths_resolve_against_the_manifest(tmp_path: Path, fsdd_dir: Path) -> None:
    (tmp_path / "audio").mkdir()
    source = sorted(fsdd_dir.glob("*.wav"))[0]
    (tmp_path / "audio" / source.name).write_bytes(source.read_bytes())
    (tmp_path / "m.jsonl").write_text(f'{{"audio_filepath": "audio/{source.name}", "duration": 0.3}}\n')
    (tmp_path / "m.tsv").write_text(f"audio\n{source.name}\t100\n")
    assert list_candidates(str(tmp_path / "m.jsonl"))[0].path == str(tmp_path / "audio" / source.name)
    assert list_candidates(str(tmp_path / "m.tsv"))[0].path == str(tmp_path / "audio" / source.name)


def test_malformed_manifests_name_the_line(tmp_path: Path) -> None:
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("/root\na.wav\tmany\n")
    with pytest.raises(ManifestError, match="bad.tsv line 2"):
        list_candidates(str(tsv))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"audio_filepath": "a.wav"}\n{"path": "b.wav"}\n')
    with pytest.raises(ManifestError, match="bad.jsonl line 2"):
        list_candidates(str(jsonl))


def test_duplicate_ids_name_both_paths(tmp_path: Path, fsdd_dir: Path) -> None:
    source = sorted(fsdd_dir.glob("*.wav"))[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / source.name).write_bytes(source.read_bytes())
    with pytest.raises(ManifestError) as caught:
        list_candidates(str(tmp_path), ids="stem")
    assert str(tmp_path / "a" / source.name) in str(caught.value)
    assert str(tmp_path / "b" / source.name) in str(caught.value)


def test_a_tsv_root_line_elsewhere_is_not_the_sources_own_root(tmp_path: Path) -> None:
    """A .tsv's root line in the same place (a local folder for a local .tsv) is where its entries lie;
    one in another place (a URL) still resolves them, but they must be allowed to be read."""
    (tmp_path / "local.tsv").write_text("/data/audio\nspk/a.wav\t16000\n")
    (tmp_path / "remote.tsv").write_text("http://169.254.169.254/latest\nmeta.wav\t16000\n")
    local, remote = list_candidates(str(tmp_path / "local.tsv"))[0], list_candidates(str(tmp_path / "remote.tsv"))[0]
    assert (local.path, local.root) == ("/data/audio/spk/a.wav", "/data/audio")
    assert misplaced(local, ()) is None
    assert (remote.path, remote.root) == ("http://169.254.169.254/latest/meta.wav", str(tmp_path))
    assert misplaced(remote, ())[0] == "outside the source"
    assert misplaced(remote, ("http://169.254.169.254/latest",)) is None


def test_two_folders_with_the_same_file_names_get_distinct_ids(tmp_path: Path, fsdd_dir: Path) -> None:
    sources = sorted(fsdd_dir.glob("*.wav"))[:2]
    for speaker in ("spk1/ch1", "spk2/ch1"):
        (tmp_path / speaker).mkdir(parents=True)
        for number, path in enumerate(sources):
            (tmp_path / speaker / f"{number:04d}.flac").write_bytes(path.read_bytes())
    assert [c.id for c in list_candidates(str(tmp_path))] == ["spk1/ch1/0000", "spk1/ch1/0001", "spk2/ch1/0000", "spk2/ch1/0001"]
    assert [c.id for c in list_candidates(str(tmp_path), ids="path")][0] == "spk1/ch1/0000"
    unique = tmp_path / "spk1"
    assert [c.id for c in list_candidates(str(unique))] == ["0000", "0001"]  # stems, where they do not repeat
