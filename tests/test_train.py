"""Training on the demo corpus's labels: learning, exact resume, torchrun, layer features back."""

from __future__ import annotations

import posixpath
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from infra.digest import digest_bytes
from infra.store import ArtifactStore
from model.data import BatchShape, BatchStream, LabelCountMismatch, UtteranceLoadError, check_label_counts, map_labels
from model.frames import FrameGeometry
from model.hubert import build_pretrain_model
from model.phone_probes import seeded_order
from model.presets import HUBERT_CONFIGS, hop, receptive_field
from model.trainer import train
from model.weights import save_weights
from tasks.frames.sources import HubertLayerSource, layer_source
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest
from tasks.run.sections import ProbeConfig
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES
from tasks.stages.probe import ProbeSet, measure_probes
from tasks.stages.profile import layer_profile
from tasks.stages.train.rank import StoreCheckpoints, StoreUtteranceSource, trainer_settings
from tests.support import run_chain, with_settings

TINY = HUBERT_CONFIGS["tiny"]


def labelled_config(tmp_path: Path, corpus: Path, name: str = "runs", **train: object) -> PretrainConfig:
    # The demo's recipe (unmasked frames weighted too), short: enough to learn and to beat untrained layers.
    settings = {"model": "tiny", "steps": 150, "learning_rate": 1e-3, "unmasked_weight": 1.0, "max_batch_seconds": 8,
                "max_sample_seconds": 4, "io": {"checkpoint_every": 150}, "logging": {"log_every": 50}, **train}
    profile = {"utterances": 40, "k": 50}
    return PretrainConfig.model_validate(
        {
            "run": "t",
            "store": str(tmp_path / name),
            "corpus": {"source": str(corpus / "wav"), "alignments": str(corpus / "align")},
            "iterations": [
                {"features": {"kind": "mfcc"}, "kmeans": {"k": 50}, "train": settings, "profile": profile},
                {"features": {"kind": "hubert", "layer": 2}, "kmeans": {"k": 8}, "train": settings, "profile": profile},
            ],
        }
    )


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory: pytest.TempPathFactory, demo_corpus: Path, client):
    """Iteration 1 of the demo corpus up to labels (MFCC at 100 Hz, k=50)."""
    tmp_path = tmp_path_factory.mktemp("train")
    chain = run_chain(labelled_config(tmp_path, demo_corpus), client, "labels")
    return chain.config, chain.store, chain.records["labels"]


def run(stage: str, config: PretrainConfig, store: ArtifactStore, iteration: int, client=None):
    return run_stage(STAGES[stage], StageContext(config, store, client, iteration))


def untrained_copy(config: PretrainConfig, store: ArtifactStore, run: str) -> PretrainConfig:
    """The config for a copy of the module's run named `run`, up to labels@1 and without any trained
    model: a test that trains there leaves the module's model alone."""
    store.fs.copy(store.path(config.run), store.path(run), recursive=True)
    for trained in ("train.commit.json", "model"):
        if store.exists(f"{run}/iter-1/{trained}"):
            store.remove(f"{run}/iter-1/{trained}")
    return config.model_copy(update={"run": run})


def stream_for(store: ArtifactStore, seed: int = 0, prefetch: int = 2, utterances=None) -> tuple[BatchStream, StoreUtteranceSource]:
    source = StoreUtteranceSource(store, "t/iter-1/labels.zarr", utterances or load_manifest(store, RunLayout("t")))
    shape = BatchShape(source.geometry, FrameGeometry(hop(TINY), receptive_field(TINY)), 6 * 16000, 3 * 16000)
    return BatchStream(source, shape, seed=seed, prefetch=prefetch), source


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, num_classes=50)
    torch.manual_seed(1)
    return model


def loader_threads_left() -> list[str]:
    """The stream's loader threads still running once those that were stopped have finished their piece."""
    threads = [thread for thread in threading.enumerate() if thread.name.startswith("batch-loader")]
    for thread in threads:
        thread.join(timeout=30)
    return [thread.name for thread in threads if thread.is_alive()]


def test_100hz_labels_land_on_50hz_frames_and_misfits_are_named() -> None:
    mfcc, model = FrameGeometry(hop=160, window=400), FrameGeometry(hop=320, window=400)
    labels = torch.arange(99)  # 16,000 samples -> 98 MFCC frames (+1 tolerated), 49 model frames
    assert map_labels(labels, mfcc, model, 49).tolist() == list(range(0, 98, 2))
    assert map_labels(labels[:49], model, model, 49).tolist() == list(range(49))
    check_label_counts([("ok", 16000, 98), ("one-off", 16000, 97)], mfcc)
    with pytest.raises(LabelCountMismatch, match="bad: 90 labels"):
        check_label_counts([("ok", 16000, 98), ("bad", 16000, 90)], mfcc)


def test_batches_hold_at_most_the_configured_audio_and_cover_the_corpus(labelled_store) -> None:
    _, store, _ = labelled_store
    stream, source = stream_for(store)
    batches = stream.buckets.epoch(0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(source)))
    for batch in batches:
        assert max(stream.buckets.lengths[i] for i in batch) * len(batch) <= 6 * 16000
    assert stream.buckets.epoch(0) == batches and stream.buckets.epoch(1) != batches


