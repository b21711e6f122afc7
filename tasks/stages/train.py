"""Stage: train HuBERT on an iteration's labels, resumable from checkpoints in the artifact store.

Its folder (tasks/layout.py) holds checkpoints every `checkpoint_every` steps (the newest two
kept), the final weights with their architecture for the next iteration's features, the
architecture alone, and the training log (one entry per `log_every` steps). With a validation
split it also holds the best weights (the lowest validation loss; the same format as the final
ones) and the validation curve; the record gives both weights' digests and steps, and the next
iteration takes the ones `train.weights_for_next` chooses (its output digest stays the final
weights').

The checkpoints are the stage's progress: a run cut off anywhere resumes from the newest one with
the same losses as an uninterrupted run. With `train.nproc > 1` or `train.nnodes > 1` the stage
runs `torchrun` (one process per GPU; gloo on CPU; tasks/torchrun.py) over `tasks.train_worker`,
which calls the same `train_rank` (tasks/training.py).
"""

from __future__ import annotations

import logging
from typing import Any

from infra.commit import Stage, StageRecord, read_record
from infra.digest import digest_bytes
from infra.store import ArtifactStore
from model.presets import HUBERT_CONFIGS
from tasks.artifacts import load_manifest, weights_digest
from tasks.config import LayerProfileConfig
from tasks.feature_sources import HubertLayerSource
from tasks.layer_profile import layer_profile
from tasks.layout import BEST_MODEL, FINAL_MODEL, LABELS_STORE, MODEL_DIR, TRAIN_LOG, VALID_LOG
from tasks.splits import split_inputs
from tasks.stage import CommittedStage, StageContext, StageResult, StageSpec
from tasks.torchrun import run_multinode, run_standalone
from tasks.training import train_rank
from tasks.verdict import enforce_quality_gate, iteration_verdict

log = logging.getLogger(__name__)


def train_key_config(context: StageContext) -> dict[str, Any]:
    """The key leaves out what cannot change the weights (logging, validation, the rendezvous port,
    which weights the next iteration takes, how far data is read ahead), and `nnodes` while it is 1
    and `init` while it is cold, so records made before they existed stay valid."""
    settings = context.settings.train
    defaults = {"nnodes": 1, "init": "cold", "profile": LayerProfileConfig()}
    at_default = [name for name, default in defaults.items() if getattr(settings, name) == default]
    return settings.model_dump(exclude={"log_every", "valid_every", "weights_for_next", "rdzv_port", "prefetch_batches", *at_default})


def check_quality_gate(context: StageContext) -> None:
    """With `quality_gate`, refuse to train on labels whose PNMI gain over the last iteration's falls short."""
    gate = context.config.quality_gate
    if gate is None or context.iteration == 1:
        return
    labels = context.upstream("train", "labels")
    previous = read_record(context.store, context.layout.scope(context.iteration - 1), "labels")
    enforce_quality_gate(iteration_verdict(context.iteration, labels, previous), gate.min_pnmi_gain)


def train_key_inputs(context: StageContext) -> dict[str, str]:
    """The labels; the manifest with a validation split; with a warm start, the weights it starts from."""
    inputs = {"labels": context.upstream("train", "labels").output_digest, **split_inputs(context, "train")}
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
    of the cluster's training workers (tasks/torchrun.py).
    """
    config, store, iteration = context.config, context.store, context.iteration
    settings = context.settings.train
    if settings.nnodes > 1:
        if context.client is None:
            raise ValueError(f"train@{iteration}: nnodes {settings.nnodes} needs the run's Dask client")
        run_multinode(config, context.client, iteration, stage.key)
        history = store.read_json(stage.rel(TRAIN_LOG))
    elif settings.nproc > 1:
        run_standalone(config, iteration)
        history = store.read_json(stage.rel(TRAIN_LOG))
    else:
        history = train_rank(config, iteration)
    last = history[-1]
    k = store.open_zarr(stage.rel(LABELS_STORE), mode="r").attrs["k"]
    architecture = HUBERT_CONFIGS[settings.model]
    validation = validation_metrics(store, stage)
    digests = {"final": final_model_digest(store, stage.rel(FINAL_MODEL))}
    if validation:
        digests["best"] = digest_bytes(store.read_bytes(stage.rel(BEST_MODEL)))
    profile = None
    if settings.profile.enabled:
        profiled = "best" if "best" in digests and config.weights_for_next(iteration) == "best" else "final"
        relpath = stage.rel(BEST_MODEL if profiled == "best" else FINAL_MODEL)
        layers = [
            HubertLayerSource(store, relpath, digests[profiled], layer, architecture)
            for layer in range(1, architecture.encoder_num_layers + 1)
        ]
        profile = {
            "weights": profiled,
            **layer_profile(
                context.client, layers, load_manifest(store, context.layout), settings.profile,
                config.corpus.alignments, store.storage_options,
            ),
        }
    return StageResult(
        output_digest=digests["final"],
        counts={"steps": settings.steps, "processes": settings.nproc * settings.nnodes, "machines": settings.nnodes},
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
            **validation,
            **({} if profile is None else {"layer_profile": profile}),
        },
    )


def final_model_digest(store: ArtifactStore, relpath: str) -> str:
    return digest_bytes(store.read_bytes(relpath))


def verify_train(committed: CommittedStage) -> str:
    """The final weights' digest, as the stage took it."""
    return final_model_digest(committed.store, committed.rel(FINAL_MODEL))


def train_summary(record: StageRecord) -> str:
    metrics = record.metrics
    summary = f"{record.counts['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f}"
    if "best_step" in metrics:
        summary += f", best valid loss {metrics['best_valid_loss']:.3f} at step {metrics['best_step']}"
    profile = metrics.get("layer_profile")
    if profile and profile["best_layer"] is not None:
        best = next(row for row in profile["layers"] if row["layer"] == profile["best_layer"])
        summary += f", best layer {profile['best_layer']} (PNMI {best['pnmi']:.3f} at k={profile['k']})"
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
    check=check_quality_gate,
    retries=1,
)
