"""The pipeline on a real S3 server with an external Dask cluster: no mocks of S3, no LocalCluster.

SeaweedFS (devtools/seaweed.py) serves S3 on loopback and takes only signed requests; a `dask
scheduler` and two `dask worker` processes are started the way a deployment starts them. Both start
once for this module, as does the reference: the same stages on the same corpus with a local folder
store and a LocalCluster. Every S3 run must give the reference's bytes (output digests and arrays).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import s3fs
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from devtools.seaweed import S3Server, die_with_parent, find_weed, free_ports
from infra.cluster import WORKER_MALLOC_ENVIRON, dask_client
from infra.parts import PartsFailed
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import load_centroids
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES
from tasks.stages.train.launcher import TRAIN_NODE_RESOURCE
from tests.support import (
    NO_WEED,
    RUNS_BUCKET,
    Chain,
    KillWorkerAtFirstTask,
    first_to_claim,
    objects_under,
    run_chain,
    run_cli,
    with_settings,
)

pytestmark = pytest.mark.skipif(find_weed() is None, reason=NO_WEED)

# The plugins and functions below run on the external workers, which cannot import the test modules.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(sys.modules[KillWorkerAtFirstTask.__module__])

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CORPUS_URL = "s3://corpus/demo"
CHUNK_FRAMES = 512  # about 12 chunks per stage on one minute of audio
K = 16
# The outage tests' S3 settings: botocore's (s3fs `config_kwargs`) one attempt per s3fs try and
# short timeouts, and 2 s3fs tries per request (`retries`), so that a chunk read makes at most 4
# (infra/s3.py). A dead server then fails the stage in about a second, a hung one in about 6 s;
# with the defaults (5 s3fs tries, a chunk read's 25, botocore's 60 s timeouts) a hung server took
# minutes per request.
OUTAGE_CLIENT = {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2, "read_timeout": 1}
OUTAGE_RETRIES = 2
OUTAGE_LIMIT_SECONDS = 120


# -- servers ---------------------------------------------------------------------------------------


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"dask scheduler not listening on {port} after {timeout} s:\n{log.read_text()[-3000:]}")


def _end_all(processes: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM the process groups we started, together; SIGKILL what is left of them after `grace` s."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the nanny's worker child, if it outlived the nanny
        process.wait(10)


@dataclass
class ExternalCluster:
    address: str
    folder: Path

    @property
    def scheduler_file(self) -> Path:
        """Written by the scheduler (`--scheduler-file`), as on Slurm (infra/deploy/slurm)."""
        return self.folder / "scheduler.json"


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalCluster]:
    """`dask scheduler` and two `dask worker` processes, each worker with its own local directory.

    The workers' environment holds no AWS credentials: a test that wants them there says so.
    """
    folder = tmp_path_factory.mktemp("dask")
    [port] = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    environ = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    environ.update({name: str(value) for name, value in WORKER_MALLOC_ENVIRON.items()})  # as the README says
    processes: list[subprocess.Popen] = []

    def spawn(name: str, command: list[str]) -> Path:
        log = folder / f"{name}.log"
        with log.open("wb") as handle:
            processes.append(
                subprocess.Popen(
                    command, cwd=REPO, env=environ, stdin=subprocess.DEVNULL, stdout=handle,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
                )
            )
        return log

    cluster = ExternalCluster(address, folder)
    try:
        log = spawn(
            "scheduler",
            [
                str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
                "--scheduler-file", str(cluster.scheduler_file),
            ],
        )
        _wait_for_port(port, processes[0], log)
        for index in range(2):
            spawn(
                f"worker-{index}",
                [
                    str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                    "--local-directory", str(folder / f"worker-{index}"), "--host", "127.0.0.1",
                    "--name", f"external-{index}", "--no-dashboard", "--memory-limit", "3GiB",
                    "--resources", f"{TRAIN_NODE_RESOURCE}=1",  # each stands for a training machine too
                ],
            )
        yield cluster
    finally:
        _end_all(processes[1:])  # the workers, then the scheduler
        _end_all(processes[:1])


@pytest.fixture(scope="module")
def external_client(external_cluster: ExternalCluster) -> Iterator[Client]:
    with dask_client(address=external_cluster.address) as client:
        try:
            client.wait_for_workers(2, timeout=120)
        except TimeoutError as error:
            logs = "\n".join(
                f"{log.name}:\n{log.read_text()[-2000:]}" for log in sorted(external_cluster.folder.glob("*.log"))
            )
            raise RuntimeError(f"the external Dask workers did not connect in 120 s:\n{logs}") from error
        yield client


# -- corpus, runs, reference -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from devtools.demo_corpus import synthesize_demo_corpus

    folder = tmp_path_factory.mktemp("s3-demo") / "corpus"
    synthesize_demo_corpus(folder, minutes=1, seed=1)
    return folder


@pytest.fixture(scope="module")
def s3_corpus(s3: S3Server, corpus_dir: Path) -> str:
    """The demo corpus's wav/ and align/ uploaded to the bucket: the pipeline reads them from S3."""
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    local = sorted(path for folder in ("wav", "align") for path in (corpus_dir / folder).iterdir())
    fs.put([str(path) for path in local], [f"{CORPUS_URL}/{path.parent.name}/{path.name}" for path in local])
    assert len(fs.find(CORPUS_URL)) == len(local)
    return CORPUS_URL