def test_prefetched_batches_equal_batches_read_in_the_step_across_epochs(labelled_store) -> None:
    _, store, _ = labelled_store
    read_in_step, prefetched = stream_for(store, prefetch=0)[0], stream_for(store, prefetch=3)[0]
    per_epoch = len(read_in_step.buckets.epoch(0))
    for _, one, other in zip(range(per_epoch + 3), read_in_step, prefetched):
        assert read_in_step.state() == prefetched.state()  # the batches handed out, not those read ahead
        for field in ("waveforms", "lengths", "labels"):
            assert torch.equal(getattr(one, field), getattr(other, field)), field
    assert prefetched.state() == {"epoch": 1, "position": 3}


def test_a_resumed_run_gives_the_uninterrupted_loss_curve(labelled_store, tmp_path: Path) -> None:
    """Prefetching (2 batches ahead when interrupted, 3 when resumed) trains exactly as reading in the step."""
    _, store, _ = labelled_store
    settings = trainer_settings(labelled_config(tmp_path, Path("."), steps=8, io={"checkpoint_every": 4}, logging={"log_every": 1}).iterations[0].train)

    straight_model = fresh_model()
    straight = train(straight_model, stream_for(store, prefetch=0)[0], settings, StoreCheckpoints(store, "ckpt-a"),
                     torch.device("cpu"))

    def crash_after_step_6(entry: dict) -> None:
        if entry["step"] == 6:
            raise KeyboardInterrupt("simulated stop after step 6")

    checkpoints = StoreCheckpoints(store, "ckpt-b")
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), stream_for(store)[0], settings, checkpoints, torch.device("cpu"), on_log=crash_after_step_6)
    torch.manual_seed(12345)  # a resumed process starts from whatever RNG state: the checkpoint restores it
    resumed_model = fresh_model()
    resumed = train(resumed_model, stream_for(store, prefetch=3)[0], settings, checkpoints, torch.device("cpu"))
    assert [entry["step"] for entry in resumed] == list(range(1, 9))
    np.testing.assert_allclose([e["loss"] for e in resumed], [e["loss"] for e in straight], rtol=1e-5)
    np.testing.assert_allclose([e["masked_accuracy"] for e in resumed], [e["masked_accuracy"] for e in straight], rtol=1e-5)
    straight_weights, resumed_weights = straight_model.state_dict(), resumed_model.state_dict()
    for name, weight in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert all(0 <= entry["data_wait_share"] < 1 for entry in resumed)
    assert loader_threads_left() == []


def test_an_utterance_that_fails_to_load_in_the_background_is_named(labelled_store, tmp_path: Path) -> None:
    _, store, _ = labelled_store
    utterances = list(load_manifest(store, RunLayout("t")))  # records, one of them changed below
    stream, source = stream_for(store)
    second_batch = stream.buckets.epoch(0)[1]
    broken = utterances[source.rows[second_batch[0]]]
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(200))
    utterances[source.rows[second_batch[0]]] = broken.model_copy(update={"path": str(tmp_path / "broken.wav")})
    settings = trainer_settings(labelled_config(tmp_path, Path("."), steps=4, io={"checkpoint_every": 4}, logging={"log_every": 1}).iterations[0].train)
    steps_done = []
    with pytest.raises(UtteranceLoadError, match=re.escape(f"{broken.id} ({tmp_path / 'broken.wav'}): AudioError: unreadable")):
        train(fresh_model(), stream_for(store, utterances=utterances)[0], settings, StoreCheckpoints(store, "ckpt-broken"),
              torch.device("cpu"), on_log=lambda entry: steps_done.append(entry["step"]))
    assert steps_done == [1]  # raised when its batch was due, after the first step had trained
    assert loader_threads_left() == []


