"""Trust boundaries: nothing executable is loaded from the store, architectures are bounded before a
model is built, repairs keep what is intact, the exports refuse what they would spoil, and a
stopped run leaves no training and no credential behind."""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from flows.cli import main
from infra.digest import digest_bytes
from infra.store import ArtifactStore
from model.presets import HUBERT_CONFIGS, HubertConfig
from model.trainer import load_checkpoint
from model.weights import load_weights
from tasks.frames.sources import read_weights
from tasks.products.bundle import BUNDLE, BundleError, check_state_dict
from tasks.run.layout import CHECKPOINTS, FINAL_MODEL
from tasks.run.records import RunRecords
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES
from tasks.stages.train.rank import StoreCheckpoints, checkpoint_name
from tests.support import CLI, CommittedRun, cli_env, planted_pickle, run_cli, with_settings


def test_a_planted_pickle_runs_no_code_in_any_reader(tmp_path: Path) -> None:
    """The planted file runs code when unpickled as torch.load did by default (so the test can fail);
    every reader of weights, checkpoints and bundle encoders refuses it, naming what it is not."""
    marker = tmp_path / "marker"
    planted = planted_pickle(marker)
    torch.load(io.BytesIO(planted), weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match="not a weights file this pipeline wrote .*UnpicklingError"):
        load_weights(planted)
    with pytest.raises(ValueError, match="not a readable checkpoint .*UnpicklingError"):
        load_checkpoint(planted)
    with pytest.raises(BundleError, match="torchaudio_encoder.pt is not a state dict of tensors"):
        check_state_dict(planted, "bundle/torchaudio_encoder.pt")
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_bytes(f"ckpt/{checkpoint_name(3)}", planted)
    assert StoreCheckpoints(store, "ckpt").latest() is None  # skipped as damaged, with a warning
    store.write_bytes("w.pt", planted)
    with pytest.raises(ValueError, match="not a weights file"):
        read_weights(store, "w.pt", digest_bytes(planted))  # a record rewritten to match does not help
    assert not marker.exists()


def test_an_architecture_is_bounded_before_any_model_is_built() -> None:
    tiny = HUBERT_CONFIGS["tiny"].model_dump()
    with pytest.raises(ValidationError, match="encoder_num_layers"):
        HubertConfig.model_validate({**tiny, "encoder_num_layers": 1_000_000})
    with pytest.raises(ValidationError, match="conv layers need"):
        HubertConfig.model_validate({**tiny, "extractor_conv_layer_config": [[2**30, 10, 5]]})
    hostile = {**tiny, "encoder_embed_dim": 8192, "encoder_num_heads": 16, "encoder_pos_conv_groups": 16,
               "encoder_num_layers": 256, "encoder_ff_interm_features": 65536}
    with pytest.raises(ValidationError, match="parameters exceeds"):  # each size within bounds, the whole not
        HubertConfig.model_validate(hostile)
    HubertConfig.model_validate(HUBERT_CONFIGS["xlarge"].model_dump())


