"""Training one process's share of an iteration's model, from the artifact store.

This is what a torchrun rank runs (tasks/stages/train/worker.py), and what the train stage runs itself
with one process: it imports no Prefect and no stage. Checkpoints are files in the iteration's
model folder; the newest two are kept.

Training reads the manifest's training utterances only. With a validation split, every rank
validates on its share of the validation utterances (model/trainer.py) and rank 0 writes each new
lowest-loss model to the best weights' file as it is found (a resumed run replays the steps
after its checkpoint exactly, so it writes the same weights again), and the curve beside them.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from infra.lease import LeaseFence, held_fence
from infra.store import ArtifactStore
from model.data import BatchShape, BatchStream, FixedBatches, LabelCountMismatch, check_label_counts
from model.frames import SAMPLE_RATE
from model.hubert import build_pretrain_model, prepare_waveform, warm_start
from model.presets import HUBERT_CONFIGS, HubertConfig, frame_geometry
from model.trainer import TrainerSettings, Validation, load_checkpoint, masked_prediction_evaluator, train
from model.weights import save_weights
from tasks.corpus.audio import load_utterance_16k
from tasks.corpus.manifest import Manifest, ManifestRows, Utterance
from tasks.frames.sources import read_weights
from tasks.frames.store import stored_geometry
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import RunRecords, load_manifest, weights_digest
from tasks.run.sections import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2


class StoreUtteranceSource:
    """The utterances of one split: audio through the manifest, labels from `labels.zarr`.

    `utterances` is the whole manifest (the labels' offsets follow it); the source's indices count
    the utterances of `split` only ("train" is every utterance of a corpus without a split). It
    keeps the manifest's columns as arrays (lengths, which rows are in the split), and reads an
    utterance's record when it loads it (`rows`: the manifest's rows in the store; made from
    `utterances` where not given)."""

    def __init__(
        self, store: ArtifactStore, labels_relpath: str, utterances: Manifest | Sequence[Utterance],
        split: Literal["train", "valid"] = "train", rows: ManifestRows | None = None,
    ) -> None:
        self.store = store
        self.labels_relpath = labels_relpath
        manifest = Manifest.of(utterances)
        self.ids = manifest.ids()
        self.samples_16k = manifest.samples_16k()
        self.rows = np.flatnonzero(manifest.is_valid() == (split == "valid"))
        self._records = rows
        self._table = manifest.table if rows is None else None
        group = store.open_zarr(labels_relpath, mode="r")
        self.offsets = group["offsets"][:]
        self.geometry = stored_geometry(group)
        self.k = int(group.attrs["k"])
        self._labels = None

    def __len__(self) -> int:
        return len(self.rows)

    def samples(self, index: int) -> int:
        return int(self.samples_16k[self.rows[index]])

    def utterance(self, index: int) -> Utterance:
        row = int(self.rows[index])
        if self._records is not None:
            return self._records.read([row])[0]
        return Manifest(self._table.slice(row, 1))[0]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._labels is None:
            self._labels = self.store.open_zarr(self.labels_relpath, mode="r")["labels"]
        row = self.rows[index]
        labels = self._labels[self.offsets[row] : self.offsets[row + 1]].astype(np.int64)
        return load_utterance_16k(self.utterance(index), self.store.storage_options), torch.from_numpy(labels)

    def name(self, index: int) -> str:
        utterance = self.utterance(index)
        return f"{utterance.id} ({utterance.where})"

    def check(self) -> None:
        """Refuse utterances whose labels do not fit their audio, naming them (counts compared as arrays)."""
        counts = np.diff(self.offsets)
        wanted = self.geometry.num_frames(self.samples_16k)
        if len(counts) != len(wanted):
            raise LabelCountMismatch(f"the labels hold {len(counts)} utterances, the manifest {len(wanted)}")
        bad = np.flatnonzero(np.abs(counts - wanted) > 1)
        check_label_counts([(self.ids[i].as_py(), int(self.samples_16k[i]), int(counts[i])) for i in bad[:1000]], self.geometry)


CHECKPOINT_NAME = re.compile(r"step-(\d{7})\.pt")
"""A checkpoint's file name: `step-0000010.pt`. Any other name in the folder is not ours."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def checkpoint_steps(names: list[str], folder: str) -> list[int]:
    """The steps of the checkpoints among a folder's names, in order; any other name is ignored with a
    warning (a copy left by hand, `step-0000010.copy.pt`, must not stop a resume)."""
    steps = []
    for name in names:
        if (match := CHECKPOINT_NAME.fullmatch(name)) is not None:
            steps.append(int(match.group(1)))
        elif ".tmp-" not in name and (folder, name) not in _WARNED_NAMES:
            _WARNED_NAMES.add((folder, name))
            log.warning("ignoring %s in %s: not a checkpoint's name (step-NNNNNNN.pt)", name, folder)
    return sorted(steps)


