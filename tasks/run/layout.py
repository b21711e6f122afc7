"""The run's layout: every path under `<store>/<run>/`, the stage order, and what each stage reads.

    <run>/run.json                                config as given, code version, when, who
    <run>/lease.json                              the run's one writer and its fencing generation (infra/lease.py)
    <run>/corpus/manifest.parquet, intake_report.json, intake_report.parquet  + intake.commit.json
                                                  (stores made before: manifest.jsonl, intake_report.json)
    <run>/iter-N/features.zarr                    + features.commit.json
    <run>/iter-N/kmeans/centroids.npy, report.json     + kmeans.commit.json
    <run>/iter-N/labels.zarr                      + labels.commit.json
    <run>/iter-N/model/checkpoints/, final.pt, best.pt, architecture.json, train_log.json, valid_log.json
                                                  + train.commit.json
    <run>/iter-N/reference.json                   + reference.commit.json
    <run>/iter-N/profile.json                     + profile.commit.json
    <run>/iter-N/probe.json                       + probe.commit.json
    <run>/iter-N/report.json, report.md, plots/
    <run>/logs/<UTC time>-<flow run id or pid>.log  the log of one invocation (tasks/run/run_log.py)

Stages, `inspect`, `diff`, the report and the exports ask this module for paths; nothing else
spells one. Paths are relative to the store root (see infra/store.py); a stage's outputs are
named relative to its folder, as its record lists them.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Weights = Literal["best", "final"]
"""Which checkpoint of a train stage: its final weights, or its best by validation loss."""

StageName = Literal["intake", "features", "kmeans", "labels", "reference", "train", "profile", "probe"]
STAGE_ORDER: tuple[StageName, ...] = ("intake", "features", "kmeans", "labels", "reference", "train", "profile", "probe")
ITERATION_STAGES: tuple[StageName, ...] = STAGE_ORDER[1:]

CORPUS_SCOPE = "corpus"
ITERATION_PREFIX = "iter-"

# Outputs, relative to their stage's folder.
MANIFEST = "manifest.parquet"
LEGACY_MANIFEST = "manifest.jsonl"
"""The manifest of stores made before the columnar one: JSON lines, read into the same table."""
INTAKE_REPORT = "intake_report.json"
INTAKE_REJECTIONS = "intake_report.parquet"
"""Every file intake rejected, with its reason (the JSON report lists the first thousand)."""
FEATURES_STORE = "features.zarr"
KMEANS_DIR = "kmeans"
CENTROIDS = "kmeans/centroids.npy"
FIT_REPORT = "kmeans/report.json"
LABELS_STORE = "labels.zarr"
MODEL_DIR = "model"
CHECKPOINTS = "model/checkpoints"
FINAL_MODEL = "model/final.pt"
BEST_MODEL = "model/best.pt"
VALID_LOG = "model/valid_log.json"
MODEL_ARCHITECTURE = "model/architecture.json"
TRAIN_LOG = "model/train_log.json"
LAYER_PROFILE = "profile.json"
REFERENCE = "reference.json"
PROBE = "probe.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "plots"
LOGS = "logs"
LOG_SUFFIX = ".log"




@dataclass(frozen=True)
class Upstream:
    """The stage whose output digest an input names: in the corpus scope, or `back` iterations earlier."""

    stage: StageName
    back: int | None  # None: the corpus scope; 0: the same iteration; 1: the one before


STAGE_INPUTS: dict[StageName, dict[str, Upstream]] = {
    "intake": {},
    "features": {"manifest": Upstream("intake", None), "model": Upstream("train", 1), "profile": Upstream("profile", 1)},
    "kmeans": {"features": Upstream("features", 0), "manifest": Upstream("intake", None)},
    "labels": {
        "features": Upstream("features", 0),
        "centroids": Upstream("kmeans", 0),
        "previous_labels": Upstream("labels", 1),
        "manifest": Upstream("intake", None),
    },
    "reference": {"features": Upstream("features", 1), "labels": Upstream("labels", 0), "manifest": Upstream("intake", None)},
    "train": {"labels": Upstream("labels", 0), "manifest": Upstream("intake", None), "init": Upstream("train", 1)},
    "profile": {"model": Upstream("train", 0), "manifest": Upstream("intake", None)},
    "probe": {"model": Upstream("train", 0), "manifest": Upstream("intake", None)},
}
"""Each stage's inputs, by the names its record's `inputs` use. A stage may also take inputs from
outside the run (the corpus source, alignments), which are not listed here. Some are taken only
when a setting asks for them: `manifest` after intake only with a validation split (it says which
utterances are held out), `init` only for a warm start, a features `profile` only with `layer:
auto`, and a `model` or `init` names the weights the train record lists under
`metrics.weights_digests` that the config chose."""


def scope_name(iteration: int | None) -> str:
    """'corpus' (None) or 'iter-N'."""
    return CORPUS_SCOPE if iteration is None else f"{ITERATION_PREFIX}{iteration}"


def scope_iteration(scope: str) -> int | None:
    """The iteration of a scope name ('iter-2' -> 2), None for the corpus scope."""
    return None if scope == CORPUS_SCOPE else int(scope.removeprefix(ITERATION_PREFIX))


def stage_iteration(stage: StageName, iteration: int | None) -> int | None:
    """The iteration a stage runs in: intake runs once per run, in the corpus scope."""
    return None if stage == "intake" else iteration


def upstream_iteration(upstream: Upstream, iteration: int | None) -> int | None:
    """The iteration of an input's producer, for a consumer in `iteration` (None: no such iteration)."""
    if upstream.back is None:
        return None
    return iteration - upstream.back if iteration is not None else None


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run lives, relative to the store root."""

    run: str

    def scope(self, iteration: int | None = None) -> str:
        """The folder of the corpus scope (None) or of an iteration."""
        return posixpath.join(self.run, scope_name(iteration))

    def stage_folder(self, stage: StageName, iteration: int | None) -> str:
        return self.scope(stage_iteration(stage, iteration))

    def path(self, iteration: int | None, relative: str) -> str:
        """A path inside the corpus scope (None) or an iteration's folder."""
        return posixpath.join(self.scope(iteration), relative)

    @property
    def run_info(self) -> str:
        return posixpath.join(self.run, "run.json")

    @property
    def lease(self) -> str:
        return posixpath.join(self.run, "lease.json")

    @property
    def logs(self) -> str:
        """The folder of the run's logs, one file per invocation."""
        return posixpath.join(self.run, LOGS)

    def log(self, started_at: datetime, invocation: str) -> str:
        """The log of the invocation that started at `started_at` (UTC), named by its Prefect flow
        run id (or its pid): the names sort by time, and two invocations never share a file."""
        return posixpath.join(self.logs, f"{started_at:%Y%m%dT%H%M%SZ}-{invocation}{LOG_SUFFIX}")

    @staticmethod
    def is_log(name: str) -> bool:
        return name.endswith(LOG_SUFFIX)

    @property
    def manifest(self) -> str:
        return self.path(None, MANIFEST)

    @property
    def legacy_manifest(self) -> str:
        return self.path(None, LEGACY_MANIFEST)

    @property
    def intake_report(self) -> str:
        return self.path(None, INTAKE_REPORT)

    def features_store(self, iteration: int) -> str:
        return self.path(iteration, FEATURES_STORE)

    def centroids(self, iteration: int) -> str:
        return self.path(iteration, CENTROIDS)

    def fit_report(self, iteration: int) -> str:
        return self.path(iteration, FIT_REPORT)

    def labels_store(self, iteration: int) -> str:
        return self.path(iteration, LABELS_STORE)

    def checkpoints(self, iteration: int) -> str:
        return self.path(iteration, CHECKPOINTS)

    def final_model(self, iteration: int) -> str:
        return self.path(iteration, FINAL_MODEL)

    def best_model(self, iteration: int) -> str:
        """The weights with the lowest validation loss (only with a validation split)."""
        return self.path(iteration, BEST_MODEL)

    def weights(self, iteration: int, which: Weights) -> str:
        """best.pt or final.pt of an iteration's model."""
        return self.best_model(iteration) if which == "best" else self.final_model(iteration)

    def valid_log(self, iteration: int) -> str:
        return self.path(iteration, VALID_LOG)

    def model_architecture(self, iteration: int) -> str:
        return self.path(iteration, MODEL_ARCHITECTURE)

    def train_log(self, iteration: int) -> str:
        return self.path(iteration, TRAIN_LOG)

    def layer_profile(self, iteration: int) -> str:
        return self.path(iteration, LAYER_PROFILE)

    def report_json(self, iteration: int) -> str:
        return self.path(iteration, REPORT_JSON)

    def report_md(self, iteration: int) -> str:
        return self.path(iteration, REPORT_MD)

    def plot(self, iteration: int, name: str) -> str:
        """`plots/<name>.png` in an iteration's folder, relative to the store root."""
        return self.path(iteration, self.plot_in_report(name))

    @staticmethod
    def plot_in_report(name: str) -> str:
        """The same plot relative to the iteration's folder, as report.md links it."""
        return posixpath.join(PLOTS, f"{name}.png")

    def iterations_in(self, names: list[str]) -> list[int]:
        """The iterations among the names of the run folder's entries, in order."""
        found = [name for name in names if name.startswith(ITERATION_PREFIX) and name[len(ITERATION_PREFIX):].isdigit()]
        return sorted(int(name[len(ITERATION_PREFIX):]) for name in found)
