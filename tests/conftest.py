"""Shared fixtures: real speech from ../shared, a real Dask LocalCluster, salted corpora."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional
from distributed.diagnostics.plugin import WorkerPlugin

from infra.cluster import dask_client

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd-8k" / "wav"


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    """300 real 8 kHz recordings (CC BY-SA) that live beside the checkout, not in it."""
    if not FSDD.is_dir():
        pytest.skip(f"real speech sample {FSDD} is absent (it lives in ../shared beside the checkout)")
    return FSDD


@pytest.fixture(scope="session")
def client():
    """A real Dask LocalCluster: two worker processes, one thread each."""
    with dask_client(n_workers=2, threads_per_worker=1, memory_limit="3GiB") as dask:
        yield dask


def read_real(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(path, dtype="float32")
    return samples, rate


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, new_rate).numpy()


@pytest.fixture
def salted_corpus(tmp_path: Path, fsdd_dir: Path) -> Path:
    """Real speech at 8 and 16 kHz, stereo and 44.1 kHz flac, plus four files that must be rejected."""
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    sources = sorted(fsdd_dir.glob("*.wav"))
    for path in sources[:24]:
        shutil.copy(path, folder / path.name)
    for path in sources[100:102]:
        samples, rate = read_real(path)
        soundfile.write(folder / "nested" / f"{path.stem}_16k.wav", resample(samples, rate, 16_000), 16_000, subtype="PCM_16")
    samples, rate = read_real(sources[200])
    stereo = np.stack([samples, 0.5 * samples[::-1]], axis=1)
    soundfile.write(folder / "stereo.wav", stereo, rate, subtype="PCM_16")
    soundfile.write(folder / "hifi.flac", resample(read_real(sources[250])[0], rate, 44_100), 44_100, subtype="PCM_16")
    (folder / "empty.wav").write_bytes(b"")
    whole = sources[7].read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.wav").write_text("this is not audio\n")
    soundfile.write(folder / "blip.wav", samples[:400], rate, subtype="PCM_16")
    return folder


def write_config(path: Path, source: Path | str, store: Path | str, run: str = "t", **features: object) -> Path:
    features_yaml = ", ".join(f"{key}: {value}" for key, value in {"kind": "mfcc", **features}.items())
    path.write_text(
        f"""run: {run}
store: {store}
corpus:
  source: {source}
dask: {{n_workers: 2}}
iterations:
  - features: {{{features_yaml}}}
    kmeans: {{k: 8}}
    train: {{model: tiny, steps: 10}}
"""
    )
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two minutes of synthesized English with phone alignments (tasks/demo_corpus.py)."""
    from tasks.demo_corpus import synthesize_demo_corpus

    folder = tmp_path_factory.mktemp("demo") / "corpus"
    synthesize_demo_corpus(folder, minutes=2, seed=7)
    return folder


def demo_config(tmp_path: Path, corpus: Path, name: str = "runs", k: int = 16, **kmeans: object):
    """A validated config over the demo corpus, with alignments."""
    from tasks.config import PretrainConfig

    return PretrainConfig.model_validate(
        {
            "run": "t",
            "store": str(tmp_path / name),
            "corpus": {"source": str(corpus / "wav"), "alignments": str(corpus / "align")},
            "iterations": [
                {"features": {"kind": "mfcc", "chunk_frames": 2048}, "kmeans": {"k": k, **kmeans}, "train": {"model": "tiny"}}
            ],
        }
    )


def first_to_claim(flag: str) -> bool:
    """True for exactly one caller across processes: the one that creates `flag`, writing its pid there."""
    try:  # O_EXCL: two workers starting tasks at once must not both act
        descriptor = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    return True


class KillWorkerAtFirstTask(WorkerPlugin):
    """SIGKILLs the worker process that starts the first task whose key starts with `prefix`
    (once across workers and restarts: the flag file says which pid it was)."""

    def __init__(self, prefix: str, flag: str) -> None:
        self.prefix = prefix
        self.flag = flag

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith(self.prefix) and first_to_claim(self.flag):
            os.kill(os.getpid(), signal.SIGKILL)
