"""Stage: train HuBERT on an iteration's labels, resumable from checkpoints in the artifact store.

Its folder (tasks/run/layout.py) holds checkpoints every `io.checkpoint_every` steps (the newest
two kept), the final weights with their architecture for the next iteration's features, the
architecture alone, and the training log (one entry per `logging.log_every` steps). With a validation
split it also holds the best weights (the lowest validation loss; the same format as the final
ones) and the validation curve; the record gives both weights' digests and steps, and the next
iteration takes the ones `train.weights_for_next` chooses (its output digest stays the final
weights').

The checkpoints are the stage's progress: a run cut off anywhere resumes from the newest one with
the same losses as an uninterrupted run. With `train.launch.nproc > 1` or `nnodes > 1` the stage
runs `torchrun` (one process per GPU; gloo on CPU; launcher.py) over worker.py, which calls the
same `train_rank` (rank.py) this module calls with one process.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from infra.commit import Stage, StageRecord
from infra.digest import digest_bytes
from infra.store import ArtifactStore
from model.presets import HUBERT_CONFIGS
from tasks.run.keys import key_settings
from tasks.run.layout import BEST_MODEL, CHECKPOINTS, FINAL_MODEL, MODEL_DIR, TRAIN_LOG, VALID_LOG
from tasks.run.records import weights_digest
from tasks.run.stage import CommittedStage, StageContext, StageResult, StageSpec
from tasks.stages.train.launcher import run_multinode, run_standalone
from tasks.stages.train.rank import checkpoint_name, checkpoint_steps, train_rank

log = logging.getLogger(__name__)


def train_key_config(context: StageContext) -> dict[str, Any]:
    """The recipe: what the settings' own marks keep (tasks/run/keys.py), and the world size where
    it is over 1 (more processes, more audio a step)."""
    settings = context.settings.train
    world = settings.launch.world_size
    return {**key_settings(settings), **({"processes": world} if world > 1 else {})}


def train_key_inputs(context: StageContext) -> dict[str, str]:
    """The labels; the manifest with a validation split; with a warm start, the weights it starts from."""
    inputs = {"labels": context.upstream("train", "labels").output_digest, **context.split_inputs("train")}
    if context.settings.train.init == "warm":
        previous = context.iteration - 1
        inputs["init"] = weights_digest(context.upstream("train", "init"), context.config.weights_for_next(previous))
    return inputs


def validation_metrics(store: ArtifactStore, stage: Stage) -> dict[str, Any]:
    """The validation curve and its best step, from the curve training wrote; empty without validation."""
    curve = store.read_json(stage.rel(VALID_LOG))
    if not curve:
        return {}
    best = min(curve, key=lambda entry: entry["valid_loss"])
    return {
        "best_step": best["step"],
        "best_valid_loss": best["valid_loss"],
        "best_valid_masked_accuracy": best["valid_masked_accuracy"],
        "valid_curve": [[e["step"], round(e["valid_loss"], 5), round(e["valid_masked_accuracy"], 5)] for e in curve],
    }


def train_model(context: StageContext, stage: Stage) -> StageResult:
    """Train (or resume) the iteration's model and write its final weights.

    One process here; `nproc > 1`: torchrun on this machine; `nnodes > 1`: torchrun on that many
    of the cluster's training workers (tasks/stages/train/launcher.py).
    """
    config, store, iteration = context.config, context.store, context.iteration
    settings = context.settings.train
    launch = settings.launch
    if launch.nnodes > 1:
        if context.client is None:
            raise ValueError(f"train@{iteration}: nnodes {launch.nnodes} needs the run's Dask client")
        run_multinode(config, context.client, iteration, stage.key)
        history = store.read_json(stage.rel(TRAIN_LOG))
    elif launch.nproc > 1:
        run_standalone(config, iteration)
        history = store.read_json(stage.rel(TRAIN_LOG))
    else:
        history = train_rank(config, iteration)
    last = history[-1]
    k = context.upstream("train", "labels").counts["k"]
    architecture = HUBERT_CONFIGS[settings.model]
    validation = validation_metrics(store, stage)
    digests = {"final": final_model_digest(store, stage.rel(FINAL_MODEL))}
    if validation:
        digests["best"] = digest_bytes(store.read_bytes(stage.rel(BEST_MODEL)))
    checkpoints = {
        posixpath.join(CHECKPOINTS, checkpoint_name(step)): digest_bytes(store.read_bytes(stage.rel(CHECKPOINTS, checkpoint_name(step))))
        for step in checkpoint_steps(store.list_names(stage.rel(CHECKPOINTS)), store.url(stage.rel(CHECKPOINTS)))
    }
    return StageResult(
        output_digest=digests["final"],
        counts={"steps": settings.steps, "processes": launch.world_size, "machines": launch.nnodes},
        metrics={
            "final_loss": last["loss"],
            "first_loss": history[0]["loss"],
            "masked_accuracy": last["masked_accuracy"],
            "unmasked_accuracy": last["unmasked_accuracy"],
            "chance_accuracy": 1 / k,
            "audio_seconds_per_second": last["audio_seconds_per_second"],
            "data_wait_share": last.get("data_wait_share"),  # None: a log resumed from before it was measured
            "loss_curve": [[entry["step"], round(entry["loss"], 5)] for entry in history],
            "architecture": architecture.model_dump(mode="json"),
            "final_step": settings.steps,
            "weights_digests": digests,
            "checkpoint_digests": checkpoints,
            **validation,
        },
    )


def final_model_digest(store: ArtifactStore, relpath: str) -> str:
    return digest_bytes(store.read_bytes(relpath))


def verify_train(committed: CommittedStage) -> str:
    """The final weights' digest, as the stage took it."""
    return final_model_digest(committed.store, committed.rel(FINAL_MODEL))