_WARNED_NAMES: set[tuple[str, str]] = set()  # each stray name is warned about once per process


@dataclass(frozen=True)
class StoreCheckpoints:
    """Checkpoints as files in the stage's model folder, written atomically.

    `fence`, when given, is checked before each write: a run that lost its lease writes no more."""

    store: ArtifactStore
    folder: str
    fence: LeaseFence | None = None

    def _steps(self) -> list[int]:
        return checkpoint_steps(self.store.list_names(self.folder), self.store.url(self.folder))

    def steps(self) -> list[int]:
        """The steps of the checkpoints kept, oldest first (`inspect` shows a running training's progress from them)."""
        return self._steps()

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that reads back whole; a damaged one (cut short by a full disk, or
        altered) is skipped with a warning and the one before it is taken."""
        steps = self._steps()
        for step in reversed(steps):
            path = posixpath.join(self.folder, checkpoint_name(step))
            try:
                return load_checkpoint(self.store.read_bytes(path))
            except ValueError as error:
                log.warning("checkpoint %s is damaged (%s); trying an older one", self.store.url(path), error)
        if steps:
            log.warning("no intact checkpoint in %s: training starts from step 0", self.store.url(self.folder))
        return None

    def save(self, step: int, data: bytes) -> None:
        if self.fence is not None:
            self.fence.check()
        path = posixpath.join(self.folder, checkpoint_name(step))
        self.store.write_bytes(path, data)
        log.info("saved checkpoint step %d (%s)", step, self.store.url(path))
        for old in self._steps()[:-CHECKPOINTS_KEPT]:
            self.store.remove(posixpath.join(self.folder, checkpoint_name(old)))


class StepEta:
    """Time left in a training, from the pace of the steps since the last log line (the first
    line of an attempt counts from the attempt's start, `log_every` steps back)."""

    def __init__(self, total_steps: int, log_every: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps = total_steps
        self.log_every = log_every
        self.clock = clock
        self._last: tuple[float, int] | None = None
        self._started = clock()

    def after(self, step: int) -> str:
        now = self.clock()
        then, then_step = self._last or (self._started, max(0, step - self.log_every))
        self._last = (now, step)
        if step >= self.total_steps:
            return "done"
        if step <= then_step or now <= then:
            return "ETA unknown"
        left = (self.total_steps - step) * (now - then) / (step - then_step)
        return f"ETA {format_duration(left)}"


def format_duration(seconds: float) -> str:
    """`1h02m`, `4m05s`, `12s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def trainer_settings(settings: TrainConfig) -> TrainerSettings:
    return TrainerSettings(
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps or max(1, int(0.08 * settings.steps)),
        weight_decay=settings.weight_decay,
        clip_norm=settings.clip_norm,
        accumulation=settings.accumulation,
        checkpoint_every=settings.io.checkpoint_every,
        log_every=settings.logging.log_every,
        unmasked_weight=settings.unmasked_weight,
        bf16=settings.bf16,
    )


def initial_model(config: PretrainConfig, iteration: int, num_classes: int, store: ArtifactStore) -> torch.nn.Module:
    """The model training starts from: fresh (seeded by `train.seed`), or with `train.init: warm`
    the previous iteration's chosen weights except the label-dependent parts (model/hubert.py)."""
    settings = config.iterations[iteration - 1].train
    torch.manual_seed(settings.seed)
    model = build_pretrain_model(HUBERT_CONFIGS[settings.model], num_classes=num_classes)
    if settings.init == "warm":
        layout, which = RunLayout(config.run), config.weights_for_next(iteration - 1)
        previous = layout.weights(iteration - 1, which)
        trained = RunRecords(store, layout).get("train", iteration - 1)
        saved = read_weights(store, previous, weights_digest(trained, which))
        fresh = warm_start(model, saved.state)
        log.info("train@%d: warm start from %s; freshly initialised: %s", iteration, store.url(previous), ", ".join(fresh))
    return model


def saved_weights(model: torch.nn.Module, settings: TrainConfig, architecture: HubertConfig, num_classes: int) -> bytes:
    """The final and the best weights' file (model/weights.py; the train record says which step each is from)."""
    return save_weights(model, architecture, settings.model, num_classes)


def batch_shape(settings: TrainConfig, source: StoreUtteranceSource, architecture: HubertConfig) -> BatchShape:
    """How training and validation batches are cut: the label and model geometries, the audio per
    batch and per utterance, and the model's waveform preparation."""
    return BatchShape(
        labels_geometry=source.geometry,
        model_geometry=frame_geometry(architecture),
        max_batch_samples=int(settings.max_batch_seconds * SAMPLE_RATE),
        max_sample_size=int(settings.max_sample_seconds * SAMPLE_RATE),
        prepare=functools.partial(prepare_waveform, architecture),
    )


def validation_for(
    store: ArtifactStore, layout: RunLayout, iteration: int, utterances: Manifest | Sequence[Utterance], settings: TrainConfig,
    device: torch.device, rank: int, world_size: int, fence: LeaseFence | None = None,
) -> Validation | None:
    """Validation on the manifest's validation utterances (None without any), keeping the best weights on rank 0."""
    source = StoreUtteranceSource(store, layout.labels_store(iteration), utterances, split="valid")
    if len(source) == 0:
        return None
    source.check()
    architecture = HUBERT_CONFIGS[settings.model]
    batches = FixedBatches(
        source, batch_shape(settings, source, architecture), rank=rank, world_size=world_size, prefetch=settings.io.prefetch_batches
    )

    def keep_best(step: int, model: torch.nn.Module) -> None:
        if fence is not None:
            fence.check()
        store.write_bytes(layout.best_model(iteration), saved_weights(model, settings, architecture, source.k))

    evaluate = masked_prediction_evaluator(batches, device, trainer_settings(settings), mask_seed=settings.seed, world_size=world_size)
    return Validation(evaluate=evaluate, every=settings.logging.valid_every or settings.io.checkpoint_every, on_best=keep_best)


def train_rank(config: PretrainConfig, iteration: int, rank: int = 0, world_size: int = 1) -> list[dict[str, float]]:
    """Train this rank's share; the same code runs alone or under torchrun.

    Every write checks the run's lease first (the one this process holds, or the one torchrun's
    parent handed down): a training whose run lost its lease, or stopped renewing it, stops."""
    settings = config.iterations[iteration - 1].train
    store = ArtifactStore(config.store, config.fsspec_options)
    layout = RunLayout(config.run)
    fence = held_fence(store, layout.scope(iteration))
    utterances = load_manifest(store, layout)
    source = StoreUtteranceSource(store, layout.labels_store(iteration), utterances)
    source.check()
    architecture = HUBERT_CONFIGS[settings.model]
    model = initial_model(config, iteration, source.k, store)
    torch.manual_seed(settings.seed * 1000 + rank + 1)
    stream = BatchStream(
        source, batch_shape(settings, source, architecture), seed=settings.seed, rank=rank, world_size=world_size,
        prefetch=settings.io.prefetch_batches,
    )
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    validation = validation_for(store, layout, iteration, utterances, settings, device, rank, world_size, fence)

    eta = StepEta(settings.steps, settings.logging.log_every)

    def report(entry: dict[str, float]) -> None:
        log.info(
            "train@%d step %d/%d (%.0f%%): loss %.4f, masked acc %.3f, lr %.2e, %.1f audio-s/s, %.1f%% waiting for data, %s",
            iteration, entry["step"], settings.steps, 100 * entry["step"] / settings.steps, entry["loss"],
            entry["masked_accuracy"], entry["learning_rate"], entry["audio_seconds_per_second"],
            100 * entry["data_wait_share"], eta.after(int(entry["step"])),
        )

    history = train(
        model, stream, trainer_settings(settings), StoreCheckpoints(store, layout.checkpoints(iteration), fence),
        device, on_log=report, rank=rank, world_size=world_size, validation=validation,
    )
    if rank == 0:
        if fence is not None:
            fence.check()
        store.write_bytes(layout.final_model(iteration), saved_weights(model, settings, architecture, source.k))
        store.write_json(
            layout.model_architecture(iteration),
            {"preset": settings.model, "architecture": architecture.model_dump(mode="json"), "num_classes": source.k},
        )
        store.write_json(layout.train_log(iteration), history)
        if validation is not None:
            store.write_json(layout.valid_log(iteration), validation.curve)
    return history