@pytest.mark.slow
def test_planted_pickles_in_every_weights_and_checkpoint_file_run_no_code(
    copied_run: CommittedRun, tmp_path: Path, client, demo_corpus: Path
) -> None:
    """An attacker who can write the store plants a pickle in final.pt, best.pt, the checkpoints and a
    bundle's torchaudio_encoder.pt, and rewrites the records' digests to match: the next iteration's
    features, the layer profile, a warm start, a resume, export and units all refuse, and no code runs
    (on the flow's process, the Dask workers or the CLI)."""
    config, store, layout = copied_run.config, copied_run.store, copied_run.layout
    run_path = store.url(layout.run)
    bundle = tmp_path / "bundle"
    run_cli(tmp_path, "export", run_path, "--iteration", "1", "--out", str(bundle))  # a clean one, planted below
    marker = tmp_path / "marker"
    planted = planted_pickle(marker)
    for relpath in (layout.final_model(1), layout.best_model(1), *checkpoints_of(store, layout.checkpoints(2))):
        store.write_bytes(relpath, planted)
    train_record = store.read_json(posixpath.join(layout.scope(1), "train.commit.json"))
    train_record["output_digest"] = digest_bytes(planted)
    train_record["metrics"]["weights_digests"] = {"final": digest_bytes(planted), "best": digest_bytes(planted)}
    store.write_json(posixpath.join(layout.scope(1), "train.commit.json"), train_record)
    (bundle / BUNDLE.torchaudio_encoder).write_bytes(planted)
    manifest = json.loads((bundle / BUNDLE.manifest).read_text())
    manifest["torchaudio_encoder"]["digest"] = digest_bytes(planted)
    (bundle / BUNDLE.manifest).write_text(json.dumps(manifest))

    for stage, iteration in (("features", 2), ("profile", 1)):  # read on the Dask workers
        with pytest.raises(Exception, match="not a weights file this pipeline wrote"):
            run_stage(STAGES[stage], StageContext(config, store, client, iteration))
    warm = with_settings(config, 2, train={"init": "warm"})
    with pytest.raises(ValueError, match="not a weights file this pipeline wrote"):
        run_stage(STAGES["train"], StageContext(warm, store, client, 2))
    store.remove(posixpath.join(layout.scope(2), "train.commit.json"))  # train@2 must run: it resumes from its checkpoints
    store.remove(layout.final_model(2))
    resumed = run_stage(STAGES["train"], StageContext(config, store, client, 2))  # planted ones skipped: from step 0
    assert resumed.metrics["final_step"] == 6
    for weights in ("final", "best"):
        refused = run_cli(tmp_path, "export", run_path, "--iteration", "1", "--weights", weights, "--out",
                          str(tmp_path / f"out-{weights}"), check=False)
        assert refused.returncode == 2 and "not a weights file this pipeline wrote" in refused.stderr, refused.stderr[-2000:]
    units = run_cli(tmp_path, "units", str(bundle), str(demo_corpus / "wav"), "--out", str(tmp_path / "units"), check=False)
    assert units.returncode == 2 and "torchaudio_encoder.pt is not a state dict of tensors" in units.stderr, units.stderr[-2000:]
    assert not marker.exists()


def checkpoints_of(store: ArtifactStore, folder: str) -> list[str]:
    names = [name for name in store.list_names(folder) if name.startswith("step-")]
    assert names, f"no checkpoints in {folder}"
    return [posixpath.join(folder, name) for name in names]


