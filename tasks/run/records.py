"""Reading what a run's stages committed: their records (one reader, each record read once), the
manifest, the centroids, and what a trained model is.

Shared by the stages that consume these artifacts, and by `inspect`, `diff`, `verify` and the
report, so that no stage imports another to read its neighbour's output and records are read
one way. Readers of records written by earlier versions of the pipeline are here too.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.parquet as pq

from infra.commit import StageRecord, read_record
from infra.store import ArtifactStore
from model.presets import HUBERT_CONFIGS, HubertConfig
from tasks.corpus.manifest import Manifest, ManifestRows, conform, manifest_from_jsonl
from tasks.run.layout import (
    ITERATION_STAGES,
    STAGE_INPUTS,
    RunLayout,
    StageName,
    Weights,
    scope_iteration,
    stage_iteration,
    upstream_iteration,
)

log = logging.getLogger(__name__)


def manifest_relpath(store: ArtifactStore, manifest: str, legacy: str) -> str:
    """The manifest a folder holds: the columnar one, or (a store made before it) the JSON lines one."""
    if store.exists(manifest) or not store.exists(legacy):
        return manifest
    return legacy


def read_manifest(store: ArtifactStore, relpath: str, columns: list[str] | None = None) -> Manifest:
    """A manifest file as a columnar Manifest (only `columns`, if given): Parquet, or JSON lines."""
    if relpath.endswith(".jsonl"):
        log.info("reading %s, the JSON-lines manifest of a store made before the columnar manifest", store.url(relpath))
        table = manifest_from_jsonl(store.read_bytes(relpath))
        return Manifest(table if columns is None else table.select(columns))
    with store.fs.open(store.path(relpath), "rb") as handle:
        table = pq.read_table(handle, columns=columns)
    return Manifest(conform(table) if columns is None else table)


def load_manifest(store: ArtifactStore, layout: RunLayout, columns: list[str] | None = None) -> Manifest:
    """The utterances intake accepted, in manifest order, as columns (only `columns`, if given):
    stages take the columns they need; iterating yields Utterance records (small corpora, tests)."""
    relpath = manifest_relpath(store, layout.manifest, layout.legacy_manifest)
    return read_manifest(store, relpath, columns)


def manifest_rows(store: ArtifactStore, layout: RunLayout) -> ManifestRows:
    """The run's manifest as tasks on the workers read their rows of it."""
    relpath = manifest_relpath(store, layout.manifest, layout.legacy_manifest)
    record = read_record(store, layout.stage_folder("intake", None), "intake")
    return ManifestRows(store, relpath, record.output_digest if record is not None else store.url(relpath))


def load_centroids(store: ArtifactStore, layout: RunLayout, iteration: int) -> np.ndarray:
    """The (k, dim) float32 centroids of an iteration's k-means."""
    return read_npy(store, layout.centroids(iteration))


def read_npy(store: ArtifactStore, relpath: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(relpath)))


def trained_architecture(train: StageRecord) -> HubertConfig:
    """The architecture a train record's model has, without loading its weights.

    The record carries it (`metrics.architecture`); records from before it did name their preset.
    """
    recorded = train.metrics.get("architecture")
    if recorded is not None:
        return HubertConfig.model_validate(recorded)
    return HUBERT_CONFIGS[train.config["model"]]


def weights_digest(train: StageRecord, weights: Weights) -> str:
    """The digest of a train record's best or final weights (`metrics.weights_digests`; for
    records from before it, the final weights', which is the record's output digest)."""
    digests = train.metrics.get("weights_digests", {"final": train.output_digest})
    if weights not in digests:
        raise ValueError(
            f"the train record in {train.scope} lists no {weights} weights (it had no validation split); "
            f"it has {sorted(digests)}"
        )
    return digests[weights]


def published_digests(record: StageRecord) -> set[str]:
    """Every digest a later stage may name as its input from this record: its output digest, and a
    train record's weights (a consumer names the best or the final ones)."""
    return {record.output_digest, *record.metrics.get("weights_digests", {}).values()}



def stale_stages(records: RunRecords, stage: StageName, iteration: int | None) -> list[str]:
    """The stale records among `stage`'s and everything it was made from, each with what changed
    under it (`labels@1: centroids (kmeans@1 committed other work since)`); empty when all are current."""
    found, seen, waiting = [], set(), [(stage, stage_iteration(stage, iteration))]
    while waiting:
        name, number = waiting.pop()
        record = records.get(name, number)
        if (name, number) in seen or record is None:
            continue
        seen.add((name, number))
        if stale := records.stale_inputs(record):
            found.append(f"{name if number is None else f'{name}@{number}'}: {', '.join(stale)}")
        for input_name in record.inputs:
            if (producer := STAGE_INPUTS[name].get(input_name)) is not None:
                at = upstream_iteration(producer, number)
                if at is None or at >= 1:
                    waiting.append((producer.stage, at))
    return found


