"""Shared fixtures: real speech from ../shared, a real Dask LocalCluster, a real S3 server, corpora."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

from devtools.seaweed import S3Server, find_weed, seaweed_s3
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.run.run_info import write_run_info
from tasks.stages.catalog import run_plan
from tests.support import FSDD, NO_WEED, RUNS_BUCKET, CommittedRun, read_real, resample, two_iteration_config


@pytest.fixture(autouse=True)
def torch_threads_as_they_were() -> Iterator[None]:
    """Worker-side code run in the test process (features, labels, probes) sets torch to one
    thread; every test starts with the process's own count again, so a model trained in one test
    and resumed in another does the same arithmetic (float sums depend on the thread count)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS on loopback, signed requests only) with buckets `runs` and `corpus`."""
    if find_weed() is None:
        pytest.skip(NO_WEED)
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket(RUNS_BUCKET)
        server.create_bucket("corpus")
        yield server


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


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two minutes of synthesized English with phone alignments (devtools/demo_corpus.py)."""
    from devtools.demo_corpus import synthesize_demo_corpus

    folder = tmp_path_factory.mktemp("demo") / "corpus"
    synthesize_demo_corpus(folder, minutes=2, seed=7)
    return folder


@pytest.fixture(scope="session")
def committed_run(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path, client) -> CommittedRun:
    """One finished two-iteration run (tests/support.py), built once per test session: tests that
    only read it use it as it is, tests that change it take `copied_run`."""
    config = two_iteration_config(tmp_path_factory.mktemp("committed") / "runs", demo_corpus)
    store = ArtifactStore(config.store)
    write_run_info(store, config)
    run_plan(config, store, client)
    return CommittedRun(config, store)


@pytest.fixture
def copied_run(committed_run: CommittedRun, tmp_path: Path) -> CommittedRun:
    """A copy of the session's committed run, for a test that changes it."""
    return committed_run.copied_to(tmp_path / "runs")