def pipeline_config(run: str, store: str, corpus: str, storage_options: dict | None = None) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": store,
            "storage_options": storage_options or {},
            "corpus": {"source": f"{corpus}/wav", "alignments": f"{corpus}/align"},
            "iterations": [
                {
                    "features": {"kind": "mfcc", "chunk_frames": CHUNK_FRAMES},
                    "kmeans": {"k": K},
                    "train": {"model": "tiny"},
                }
            ],
        }
    )


Outcome = Chain


def run_stages(config: PretrainConfig, client: Client, last: str = "labels") -> Outcome:
    """The stages in order up to `last`, as every test module runs them (tests/support.py)."""
    return run_chain(config, client, last)


def arrays(store: ArtifactStore, run: str) -> dict[str, np.ndarray]:
    """Everything the stages wrote that later stages read, as arrays."""
    layout = RunLayout(run)
    features = store.open_zarr(layout.features_store(1), "r")
    found = {name: features[name][:] for name in ("features", "offsets", "utt_ids")}
    if store.exists(layout.centroids(1)):
        found["centroids"] = load_centroids(store, layout, 1)
    if store.exists(f"{layout.labels_store(1)}/zarr.json"):
        labels = store.open_zarr(layout.labels_store(1), "r")
        found.update({f"labels.{name}": labels[name][:] for name in ("labels", "offsets", "utt_ids")})
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, client: Client) -> Outcome:
    """The same stages on the same corpus: local folder store, LocalCluster (conftest's `client`)."""
    store = tmp_path_factory.mktemp("reference") / "runs"
    return run_stages(pipeline_config("reference", str(store), str(corpus_dir)), client)


def without_resumed(counts: dict) -> dict:
    return {key: value for key, value in counts.items() if key != "chunks_resumed"}


def without_clock(metrics: dict) -> dict:
    """Metrics without what a resumed stage's clock adds (its attempts and their time)."""
    return {key: value for key, value in metrics.items() if key not in ("attempts", "seconds_all_attempts")}


def assert_same_as_reference(outcome: Outcome, reference: Outcome, stages: tuple[str, ...]) -> None:
    for stage in stages:
        ours, theirs = outcome.records[stage], reference.records[stage]
        assert ours.output_digest == theirs.output_digest, stage
        assert without_resumed(ours.counts) == without_resumed(theirs.counts), stage
        if stage == "labels":  # integer tallies: equal whatever the order parts finished or resumed in
            assert without_clock(ours.metrics) == without_clock(theirs.metrics)
    ours, theirs = arrays(outcome.store, outcome.config.run), arrays(reference.store, reference.config.run)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
        assert value.dtype == theirs[name].dtype, name
    assert set(ours) >= {"features", "offsets", "utt_ids"}


