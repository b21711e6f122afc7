"""Training one process's share of an iteration's model, from the artifact store.

This is what a torchrun rank runs (tasks/train_worker.py), and what the train stage runs itself
with one process: it imports no Prefect and no stage. Checkpoints are files in the iteration's
model folder; the newest two are kept.
"""

from __future__ import annotations

import functools
import io
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import torch

from infra.store import ArtifactStore
from model.data import BatchStream, check_label_counts
from model.frames import SAMPLE_RATE
from model.hubert import HUBERT_CONFIGS, build_pretrain_model, frame_geometry, prepare_waveform
from model.trainer import TrainerSettings, train
from tasks.artifacts import load_manifest, stored_geometry
from tasks.audio import load_audio_16k
from tasks.config import PretrainConfig, TrainConfig
from tasks.layout import RunLayout
from tasks.manifest import Utterance

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2


class StoreUtteranceSource:
    """Training utterances: audio through the manifest, labels from `labels.zarr`."""

    def __init__(self, store: ArtifactStore, labels_relpath: str, utterances: list[Utterance]) -> None:
        self.store = store
        self.labels_relpath = labels_relpath
        self.utterances = utterances
        group = store.open_zarr(labels_relpath, mode="r")
        self.offsets = group["offsets"][:]
        self.geometry = stored_geometry(group)
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
    layout = RunLayout(config.run)
    source = StoreUtteranceSource(store, layout.labels_store(iteration), load_manifest(store, layout))
    source.check()
    architecture = HUBERT_CONFIGS[settings.model]
    torch.manual_seed(settings.seed)
    model = build_pretrain_model(architecture, num_classes=source.k)
    torch.manual_seed(settings.seed * 1000 + rank + 1)
    stream = BatchStream(
        source,
        labels_geometry=source.geometry,
        model_geometry=frame_geometry(architecture),
        max_batch_samples=int(settings.max_batch_seconds * SAMPLE_RATE),
        max_sample_size=int(settings.max_sample_seconds * SAMPLE_RATE),
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
        model, stream, trainer_settings(settings), StoreCheckpoints(store, layout.checkpoints(iteration)),
        device, on_log=report, rank=rank, world_size=world_size,
    )
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(
            {"model": model.state_dict(), "architecture": settings.model, "config": architecture.model_dump(), "num_classes": source.k},
            buffer,
        )
        store.write_bytes(layout.final_model(iteration), buffer.getvalue())
        store.write_json(
            layout.model_architecture(iteration),
            {"preset": settings.model, "architecture": architecture.model_dump(mode="json"), "num_classes": source.k},
        )
        store.write_json(layout.train_log(iteration), history)
    return history