def train_recorded_files(record: StageRecord) -> dict[str, str]:
    """The files of a committed training whose digests its record gives: the final and best
    weights, and the checkpoints it kept (records from before that name the final weights only)."""
    weights = record.metrics.get("weights_digests", {"final": record.output_digest})
    files = {FINAL_MODEL: weights["final"], **({BEST_MODEL: weights["best"]} if "best" in weights else {})}
    return {**files, **record.metrics.get("checkpoint_digests", {})}


def repair_train(context: StageContext, stage: Stage, record: StageRecord) -> None:
    """A committed training whose files changed since: remove the damaged ones, keep the intact
    checkpoints, and let training resume from the newest of them (not from step 0).

    The best weights are written only when a validation pass finds them: where they are damaged,
    the checkpoints from their step on go too, so that training replays that pass and writes them
    again (the same weights: resume is exact)."""
    store, label = context.store, f"train@{context.iteration}"
    damaged = [name for name, digest in train_recorded_files(record).items() if not _intact(store, stage.rel(name), digest)]
    for name in damaged:
        store.remove(stage.rel(name))
    steps = checkpoint_steps(store.list_names(stage.rel(CHECKPOINTS)), store.url(stage.rel(CHECKPOINTS)))
    if BEST_MODEL in damaged and (best_step := record.metrics.get("best_step")) is not None:
        for step in [step for step in steps if step >= best_step]:
            store.remove(stage.rel(CHECKPOINTS, checkpoint_name(step)))
        steps = [step for step in steps if step < best_step]
    what = ", ".join(damaged) or "its outputs' listing"
    if steps:
        log.warning("%s: %s changed since the commit; resuming from the newest intact checkpoint (step %d)", label, what, steps[-1])
    else:
        log.warning("%s: %s changed since the commit and no intact checkpoint is left: training again from step 0", label, what)


def _intact(store: ArtifactStore, relpath: str, digest: str) -> bool:
    return store.exists(relpath) and digest_bytes(store.read_bytes(relpath)) == digest


def train_summary(record: StageRecord) -> str:
    metrics = record.metrics
    summary = f"{record.counts['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}"
    if "best_step" in metrics:
        summary += f", best valid loss {metrics['best_valid_loss']:.3f} at step {metrics['best_step']}"
    return summary


TRAIN = StageSpec(
    name="train",
    version=1,
    outputs=(MODEL_DIR,),
    key_config=train_key_config,
    key_inputs=train_key_inputs,
    work=train_model,
    summary=train_summary,
    verify_digest=verify_train,
    keep_previous=lambda context: context.settings.train.io.keep_previous,
    recorded_files=train_recorded_files,
    repair=repair_train,
    retries=1,
)