def json_objects(s3: S3Server, prefix: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    return {path: fs.cat_file(path) for path in fs.find(prefix) if path.endswith(".json")}


def assert_no_credentials_in_records(s3: S3Server, run_prefix: str) -> None:
    written = json_objects(s3, run_prefix)
    assert any(path.endswith("labels.commit.json") for path in written), sorted(written)
    secrets = (s3.secret_key.encode(), s3.access_key.encode())
    leaking = [path for path, data in written.items() if any(secret in data for secret in secrets)]
    assert leaking == [], f"credentials written into {leaking}"


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def worker_environ(client: Client, name: str) -> set[str | None]:
    """The values of an environment variable in the workers (`os.environ.get` would pickle ours)."""
    return set(client.run(getenv, name).values())


# -- the store on S3 ---------------------------------------------------------------------------------


def test_tries_per_request_are_a_storage_option(s3: S3Server) -> None:
    """`retries` reaches s3fs (which takes no such option itself); nonsense is refused by name."""
    assert ArtifactStore(f"s3://{RUNS_BUCKET}/tries", s3.storage_options(retries=2)).fs.retries == 2
    assert ArtifactStore(f"s3://{RUNS_BUCKET}/tries", s3.storage_options()).fs.retries == 5  # s3fs's own
    with pytest.raises(ValueError, match="storage_options.retries must be at least 1"):
        ArtifactStore(f"s3://{RUNS_BUCKET}/tries", s3.storage_options(retries=0))


def test_the_store_round_trips_on_s3(s3: S3Server) -> None:
    store = ArtifactStore(f"s3://{RUNS_BUCKET}/store-{uuid.uuid4().hex[:8]}", s3.storage_options())
    assert not store.is_local and store.root_url.startswith(f"s3://{RUNS_BUCKET}/store-")
    assert store.read_json("a/missing.json") is None and not store.exists("a")

    store.write_json("a/b.json", {"x": [1, 2], "y": "z"})
    store.write_text("a/c.txt", "text\n")
    store.write_bytes("a/sub/d.bin", bytes(range(256)))
    assert store.read_json("a/b.json") == {"x": [1, 2], "y": "z"}
    assert store.read_text("a/c.txt") == "text\n"
    assert store.fs.cat_file(store.path("a/sub/d.bin")) == bytes(range(256))
    assert store.exists("a/b.json") and store.exists("a") and store.exists("a/sub")
    assert store.list_names("a") == ["b.json", "c.txt", "sub"]
    assert store.list_names("nothing/here") == []
    assert store.size("a/sub/d.bin") == 256 and store.size("missing") == 0
    assert store.size("a") == len(store.fs.cat_file(store.path("a/b.json"))) + 5 + 256

    group = store.open_zarr("z.zarr", "w")
    group.create_array("v", shape=(1000,), chunks=(256,), dtype="int16")[:] = np.arange(1000, dtype=np.int16)
    group.attrs["k"] = 7
    part = store.open_zarr("z.zarr", "r+")
    part["v"][256:512] = -1
    again = store.open_zarr("z.zarr", "r")
    expected = np.arange(1000, dtype=np.int16)
    expected[256:512] = -1
    np.testing.assert_array_equal(again["v"][:], expected)
    assert again.attrs["k"] == 7 and store.size("z.zarr") > 0

    store.remove("a/c.txt")
    assert store.list_names("a") == ["b.json", "sub"]
    store.remove("a")
    store.remove("a")  # missing: not an error
    assert not store.exists("a/b.json") and objects_under(store, "a") == []
    # (SeaweedFS keeps emptied folders listable for about two minutes, so `list_names("a")` may
    # still say ["sub"] here; on AWS S3 it is [] at once. No object is left either way.)


# -- the pipeline on S3 with an external cluster -----------------------------------------------------


@pytest.fixture(scope="module")
def s3_outcome(s3: S3Server, s3_corpus: str, external_client: Client) -> Outcome:
    """Intake to labels on S3 through the external cluster, with credentials from the config alone."""
    from tasks.run.run_info import write_run_info

    assert worker_environ(external_client, "AWS_SECRET_ACCESS_KEY") == {None}  # options alone must do
    config = pipeline_config("explicit", f"s3://{RUNS_BUCKET}/pipeline", s3_corpus, s3.storage_options())
    write_run_info(ArtifactStore(config.store, config.fsspec_options), config)
    return run_stages(config, external_client)


def test_the_stages_on_s3_with_an_external_cluster_match_a_local_run(
    s3: S3Server, external_client: Client, s3_outcome: Outcome, reference: Outcome
) -> None:
    malloc_trim = str(WORKER_MALLOC_ENVIRON["MALLOC_TRIM_THRESHOLD_"])
    assert worker_environ(external_client, "MALLOC_TRIM_THRESHOLD_") == {malloc_trim}  # as the README says
    outcome = s3_outcome

    assert all(utterance.path.startswith(f"{CORPUS_URL}/wav/") for utterance in outcome.utterances)
    assert [u.id for u in outcome.utterances] == [u.id for u in reference.utterances]
    assert_same_as_reference(outcome, reference, ("features", "kmeans", "labels"))
    assert objects_under(outcome.store, "explicit/iter-1/_progress") == []
    assert_no_credentials_in_records(s3, f"{RUNS_BUCKET}/pipeline/explicit")


class WorkerEnviron(WorkerPlugin):
    """Puts variables into each worker process's environment while registered (restarted ones too)."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ

    def setup(self, worker) -> None:
        os.environ.update(self.environ)

    def teardown(self, worker) -> None:
        for name in self.environ:
            os.environ.pop(name, None)


def test_credentials_can_come_from_the_environment_alone(
    s3: S3Server, s3_corpus: str, external_client: Client, reference: Outcome, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.run.run_info import write_run_info

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    external_client.register_plugin(WorkerEnviron(s3.env()), name="aws-environ")
    try:
        assert worker_environ(external_client, "AWS_ENDPOINT_URL") == {s3.endpoint_url}
        config = pipeline_config("from-env", f"s3://{RUNS_BUCKET}/pipeline", s3_corpus)
        assert config.storage_options == {}
        write_run_info(ArtifactStore(config.store), config)
        outcome = run_stages(config, external_client)
    finally:
        external_client.unregister_worker_plugin("aws-environ")
    assert worker_environ(external_client, "AWS_ENDPOINT_URL") == {None}
    assert_same_as_reference(outcome, reference, ("features", "kmeans", "labels"))
    assert_no_credentials_in_records(s3, f"{RUNS_BUCKET}/pipeline/from-env")


# -- faults ------------------------------------------------------------------------------------------


class SignalServerAfterFirstLabelPart(WorkerPlugin):
    """Signals the S3 server (SIGKILL: dead; SIGSTOP: hung) as soon as the first label task has
    finished (its part is marked)."""

    def __init__(self, server_pid: int, flag: str, signal_number: int) -> None:
        self.server_pid = server_pid
        self.flag = flag
        self.signal_number = signal_number

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish == "memory" and str(key).startswith("labels-") and first_to_claim(self.flag):
            os.kill(self.server_pid, self.signal_number)


OUTAGES = {
    # how the server fails, the signal that does it, what the stage's error must say
    "dead": (signal.SIGKILL, "Could not connect to the endpoint URL"),
    "hung": (signal.SIGSTOP, "Read timeout on endpoint URL"),  # uploads too: see infra/s3.py
}


def bring_back(s3: S3Server, outage: str) -> None:
    if outage == "hung":
        s3.resume()
    else:
        s3.stop()
        s3.start()


@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_an_s3_outage_during_the_label_stage_fails_it_cleanly_and_a_rerun_finishes_it(
    s3: S3Server, s3_corpus: str, external_client: Client, reference: Outcome, tmp_path: Path, outage: str
) -> None:
    signal_number, error = OUTAGES[outage]
    options = s3.storage_options(config_kwargs=OUTAGE_CLIENT, retries=OUTAGE_RETRIES)
    run = f"outage-{outage}"
    config = pipeline_config(run, f"s3://{RUNS_BUCKET}/pipeline", s3_corpus, options)
    before = run_stages(config, external_client, last="kmeans")
    store, records = before.store, before.records
    flag = tmp_path / "server-killed"
    assert s3.pid is not None
    external_client.register_plugin(SignalServerAfterFirstLabelPart(s3.pid, str(flag), signal_number), name="signal-s3")
    executor = ThreadPoolExecutor(1)
    try:
        clock = time.perf_counter()
        attempt = executor.submit(run_stage, STAGES["labels"], StageContext(config, store, external_client, 1))
        with pytest.raises(PartsFailed) as failure:
            try:
                attempt.result(timeout=OUTAGE_LIMIT_SECONDS)
            except FutureTimeout:
                pytest.fail(f"the label stage still ran {OUTAGE_LIMIT_SECONDS} s into an S3 outage (a hang)")
        failed_after = time.perf_counter() - clock
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        external_client.unregister_worker_plugin("signal-s3")
        bring_back(s3, outage)
    assert flag.exists(), "the server was never stopped: the test did not test anything"
    message = str(failure.value)
    assert "labels" in message and "parts failed" in message and "run again to resume" in message, message
    assert error in message and s3.endpoint_url in message, message
    print(f"label stage failed {failed_after:.1f} s after it started, the server {outage} during it:\n{message}")

    assert not store.exists(f"{run}/iter-1/labels.commit.json"), "a labels record exists after a failed stage"
    finished = store.list_names(f"{run}/iter-1/_progress/labels")
    assert "key.json" in finished and 0 < len(finished) - 1 < records["features"].counts["chunks"]

    labels = run_stage(STAGES["labels"], StageContext(config, store, external_client, 1))
    assert 0 < labels.counts["chunks_resumed"] < labels.counts["chunks"]
    outcome = Outcome(config, store, {**records, "labels": labels})
    assert_same_as_reference(outcome, reference, ("features", "kmeans", "labels"))
    assert objects_under(store, f"{run}/iter-1/_progress") == []  # no marker outlives the commit


def test_an_external_worker_killed_during_the_feature_stage_does_not_stop_it(
    s3: S3Server, s3_corpus: str, external_client: Client, reference: Outcome, tmp_path: Path
) -> None:
    pids_before = set(external_client.run(os.getpid).values())
    flag = tmp_path / "worker-killed"
    external_client.register_plugin(KillWorkerAtFirstTask("features-", str(flag)), name="kill-first-feature-worker")
    try:
        config = pipeline_config("worker-killed", f"s3://{RUNS_BUCKET}/pipeline", s3_corpus, s3.storage_options())
        outcome = run_stages(config, external_client, last="features")
    finally:
        external_client.unregister_worker_plugin("kill-first-feature-worker")
    assert flag.exists(), "no worker was killed: the test did not test anything"
    killed = int(flag.read_text())
    assert killed in pids_before
    assert_same_as_reference(outcome, reference, ("features",))
    external_client.wait_for_workers(2, timeout=120)  # the nanny brings a new worker process
    assert killed not in set(external_client.run(os.getpid).values())


def with_train(config: PretrainConfig, **settings) -> PretrainConfig:
    return with_settings(config, 1, train=settings)


@pytest.mark.slow
def test_training_on_two_machines_through_dask_equals_two_processes_on_one(
    s3: S3Server, external_client: Client, external_cluster: ExternalCluster, s3_outcome: Outcome, reference: Outcome
) -> None:
    """nnodes=2: one torchrun per `train_node` worker, meeting at a c10d rendezvous, reading S3."""
    short = {"steps": 4, "io": {"checkpoint_every": 2}, "logging": {"log_every": 2}, "max_batch_seconds": 4, "max_sample_seconds": 2}
    [port] = free_ports(1)
    on_the_cluster = s3_outcome.config.model_copy(update={"dask": s3_outcome.config.dask.model_copy(update={"address": external_cluster.address})})
    two_machines = with_train(on_the_cluster, launch={"nnodes": 2, "nproc": 1, "rdzv_port": port}, **short)
    on_s3 = run_stage(STAGES["train"], StageContext(two_machines, s3_outcome.store, external_client, 1))
    one_machine = with_train(reference.config, launch={"nproc": 2}, **short)
    local = run_stage(STAGES["train"], StageContext(one_machine, reference.store, None, 1))

    assert on_s3.counts == {"steps": 4, "processes": 2, "machines": 2}
    assert on_s3.output_digest == local.output_digest  # the same weights, bit for bit
    assert on_s3.metrics["loss_curve"] == local.metrics["loss_curve"]
    checkpoints = s3_outcome.store.list_names("explicit/iter-1/model/checkpoints")
    assert checkpoints == ["step-0000002.pt", "step-0000004.pt"]  # written once, by rank 0
    assert_no_credentials_in_records(s3, f"{RUNS_BUCKET}/pipeline/explicit")


def two_iteration_yaml(run: str, store: str, corpus: str, dask: str, storage_options: dict) -> str:
    """Two iterations (MFCC, then layer 2 of tiny) with a few training steps each."""
    train = "{model: tiny, steps: 6, max_batch_seconds: 4, max_sample_seconds: 2, io: {checkpoint_every: 3}, logging: {log_every: 3}}"
    return (
        f"run: {run}\nstore: {store}\nstorage_options: {json.dumps(storage_options)}\n"
        f"corpus: {{source: {corpus}/wav, alignments: {corpus}/align}}\ndask: {dask}\niterations:\n"
        f"  - features: {{kind: mfcc, chunk_frames: {CHUNK_FRAMES}}}\n    kmeans: {{k: {K}}}\n    train: {train}\n    profile: {{enabled: false}}\n"
        f"  - features: {{kind: hubert, layer: 2, chunk_frames: {CHUNK_FRAMES}}}\n    kmeans: {{k: 6}}\n    train: {train}\n    profile: {{enabled: false}}\n"
    )


@pytest.mark.slow
def test_the_two_iteration_pipeline_on_s3_and_an_external_scheduler_matches_a_local_run(
    s3: S3Server, s3_corpus: str, corpus_dir: Path, external_cluster: ExternalCluster, tmp_path: Path
) -> None:
    s3.create_bucket("pipeline")
    s3_config = tmp_path / "s3.yaml"
    s3_config.write_text(
        two_iteration_yaml(
            "twice", "s3://pipeline/runs", s3_corpus, f"{{scheduler_file: '{external_cluster.scheduler_file}'}}",
            s3.storage_options(),
        )
    )
    local_config = tmp_path / "local.yaml"
    local_config.write_text(two_iteration_yaml("twice", str(tmp_path / "runs"), str(corpus_dir), "{n_workers: 2}", {}))
    run_cli(tmp_path, "run", str(s3_config))
    run_cli(tmp_path, "run", str(local_config))

    def inspected(path: str, env: dict[str, str]) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "inspect", path, "--json"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=True,
        )
        status = json.loads(result.stdout)
        for iteration in status["iterations"]:
            for stage in iteration.values():
                if isinstance(stage, dict):
                    for volatile in (
                        "seconds", "finished_at", "bytes", "audio_seconds_per_second", "data_wait_share", "chunks_resumed",
                        "checkpoint_digests",  # a checkpoint holds its training log, timings included
                    ):
                        stage.pop(volatile, None)
        return status["iterations"]

    on_s3 = inspected("s3://pipeline/runs/twice", s3.env())
    local = inspected(str(tmp_path / "runs" / "twice"), {})
    assert [it["train"]["status"] for it in on_s3] == ["done", "done"]
    for ours, theirs in zip(on_s3, local, strict=True):
        for stage in ours:
            assert ours[stage] == theirs.get(stage), (ours["iteration"], stage, ours[stage], theirs.get(stage))
    assert_no_credentials_in_records(s3, "pipeline/runs/twice")