@pytest.mark.slow
def test_a_truncated_final_pt_is_repaired_from_the_newest_intact_checkpoint(
    copied_run: CommittedRun, client, caplog: pytest.LogCaptureFixture
) -> None:
    """final.pt and the newest checkpoint cut short (a full disk), a stray copy beside the checkpoints:
    the run's presence check sees the damage despite the added file, training resumes from the intact
    checkpoint at step 3 (not step 0), and gives the same final weights, so nothing after it reruns."""
    config, store, layout = copied_run.config, copied_run.store, copied_run.layout
    before = RunRecords(store, layout).get("train", 1)
    folder = layout.scope(1)
    steps = sorted(int(name[5:12]) for name in store.list_names(layout.checkpoints(1)))
    assert steps == [3, 6]
    for relpath in (layout.final_model(1), layout.path(1, posixpath.join(CHECKPOINTS, checkpoint_name(6)))):
        data = store.read_bytes(relpath)
        store.write_bytes(relpath, data[: len(data) // 2])
    store.write_bytes(layout.path(1, posixpath.join(CHECKPOINTS, "step-0000010.copy.pt")), b"a copy made by hand")

    with caplog.at_level(logging.INFO):
        after = run_stage(STAGES["train"], StageContext(config, store, client, 1))
    log = "\n".join(caplog.messages)
    assert "train: committed, but its outputs changed since: model: model/checkpoints/step-0000006.pt holds" in log
    assert f"{FINAL_MODEL}, model/checkpoints/step-0000006.pt changed since the commit; resuming from the newest intact checkpoint (step 3)" in log
    assert "ignoring step-0000010.copy.pt" in log and "resuming training at step 3" in log
    assert after.output_digest == before.output_digest and after.key == before.key
    assert after.metrics["loss_curve"] == before.metrics["loss_curve"]
    step_3 = posixpath.join(CHECKPOINTS, checkpoint_name(3))  # kept as it was; step 6's log holds new timings
    assert after.metrics["checkpoint_digests"][step_3] == before.metrics["checkpoint_digests"][step_3]
    assert digest_bytes(store.read_bytes(posixpath.join(folder, FINAL_MODEL))) == before.output_digest
    assert run_stage(STAGES["features"], StageContext(config, store, client, 2)) == RunRecords(store, layout).get("features", 2)


def test_stale_labels_and_a_full_folder_are_refused_unless_asked(copied_run: CommittedRun, tmp_path: Path, capsys) -> None:
    store, layout = copied_run.store, copied_run.layout
    run_path = store.url(layout.run)
    kmeans = posixpath.join(layout.scope(1), "kmeans.commit.json")
    record = store.read_json(kmeans)
    store.write_json(kmeans, {**record, "output_digest": "0" * 64})  # as if k-means ran again with another k
    assert main(["export-labels", run_path, "--iteration", "1", "--out", str(tmp_path / "km")]) == 2
    assert "labels of iteration 1 are stale: labels@1: centroids (kmeans@1 committed other work since)" in capsys.readouterr().err
    assert not (tmp_path / "km").exists()
    assert main(["export-labels", run_path, "--iteration", "1", "--out", str(tmp_path / "km"), "--allow-stale"]) == 0

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine\n")
    assert main(["export", run_path, "--iteration", "2", "--out", str(full)]) == 2
    assert f"{full} is not empty (notes.txt): give an empty or new folder, or --overwrite" in capsys.readouterr().err
    assert sorted(path.name for path in full.iterdir()) == ["notes.txt"]
    assert main(["export", run_path, "--iteration", "2", "--out", str(full), "--overwrite"]) == 0
    assert (full / "notes.txt").read_text() == "mine\n" and (full / BUNDLE.manifest).exists()


def processes_tagged(tag: str) -> dict[int, str]:
    """The processes whose environment holds `tag` (a test's own, inherited by all it starts), by pid, with their command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if tag.encode() not in handle.read():
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def files_holding(secret: str, *folders: Path, top_level: tuple[Path, ...] = ()) -> list[Path]:
    """Files under `folders` (and directly in `top_level`) whose bytes hold `secret`."""
    candidates = [path for folder in folders for path in folder.rglob("*")]
    candidates += [path for folder in top_level for path in folder.iterdir()]
    found = []
    for path in candidates:
        try:
            if path.is_file() and path.stat().st_size < 64 << 20 and secret.encode() in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_run_stopped_during_torchrun_training_leaves_no_training_and_no_secret(
    tmp_path: Path, demo_corpus: Path, stop: signal.Signals
) -> None:
    """`run` is signalled (alone, not its process group) while two torchrun ranks train: with SIGKILL
    nothing of the training survives it; with SIGTERM the run, its temporary Prefect server included,
    ends within 30 s with a non-zero exit and leaves no process behind. The storage options (a
    credential) reached the ranks through their environment, and no file anywhere holds them."""
    secret, tag = uuid.uuid4().hex, uuid.uuid4().hex
    store = tmp_path / "store"
    config = tmp_path / "run.yaml"
    config.write_text(f"""run: t
store: {store}
storage_options: {{secret: "{secret}"}}
corpus: {{source: {demo_corpus / "wav"}}}
dask: {{n_workers: 1}}
iterations:
  - features: {{kind: mfcc, chunk_frames: 4096}}
    kmeans: {{k: 8}}
    train: {{model: tiny, steps: 1000, max_batch_seconds: 2, max_sample_seconds: 1, io: {{checkpoint_every: 2}}, launch: {{nproc: 2}}}}
""")
    env = {**cli_env(tmp_path, temporary_server=stop == signal.SIGTERM), "HUBERT_TEST_TAG": tag}
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*CLI, "run", str(config)], env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        checkpoint = store / "t" / "iter-1" / "model" / "checkpoints" / "step-0000002.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        training = {pid: line for pid, line in processes_tagged(tag).items() if "tasks.stages.train" in line}
        ranks = [pid for pid, line in training.items() if "guarded_torchrun" not in line]
        assert len(ranks) == 2 and len(training) == 3, training  # torchrun and its two ranks
        assert secret.encode() in Path(f"/proc/{ranks[0]}/environ").read_bytes()
        process.send_signal(stop)
        signalled = time.monotonic()
        status = process.wait(timeout=60)
        ended = time.monotonic() - signalled
        deadline = time.monotonic() + 15
        while (left := processes_tagged(tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
    if stop == signal.SIGKILL:
        assert status == -signal.SIGKILL
        assert not [line for line in left.values() if "tasks.stages.train" in line], left
    else:
        assert status == 128 + signal.SIGTERM and ended < 30, (status, ended, log.read_text()[-3000:])
        assert "run stopped by SIGTERM" in log.read_text()
        assert left == {}, left
    prefect_servers = tuple(Path(tempfile.gettempdir()).glob("prefect-server-*"))
    holding = files_holding(secret, tmp_path, *prefect_servers, top_level=(Path(tempfile.gettempdir()),))
    assert holding == [config]  # the config as the user wrote it, and nothing the run wrote