def test_tiny_learns_its_layers_beat_untrained_ones_and_feed_the_next_iteration(labelled_store, client) -> None:
    config, store, labels = labelled_store
    record = run("train", config, store, 1, client)
    metrics = record.metrics
    assert metrics["final_loss"] < metrics["first_loss"]
    assert metrics["masked_accuracy"] > 2 * metrics["chance_accuracy"]
    assert store.exists("t/iter-1/model/final.pt") and len(store.list_names("t/iter-1/model/checkpoints")) <= 2
    assert run("train", config, store, 1, client) == record
    assert 0 <= metrics["data_wait_share"] < 1
    reading_in_the_step = with_settings(config, 1, train={"io": {"prefetch_batches": 0}})
    assert run("train", reading_in_the_step, store, 1, client) == record  # not in the key

    # The layers must have learnt something: the best layer's PNMI clearly above the same
    # architecture's untrained, measured on the same sample against the same MFCC reference.
    untrained_weights = RunLayout("t").path(1, "untrained.pt")
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, num_classes=50)
    weights = save_weights(model, TINY, "tiny", num_classes=50)
    store.write_bytes(untrained_weights, weights)
    untrained = layer_profile(
        client, [HubertLayerSource(store, untrained_weights, digest_bytes(weights), layer, TINY) for layer in range(1, 7)],
        load_manifest(store, RunLayout("t")), config.iterations[0].profile, config.corpus.alignments, {},
    )
    trained = run("profile", config, store, 1, client).metrics
    best = {name: max(row["pnmi"] for row in profile["layers"]) for name, profile in (("trained", trained), ("untrained", untrained))}
    assert trained["mfcc"]["pnmi"] == pytest.approx(untrained["mfcc"]["pnmi"])
    assert best["trained"] > best["untrained"] + 0.05, best

    utterances = load_manifest(store, RunLayout("t"))
    source = layer_source(store, RunLayout("t"), 1, record, layer=2)
    assert (source.geometry.frame_rate, source.dim) == (50.0, TINY.encoder_embed_dim)
    features = run("features", config, store, 2, client)
    assert features.config["source"] == source.describe()
    group = store.open_zarr("t/iter-2/features.zarr", "r")
    offsets = group["offsets"][:]
    assert [offsets[i + 1] - offsets[i] for i in range(3)] == [1 + (u.samples_16k - 400) // 320 for u in utterances[:3]]
    assert np.isfinite(group["features"][: offsets[3]]).all()
    run("kmeans", config, store, 2, client)
    labels_2 = run("labels", config, store, 2, client)
    assert labels_2.metrics["label_rate"] == 50.0 and labels_2.metrics["quality"]["pnmi"] > 0


def test_the_demo_recipes_model_gets_a_lower_phone_error_rate_than_the_same_model_untrained(labelled_store, client) -> None:
    """Downstream: the probe (tasks/stages/probe.py) gets a lower PER from the layers of a model
    trained on the demo's recipe (tiny-fbank, configs/demo.yaml's optimiser settings, briefly) than
    from the same architecture's untrained layers, on utterances the probe did not train on."""
    config, store, _ = labelled_store
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())["iterations"][0]["train"]
    assert recipe["model"] == "tiny-fbank"
    demo = with_settings(config, 1, train={**recipe, "steps": 150, "io": {"checkpoint_every": 150}})
    demo = untrained_copy(demo, store, "fbank")
    record = run("train", demo, store, 1, client)
    preset = HUBERT_CONFIGS["tiny-fbank"]
    untrained_weights = RunLayout("fbank").path(1, "untrained.pt")
    torch.manual_seed(0)
    weights = save_weights(build_pretrain_model(preset, num_classes=50), preset, "tiny-fbank", num_classes=50)
    store.write_bytes(untrained_weights, weights)

    manifest = load_manifest(store, RunLayout("fbank"))
    ranked = [manifest[i] for i in seeded_order([u.id for u in manifest], 0, "test")]  # speakers on both sides
    cut = 3 * len(ranked) // 4
    chosen = ProbeSet(tuple(ranked[:cut]), tuple(ranked[cut:]), config.corpus.alignments, {})
    settings = ProbeConfig(steps=600)

    def layers(path: str, digest: str) -> list[HubertLayerSource]:
        return [HubertLayerSource(store, path, digest, layer, preset) for layer in range(1, preset.encoder_num_layers + 1)]

    probed = measure_probes(layers(RunLayout("fbank").final_model(1), record.metrics["weights_digests"]["final"]), chosen, settings)
    unprobed = measure_probes(layers(untrained_weights, digest_bytes(weights)), chosen, settings, mfcc=probed["mfcc"])
    assert probed["model"]["per"] < unprobed["model"]["per"], (probed, unprobed)


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_trains_and_checkpoints_once(labelled_store, tmp_path: Path, capfd) -> None:
    config, store, labels = labelled_store
    config = with_settings(
        config, 1, train={"launch": {"nproc": 2}, "steps": 4, "io": {"checkpoint_every": 2}, "logging": {"log_every": 2}},
        profile={"enabled": False},
    )
    config = untrained_copy(config, store, "ddp")
    record = run("train", config, store, 1)
    output = capfd.readouterr()
    saves = [line for line in (output.out + output.err).splitlines() if "saved checkpoint" in line]
    assert len(saves) == 2, saves  # steps 2 and 4, by rank 0 only
    assert record.counts["processes"] == 2 and store.exists(posixpath.join("ddp", "iter-1", "model", "final.pt"))


def test_training_progress_says_how_far_and_how_long_is_left() -> None:
    from tasks.stages.train import rank

    # A clock of its own: patching time.monotonic would also stop the Dask client's event loop in this process.
    clock = iter([100.0, 130.0, 160.0, 200.0])  # started; step 50 after 30 s; step 100 after 30 s more; step 200
    eta = rank.StepEta(total_steps=200, log_every=50, clock=lambda: next(clock))
    assert eta.after(50) == "ETA 1m30s"  # 150 steps left at 0.6 s a step
    assert eta.after(100) == "ETA 1m00s"
    assert eta.after(200) == "done"
    assert rank.format_duration(3725) == "1h02m" and rank.format_duration(12) == "12s"
