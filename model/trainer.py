"""The HuBERT training loop: AdamW, warm-up then linear decay, clipping, accumulation, DDP, resume.

Plain torch. Checkpoints go through a `CheckpointStore` the caller provides (the train stage puts
them in the artifact store). A checkpoint holds everything the next step depends on: model,
optimizer, scheduler, the batch stream's position, every RNG state and the log so far, so a run
stopped after step N and resumed produces the same losses as one that never stopped.

The stream reads batches ahead on its own threads (model/data.py); each log entry says what share
of the interval's time the loop still waited for them (`data_wait_share`).

One process per device: under `torchrun`, each rank takes its share of every global batch and DDP
averages the gradients; only rank 0 writes checkpoints.

Validation (optional, `Validation`): every `every` steps and at the last, the model is evaluated
on held-out batches in eval mode without gradients, with masks drawn from a fixed seed so the
numbers compare across steps. The pass saves and restores every RNG state around itself, so a run
with validation trains exactly as one without; its curve is kept in the checkpoints, so it
survives a resume, and rank 0 hands each new lowest-loss model to `on_best`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.data import Batch, BatchStream
from model.hubert import hubert_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSettings:
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    clip_norm: float
    accumulation: int
    checkpoint_every: int
    log_every: int
    unmasked_weight: float
    bf16: bool = True


class CheckpointStore(Protocol):
    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that reads back whole (`load_checkpoint`), or None before the first."""
        ...

    def save(self, step: int, data: bytes) -> None:
        """Keep a checkpoint; must be atomic (a reader never sees a partial one)."""
        ...


Evaluate = Callable[[torch.nn.Module], dict[str, float]]
"""model -> {"valid_loss", "valid_masked_accuracy"}; called on every rank with the same weights."""


@dataclass
class Validation:
    """What `train` validates with; `curve` is filled as it goes ({"step", "valid_loss",
    "valid_masked_accuracy"} per pass, restored from the checkpoint on resume)."""

    evaluate: Evaluate
    every: int
    on_best: Callable[[int, torch.nn.Module], None] | None = None  # rank 0: a new lowest validation loss
    curve: list[dict[str, float]] = field(default_factory=list)

    def best(self) -> dict[str, float] | None:
        """The pass with the lowest validation loss (the earliest among equals)."""
        return min(self.curve, key=lambda entry: entry["valid_loss"], default=None)


def masked_prediction_evaluator(
    batches: Iterable[Batch], device: torch.device, settings: TrainerSettings, mask_seed: int, world_size: int = 1
) -> Evaluate:
    """Loss (as trained: per masked frame, with the feature penalty) and masked accuracy over
    `batches` (this rank's share), summed over ranks. Masks come from `mask_seed`: the same frames
    are masked on every pass. The caller restores the RNG states it changes."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        torch.manual_seed(mask_seed)
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for batch in batches:
                loss, metrics = forward_loss(model, batch, device, settings)
                masked = metrics["masked_frames"]
                sums += torch.tensor([float(loss) * masked, metrics["masked_accuracy"] * masked, masked], dtype=torch.float64)
        if world_size > 1:  # on the device: NCCL reduces CUDA tensors only
            on_device = sums.to(device)
            dist.all_reduce(on_device)
            sums = on_device.cpu()
        model.train(was_training)
        loss_sum, correct, masked = sums.tolist()
        return {"valid_loss": loss_sum / max(masked, 1), "valid_masked_accuracy": correct / max(masked, 1)}

    return evaluate


def warmup_then_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up to 1, then linear decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step - warmup_steps) / max(total_steps - warmup_steps, 1))

    return factor


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class _Interval:
    """Sums over the steps of one log interval, reduced across ranks when it is written."""

    def __init__(self) -> None:
        self.values = torch.zeros(7, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, loss: float, metrics: dict[str, float], audio_seconds: float, waited: float) -> None:
        """One micro-batch; `waited`: seconds the loop spent waiting for it."""
        masked, unmasked = metrics["masked_frames"], metrics["unmasked_frames"]
        self.values += torch.tensor(
            [
                loss * masked,
                metrics["masked_accuracy"] * masked,
                metrics["unmasked_accuracy"] * unmasked,
                masked,
                unmasked,
                audio_seconds,
                waited,
            ],
            dtype=torch.float64,
        )

    def summary(self, step: int, learning_rate: float, world_size: int) -> dict[str, float]:
        values = self.values.clone()
        if world_size > 1:
            dist.all_reduce(values)
        loss, masked_correct, unmasked_correct, masked, unmasked, audio, waited = values.tolist()
        seconds = time.perf_counter() - self.started
        return {
            "step": step,
            "loss": loss / max(masked, 1),
            "masked_accuracy": masked_correct / max(masked, 1),
            "unmasked_accuracy": unmasked_correct / max(unmasked, 1),
            "learning_rate": learning_rate,
            "audio_seconds_per_second": audio / seconds if seconds > 0 else 0.0,
            "data_wait_share": waited / (seconds * world_size) if seconds > 0 else 0.0,
        }


def bf16_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (when `enabled`); on a CPU nothing: the step runs in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_loss(model: torch.nn.Module, batch: Batch, device: torch.device, settings: TrainerSettings):
    """One micro-batch's loss and metrics, as a training step computes them (bf16 autocast on a GPU)."""
    with bf16_autocast(device, settings.bf16):
        logit_m, logit_u, feature_penalty = model(
            batch.waveforms.to(device), batch.labels.to(device), batch.lengths.to(device)
        )
    return hubert_loss(logit_m.float(), None if logit_u is None else logit_u.float(), feature_penalty.float(),
                       unmasked_weight=settings.unmasked_weight)


