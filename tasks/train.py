"""Stage: train HuBERT on an iteration's labels, resumable from checkpoints in the artifact store.

    iter-N/model/checkpoints/step-000200.pt   every `checkpoint_every` steps (the newest two kept)
    iter-N/model/final.pt                     weights + architecture, for the next iteration's features
    iter-N/model/train_log.json               one entry per `log_every` steps

The checkpoints are the stage's progress: a run cut off anywhere resumes from the newest one with
the same losses as an uninterrupted run. With `train.nproc > 1` or `train.nnodes > 1` the stage
runs `torchrun` (one process per GPU; gloo on CPU; tasks/torchrun.py) over `tasks.train_worker`,
which calls the same `train_rank`.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import torch
from distributed import Client
from prefect import task
from prefect.cache_policies import NONE

from infra.digest import digest_bytes
from infra.store import ArtifactStore, Stage, StageRecord, utc_now
from model.data import BatchStream, FrameGeometry, check_label_counts
from model.hubert import HUBERT_CONFIGS, build_pretrain_model, hop, prepare_waveform, receptive_field
from model.trainer import TrainerSettings, train
from tasks.audio import TARGET_SAMPLE_RATE, load_audio_16k
from tasks.config import PretrainConfig, TrainConfig
from tasks.intake import load_manifest
from tasks.labels import LABELS_STORE
from tasks.manifest import Utterance
from tasks.retry import retry_transient
from tasks.torchrun import run_multinode, run_standalone

log = logging.getLogger(__name__)

TRAIN_VERSION = 1
MODEL_DIR = "model"
CHECKPOINTS = "model/checkpoints"
FINAL = "model/final.pt"
TRAIN_LOG = "model/train_log.json"
CHECKPOINTS_KEPT = 2


class StoreUtteranceSource:
    """Training utterances: audio through the manifest, labels from `labels.zarr`."""

    def __init__(self, store: ArtifactStore, labels_relpath: str, utterances: list[Utterance]) -> None:
        self.store = store
        self.labels_relpath = labels_relpath
        self.utterances = utterances
        group = store.open_zarr(labels_relpath, mode="r")
        self.offsets = group["offsets"][:]
        self.geometry = FrameGeometry(hop=int(group.attrs["hop_samples"]), window=int(group.attrs["window_samples"]))
        self.k = int(group.attrs["k"])
        self._labels = None

    def __len__(self) -> int:
        return len(self.utterances)

    def samples(self, index: int) -> int:
        return self.utterances[index].samples_16k

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._labels is None:
            self._labels = self.store.open_zarr(self.labels_relpath, mode="r")["labels"]
        utterance = self.utterances[index]
        labels = self._labels[self.offsets[index] : self.offsets[index + 1]].astype(np.int64)
        return load_audio_16k(utterance.path, self.store.storage_options), torch.from_numpy(labels)

    def check(self) -> None:
        """Refuse utterances whose labels do not fit their audio, naming them."""
        counts = np.diff(self.offsets)
        check_label_counts(
            [(u.id, u.samples_16k, int(count)) for u, count in zip(self.utterances, counts)], self.geometry
        )


@dataclass(frozen=True)
class StoreCheckpoints:
    """Checkpoints as files in the stage's model folder, written atomically."""

    store: ArtifactStore
    folder: str

    def _steps(self) -> list[int]:
        names = self.store.list_names(self.folder)
        return sorted(int(name[5:-3]) for name in names if name.startswith("step-") and name.endswith(".pt"))

    def latest(self) -> bytes | None:
        steps = self._steps()
        if not steps:
            return None
        return self.store.read_bytes(posixpath.join(self.folder, f"step-{steps[-1]:07d}.pt"))

    def save(self, step: int, data: bytes) -> None:
        path = posixpath.join(self.folder, f"step-{step:07d}.pt")
        self.store.write_bytes(path, data)
        log.info("saved checkpoint step %d (%s)", step, self.store.url(path))
        for old in self._steps()[:-CHECKPOINTS_KEPT]:
            self.store.remove(posixpath.join(self.folder, f"step-{old:07d}.pt"))


def trainer_settings(settings: TrainConfig) -> TrainerSettings:
    return TrainerSettings(
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps or max(1, int(0.08 * settings.steps)),
        weight_decay=settings.weight_decay,
        clip_norm=settings.clip_norm,
        accumulation=settings.accumulation,
        checkpoint_every=settings.checkpoint_every,
        log_every=settings.log_every,
        unmasked_weight=settings.unmasked_weight,
        bf16=settings.bf16,
    )


