"""Every config mistake found before work: in seconds, with the field path, exit status 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from infra.store import ArtifactStore
from tasks.run.config import ConfigError
from tasks.run.layout import RunLayout
from tests.support import RUNS_BUCKET, demo_config, run_chain, run_cli

TWO_ITERATIONS = """\
run: t
store: {store}
corpus: {{source: {source}}}
{extra}
iterations:
  - features: {{kind: mfcc}}
    kmeans: {{k: {k}{kmeans}}}
    train: {{model: tiny, steps: 2{train}}}
  - features: {{kind: hubert, layer: {layer}}}
    kmeans: {{k: 8}}
    train: {{model: tiny, steps: 2}}
"""


def write(tmp_path: Path, source: Path | str, store: Path | str | None = None, extra: str = "", k: int = 8,
          kmeans: str = "", train: str = "", layer: int = 3) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(TWO_ITERATIONS.format(
        store=store or tmp_path / "runs", source=source, extra=extra, k=k, kmeans=kmeans, train=train, layer=layer
    ))
    return path


def refused_before_work(tmp_path: Path, config: Path, expected: str) -> float:
    """`run` exits 2 saying `expected`, before a cluster starts; returns the seconds it took."""
    started = time.monotonic()
    result = run_cli(tmp_path, "run", str(config), check=False)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Dask scheduler" not in result.stderr  # nothing started
    return seconds


CASES = {
    "layer beyond the previous model": (
        {"layer": 13}, "iterations.2.features.layer: 13 exceeds the 6 layers of iteration 1's 'tiny' model"),
    "max_frames below k": (
        {"k": 100, "kmeans": ", max_frames: 50"}, "iterations.1.kmeans: Value error, max_frames 50 is fewer than k=100"),
    "nnodes without a cluster": ({"train": ", launch: {nnodes: 2}"}, "iterations.1.train.launch.nnodes is 2, which needs an external Dask cluster"),
    "a store that cannot be written": (
        {"store": "/etc/hostname/runs"}, "store: /etc/hostname/runs cannot be written: NotADirectoryError"),
    "a corpus source that does not exist": ({"source": "/no/such/corpus"}, "corpus.source: /no/such/corpus does not exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_config_mistake_is_refused_before_work_with_its_field(tmp_path: Path, demo_corpus: Path, case: str) -> None:
    settings, expected = CASES[case]
    settings = {"source": demo_corpus / "wav", **settings}
    refused_before_work(tmp_path, write(tmp_path, **settings), expected)


@pytest.mark.slow
def test_a_config_mistake_is_refused_in_seconds(tmp_path: Path, demo_corpus: Path) -> None:
    """A timing: in the slow set, where the machine is not shared with the fast tests' clusters."""
    seconds = refused_before_work(tmp_path, write(tmp_path, source=demo_corpus / "wav", layer=13), "exceeds the 6 layers")
    assert seconds < 10, f"took {seconds:.1f} s"


def test_credentials_the_s3_endpoint_refuses_are_named_for_the_store_and_the_source(tmp_path: Path, s3, demo_corpus: Path) -> None:
    options = s3.storage_options()
    extra = (
        f"storage_options: {{key: {options['key']}, secret: not-the-secret, "
        f"client_kwargs: {{endpoint_url: '{s3.endpoint_url}'}}}}"
    )
    config = write(tmp_path, "s3://corpus/wav", f"s3://{RUNS_BUCKET}/preflight", extra=extra)
    refused_before_work(tmp_path, config, "corpus.source: s3://corpus/wav cannot be read: PermissionError")
    refused_before_work(tmp_path, config, f"store: s3://{RUNS_BUCKET}/preflight cannot be written: PermissionError")


def test_a_k_beyond_the_corpus_frames_stops_right_after_intake_naming_the_field(tmp_path: Path, demo_corpus: Path, client) -> None:
    config = demo_config(tmp_path, demo_corpus, k=20_000)
    with pytest.raises(ConfigError, match=r"iterations\.1\.kmeans\.k: 20000 exceeds the about \d+ frames k-means would fit on"):
        run_chain(config, client, "labels")
    store = ArtifactStore(config.store)
    assert store.exists(RunLayout("t").manifest) and not store.exists(RunLayout("t").features_store(1))


def test_a_source_folder_without_audio_intake_reads_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    corpus = tmp_path / "aac"
    (corpus / "nested").mkdir(parents=True)
    for number in range(5):
        (corpus / ("nested" if number % 2 else "") / f"utt{number}.M4A").write_bytes(b"\x00\x00\x00\x20ftyp")
    (corpus / "notes.txt").write_text("recorded in 2019\n")
    refused_before_work(
        tmp_path, write(tmp_path, corpus),
        f"corpus.source: no audio file (.wav, .flac, .mp3, .ogg, .opus) under {corpus} (found 5 .m4a files, 1 .txt file)",
    )
    assert not (tmp_path / "runs").exists()