def train(
    model: torch.nn.Module,
    stream: BatchStream,
    settings: TrainerSettings,
    checkpoints: CheckpointStore,
    device: torch.device,
    on_log: Callable[[dict[str, float]], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    validation: Validation | None = None,
) -> list[dict[str, float]]:
    """Train until `settings.steps`, resuming from the latest checkpoint; returns the whole log
    (and fills `validation.curve`)."""
    model.to(device)
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), eps=1e-6, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(settings.warmup_steps, settings.steps)
    )
    step, history = 0, []
    if (state := checkpoints.latest()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.restore(state["stream"])
        _restore_rng_states(state["rng"][rank])
        step, history = state["step"], state["log"]
        if validation is not None:
            validation.curve[:] = state.get("valid_log", [])
        log.info("resuming training at step %d", step)

    with contextlib.closing(iter(stream)) as batches:  # closing stops the stream's loader threads
        interval = _Interval()
        wrapped.train()
        while step < settings.steps:
            _accumulate_gradients(wrapped, batches, settings, device, step, world_size, interval)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % settings.log_every == 0 or step == settings.steps:
                entry = interval.summary(step, scheduler.get_last_lr()[0], world_size)
                history.append(entry)
                if on_log is not None and rank == 0:
                    on_log(entry)
                interval = _Interval()
            if validation is not None and (step % validation.every == 0 or step == settings.steps):
                _validate(model, validation, step, rank)
                wrapped.train()
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                curve = None if validation is None else validation.curve
                _checkpoint(model, optimizer, scheduler, stream, step, history, curve, checkpoints, rank, world_size)
    return history


def _accumulate_gradients(
    wrapped: torch.nn.Module, batches: Iterator[Batch], settings: TrainerSettings, device: torch.device, step: int,
    world_size: int, interval: _Interval,
) -> None:
    """Forward and backward of one step's micro-batches (DDP syncs on the last), timing the waits for data."""
    for micro in range(settings.accumulation):
        asked = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - asked
        last = micro == settings.accumulation - 1
        sync = contextlib.nullcontext() if last or world_size == 1 else wrapped.no_sync()
        with sync:
            loss, metrics = forward_loss(wrapped, batch, device, settings)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step + 1}; the last checkpoint is intact")
            (loss / settings.accumulation).backward()
        interval.add(float(loss.detach()), metrics, batch.audio_seconds, waited)


def _validate(model: torch.nn.Module, validation: Validation, step: int, rank: int) -> None:
    """One validation pass, leaving every RNG state as it found it; a new best goes to `on_best`."""
    best = validation.best()
    states = _rng_states()
    try:
        entry = {"step": step, **validation.evaluate(model)}
    finally:
        _restore_rng_states(states)
    validation.curve.append(entry)
    log.info("validation at step %d: loss %.4f, masked acc %.3f", step, entry["valid_loss"], entry["valid_masked_accuracy"])
    if validation.on_best is not None and rank == 0 and (best is None or entry["valid_loss"] < best["valid_loss"]):
        validation.on_best(step, model)


CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "stream", "rng", "step", "log"})


def load_checkpoint(data: bytes) -> dict[str, Any]:
    """A checkpoint's contents, read with torch's restricted unpickler (`weights_only=True`).

    Everything a checkpoint holds is tensors and plain data (the optimizer's and LambdaLR's state
    dicts, the stream's position, torch RNG states as byte tensors, the log), so no class needs
    allowing: a file planted in the store cannot run code where it is read. ValueError when the
    bytes are not a whole checkpoint (cut short, or not one this pipeline wrote)."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error of any kind means the same
        raise ValueError(f"not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(state, dict):
        raise ValueError(f"not a checkpoint this pipeline wrote (it holds a {type(state).__name__}, not a dict)")
    if missing := CHECKPOINT_KEYS - set(state):
        raise ValueError(f"not a checkpoint this pipeline wrote (it lacks {', '.join(sorted(missing))})")
    return state


def _checkpoint(model, optimizer, scheduler, stream, step, history, curve, checkpoints, rank, world_size) -> None:
    """Rank 0 writes one checkpoint holding every rank's RNG states (masking differs per rank)."""
    rng_states: list[Any] = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng_states, _rng_states())
    else:
        rng_states[0] = _rng_states()
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "stream": stream.state(),
                "rng": rng_states,
                "step": step,
                "log": history,
                **({} if curve is None else {"valid_log": curve}),
            },
            buffer,
        )
        checkpoints.save(step, buffer.getvalue())
    if world_size > 1:
        dist.barrier()