class RunRecords:
    """The committed records of one run, each read from the store at most once.

    A reader answers from what it has read; make a new one to see what was committed since."""

    def __init__(self, store: ArtifactStore, layout: RunLayout) -> None:
        self.store = store
        self.layout = layout
        self._read: dict[tuple[StageName, int | None], StageRecord | None] = {}

    def get(self, stage: StageName, iteration: int | None) -> StageRecord | None:
        """The stage's record in that iteration (intake: any iteration, or None), or None."""
        at = (stage, stage_iteration(stage, iteration))
        if at not in self._read:
            self._read[at] = read_record(self.store, self.layout.stage_folder(*at), stage)
        return self._read[at]

    def upstream(self, consumer: StageName, input_name: str, iteration: int | None) -> tuple[StageRecord | None, str]:
        """The record of the stage that produces `input_name` for `consumer` in `iteration`
        (tasks/run/layout.py `STAGE_INPUTS`), and how to name that stage (`labels@1`)."""
        producer = STAGE_INPUTS[consumer][input_name]
        at = upstream_iteration(producer, iteration)
        label = producer.stage if at is None else f"{producer.stage}@{at}"
        return (None if at is not None and at < 1 else self.get(producer.stage, at)), label

    def iteration(self, number: int, stages: tuple[StageName, ...] = ITERATION_STAGES) -> dict[StageName, StageRecord]:
        """The committed records of an iteration's stages (or of `stages`), by stage, in run order."""
        found = {stage: self.get(stage, number) for stage in stages}
        return {stage: record for stage, record in found.items() if record is not None}

    def weights_taken_next(self, iteration: int) -> list[Weights]:
        """Which of iteration `iteration`'s weights ('best', 'final', both when they are the same
        file) the next iteration's features were computed from; [] where it has none yet, or its
        features are not a layer of this model."""
        train, features = self.get("train", iteration), self.get("features", iteration + 1)
        if train is None or features is None:
            return []
        digest = features.config.get("source", {}).get("model_digest")
        digests = train.metrics.get("weights_digests", {"final": train.output_digest})
        return [which for which in ("best", "final") if digests.get(which) == digest]

    def weights_chosen_for_next(self, iteration: int) -> Weights:
        """The weights of iteration `iteration` that the next iteration takes: those its features
        were computed from, else `train.weights_for_next` as run.json recorded the config (unset:
        best with a validation split, final without)."""
        if taken := self.weights_taken_next(iteration):
            return taken[0]
        config = (self.store.read_json(self.layout.run_info) or {}).get("config", {})
        iterations = config.get("iterations", [])
        train = (iterations[iteration - 1].get("train") or {}) if 0 < iteration <= len(iterations) else {}
        if train.get("weights_for_next") is not None:
            return train["weights_for_next"]
        return "best" if (config.get("corpus") or {}).get("valid") is not None else "final"

    def iterations_in_store(self) -> list[int]:
        """The iterations the run's folder holds, in order."""
        return self.layout.iterations_in(self.store.list_names(self.layout.run))

    def is_stale(self, record: StageRecord) -> bool:
        """Whether a record's inputs no longer match what their producers committed."""
        return bool(self.stale_inputs(record))

    def stale_inputs(self, record: StageRecord) -> list[str]:
        """The inputs of a record that no longer match what their producers committed, each named
        with its producer (`centroids (kmeans@1)`)."""
        iteration = scope_iteration(record.scope)
        stale = []
        for name, digest in record.inputs.items():
            if name not in STAGE_INPUTS[record.stage]:
                continue  # from outside the run (the corpus source, alignments)
            upstream, producer = self.upstream(record.stage, name, iteration)
            if upstream is None or digest not in published_digests(upstream):
                stale.append(f"{name} ({producer}{' has no commit' if upstream is None else ' committed other work since'})")
        return stale

    def committed(self) -> list[tuple[StageName, int | None, StageRecord]]:
        """(stage, iteration, record) of every committed stage the run's folder holds, in run order."""
        candidates = [("intake", None)] + [(stage, n) for n in self.iterations_in_store() for stage in ITERATION_STAGES]
        found = [(stage, number, self.get(stage, number)) for stage, number in candidates]
        return [(stage, number, record) for stage, number, record in found if record is not None]