def train_rank(config: PretrainConfig, iteration: int, rank: int = 0, world_size: int = 1) -> list[dict[str, float]]:
    """Train this rank's share; the same code runs alone or under torchrun."""
    settings = config.iterations[iteration - 1].train
    store = ArtifactStore(config.store, config.storage_options)
    scope = posixpath.join(config.run, f"iter-{iteration}")
    source = StoreUtteranceSource(store, posixpath.join(scope, LABELS_STORE), load_manifest(store, config.run))
    source.check()
    architecture = HUBERT_CONFIGS[settings.model]
    torch.manual_seed(settings.seed)
    model = build_pretrain_model(architecture, num_classes=source.k)
    torch.manual_seed(settings.seed * 1000 + rank + 1)
    stream = BatchStream(
        source,
        labels_geometry=source.geometry,
        model_geometry=FrameGeometry(hop=hop(architecture), window=receptive_field(architecture)),
        max_batch_samples=int(settings.max_batch_seconds * TARGET_SAMPLE_RATE),
        max_sample_size=int(settings.max_sample_seconds * TARGET_SAMPLE_RATE),
        seed=settings.seed,
        rank=rank,
        world_size=world_size,
        prepare=functools.partial(prepare_waveform, architecture),
    )
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")

    def report(entry: dict[str, float]) -> None:
        log.info(
            "train@%d step %d: loss %.4f, masked acc %.3f, lr %.2e, %.1f audio-s/s",
            iteration, entry["step"], entry["loss"], entry["masked_accuracy"], entry["learning_rate"],
            entry["audio_seconds_per_second"],
        )

    history = train(
        model, stream, trainer_settings(settings), StoreCheckpoints(store, posixpath.join(scope, CHECKPOINTS)),
        device, on_log=report, rank=rank, world_size=world_size,
    )
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(
            {"model": model.state_dict(), "architecture": settings.model, "config": architecture.model_dump(), "num_classes": source.k},
            buffer,
        )
        store.write_bytes(posixpath.join(scope, FINAL), buffer.getvalue())
        store.write_json(posixpath.join(scope, TRAIN_LOG), history)
    return history


def train_stage(config: PretrainConfig, iteration: int, store: ArtifactStore, labels: StageRecord) -> Stage:
    """The key leaves out what cannot change the weights (logging, the rendezvous port), and
    `nnodes` while it is 1, so records made before it existed stay valid."""
    settings = config.iterations[iteration - 1].train
    return Stage(
        store, config.run, f"iter-{iteration}", "train",
        version=TRAIN_VERSION,
        config=settings.model_dump(exclude={"log_every", "rdzv_port", *(["nnodes"] if settings.nnodes == 1 else [])}),
        inputs={"labels": labels.output_digest},
    )


def run_train(
    config: PretrainConfig, iteration: int, store: ArtifactStore, labels: StageRecord, client: Client | None = None
) -> StageRecord:
    """Train (or resume) iteration N's model and commit its final weights (skipped if committed).

    One process here; `nproc > 1`: torchrun on this machine; `nnodes > 1`: torchrun on that many
    of `client`'s training workers (tasks/torchrun.py).
    """
    stage = train_stage(config, iteration, store, labels)
    if (record := stage.committed()) is not None:
        log.info("train@%d: committed earlier (%d steps), skipping", iteration, record.counts["steps"])
        return record
    started_at = utc_now()
    stage.prepare([MODEL_DIR])
    settings = config.iterations[iteration - 1].train
    if settings.nnodes > 1:
        if client is None:
            raise ValueError(f"train@{iteration}: nnodes {settings.nnodes} needs the run's Dask client")
        run_multinode(config, client, iteration, stage.key)
        history = store.read_json(stage.rel(TRAIN_LOG))
    elif settings.nproc > 1:
        run_standalone(config, iteration)
        history = store.read_json(stage.rel(TRAIN_LOG))
    else:
        history = train_rank(config, iteration)
    final_digest = digest_bytes(store.read_bytes(stage.rel(FINAL)))
    last = history[-1]
    k = store.open_zarr(stage.rel(LABELS_STORE), mode="r").attrs["k"]
    record = stage.commit(
        outputs=[MODEL_DIR],
        output_digest=final_digest,
        started_at=started_at,
        counts={"steps": settings.steps, "processes": settings.nproc * settings.nnodes, "machines": settings.nnodes},
        metrics={
            "final_loss": last["loss"],
            "first_loss": history[0]["loss"],
            "masked_accuracy": last["masked_accuracy"],
            "unmasked_accuracy": last["unmasked_accuracy"],
            "chance_accuracy": 1 / k,
            "audio_seconds_per_second": last["audio_seconds_per_second"],
            "loss_curve": [[entry["step"], round(entry["loss"], 5)] for entry in history],
        },
    )
    log.info("train@%d: %d steps, loss %.3f -> %.3f", iteration, settings.steps, history[0]["loss"], last["loss"])
    return record


train_task = task(run_train, name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient, cache_policy=NONE)
