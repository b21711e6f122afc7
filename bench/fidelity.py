"""The fidelity frontier: per training budget, does the model's best layer beat MFCC, by the pipeline's own measures?

    nice -n 19 .venv/bin/python bench/fidelity.py [--minutes 10] [--corpus-seed 0] [--recipes NAME ...]
        [--probe-steps 2000] [--profile-utterances 100] [--workers 2] [--out bench-out] [--json PATH]

What it measures. For each budget (a named training recipe of `RECIPES`), one real two-iteration
run of the pipeline on the synthesized demo corpus (devtools/demo_corpus.py: phone alignments
known, a tenth held out as the validation split), walked with `run_plan` (tasks/stages/catalog.py)
exactly as `hubert-pipeline run --until reference@2` walks it:

  iteration 1   MFCC, k-means k=100, labels, train (the recipe), then, automatically,
                profile@1  every layer of the trained model (the weights the next iteration takes)
                           and MFCC clustered at k=100 on the same seeded sample: PNMI per layer
                probe@1    CTC phone error rate (PER) of a linear head over the frozen model's
                           softmax-weighted layers, and of MFCC through the same probe, on
                           held-out validation utterances; frame phone accuracy per layer
  iteration 2   features = iteration 1's best layer (`layer: auto`), k-means k=500, labels, and
                reference@2  iteration 1's MFCC clustered at k=500 on the same frames: both
                             label sets' PNMI. Iteration 2 trains nothing (no train section).

Then it reads the records (tasks/run/records.py) and prints one row per budget: the training's
wall minutes (the train@1 record's seconds, all attempts) and CPU minutes (this process's CPU
time, every thread and any reaped child, across the `run_plan` call that only trains: the record
holds no CPU time, and training runs here, in this process, with one launch process), the best
layer, its PNMI at k=100 against MFCC's (profile@1), the PNMI at k=500 of the labels clustered
from that layer against MFCC's at k=500 (reference@2), PER against MFCC's (probe@1), and whether
the model beats MFCC by each. The MFCC columns are measured again in every run (same corpus,
same seeds, same frames); they should be equal down the table, and a line says so or not.

All runs share one temporary store (removed at the end) and one Dask LocalCluster. Intake and
iteration 1's features, k-means and labels are the same for every budget but live under each
run's own name, so they are computed again per budget (seconds on the demo corpus).

How long, measured alone on this 2-core machine (nice 19, OMP_NUM_THREADS=1): the default full run

    nice -n 19 env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fidelity.py --json bench-out/frontier.json

took 45 minutes. Everything but training costs about 4 minutes per budget on the 10-minute corpus
(intake to labels@1 2 s, profile@1 11-14 s, probe@1 3.3-3.6 min at 2000 CTC steps on 9 minutes of
audio, iteration 2 20 s, and 30 s more for the two other k-means seeds): 20 minutes for the five.
Training costs about 0.14 s a step for tiny-fbank and 0.24-0.28 s for tiny (its conv stack),
validation and checkpoints included: 3200 conv steps 13 minutes, 2800 fbank steps 6.6. A machine
shared with other work takes up to half as long again. The smoke run (`--minutes 3 --recipes smoke
--probe-steps 200 --profile-utterances 30`) takes about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distributed import Client

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.commit import StageRecord
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout, StageName
from tasks.run.plan import StopPoint, plan
from tasks.run.records import RunRecords
from tasks.run.sections import LayerProfileConfig, ProbeConfig
from tasks.run.stage import record_seconds
from tasks.stages.catalog import run_plan
from tasks.stages.profile import best_layer_row

log = logging.getLogger("bench.fidelity")

SHARED_RECIPE: dict[str, Any] = {
    "learning_rate": 1e-3, "unmasked_weight": 1.0, "max_batch_seconds": 8, "max_sample_seconds": 4,
    "io": {"checkpoint_every": 200}, "logging": {"log_every": 50},
}
"""The demo's training recipe (configs/demo.yaml's iteration 1 but for its model and steps), which
every budget starts from: with a validation split, validation every 200 steps (and at the last)
picks the best weights, which profile, probe and iteration 2 then read."""

RECIPES: dict[str, dict[str, Any]] = {
    "conv-800": {"model": "tiny", "steps": 800},
    "conv-2400": {"model": "tiny", "steps": 2400, "learning_rate": 2e-3},
    "fbank-400": {"model": "tiny-fbank", "steps": 400},
    "fbank-800": {"model": "tiny-fbank", "steps": 800},
    "fbank-1600": {"model": "tiny-fbank", "steps": 1600},
    "smoke": {"model": "tiny-fbank", "steps": 60},
    "smoke-conv": {"model": "tiny", "steps": 60},
}
"""Training budgets by name: what each changes in `SHARED_RECIPE`. fbank-1600 is configs/demo.yaml's
iteration 1; conv-800 is the same length with the learned conv front end (the demo before). `tiny` keeps its preset's
feature_grad_mult 0.1 (no config setting changes it). The smoke ones check that the bench runs
(and time a step of each front end); they measure nothing worth reading."""

DEFAULT_RECIPES = ("conv-800", "conv-2400", "fbank-400", "fbank-800", "fbank-1600")
FIRST_K, SECOND_K = 100, 500
LAST_STAGE = "reference@2"


def recipe(name: str) -> dict[str, Any]:
    """The train section of a named budget."""
    return {**SHARED_RECIPE, **RECIPES[name]}


def frontier_config(run: str, store: str, corpus: Path, train: dict[str, Any], probe_steps: int, profile_utterances: int) -> PretrainConfig:
    """The two-iteration config of one budget: MFCC at k=100 trained with `train`, profiled and
    probed; then its best layer at k=500 with its equal-k MFCC reference, and no training."""
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": store,
            "corpus": {"source": str(corpus / "manifest.jsonl"), "alignments": str(corpus / "align"), "valid": 0.1},
            "iterations": [
                {
                    "features": {"kind": "mfcc"},
                    "kmeans": {"k": FIRST_K},
                    "train": train,
                    "profile": {"utterances": profile_utterances, "k": FIRST_K},
                    "probe": {"steps": probe_steps},
                },
                {"features": {"kind": "hubert", "layer": "auto"}, "kmeans": {"k": SECOND_K}},
            ],
        }
    )


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children that have ended."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def with_second_kmeans_seed(config: PretrainConfig, seed: int) -> PretrainConfig:
    """The config with iteration 2's k-means (its labels and the MFCC reference alike) from another seed."""
    data = config.model_dump()
    data["iterations"][1]["kmeans"]["seed"] = seed
    return PretrainConfig.model_validate(data)


def equal_k_changes(config: PretrainConfig, store: ArtifactStore, client: Client, seeds: list[int]) -> list[float]:
    """reference@2's PNMI gain at k=500 (the layer's labels minus MFCC's) with k-means from each
    seed: what one k-means fit's luck moves it by. Only kmeans@2, labels@2 and reference@2 rerun."""
    changes = []
    for seed in seeds:
        seeded = with_second_kmeans_seed(config, seed)
        run_plan(seeded, store, client, LAST_STAGE)
        measured = committed(RunRecords(store, RunLayout(config.run)), "reference", 2).metrics
        changes.append(measured["labels"]["pnmi"] - measured["reference"]["pnmi"])
    return changes


def run_budget(config: PretrainConfig, store: ArtifactStore, client: Client) -> float:
    """Run the config's plan up to reference@2, as `--until labels@1`, `--until train@1` and
    `--until reference@2` would one after another (each skips what is committed); the CPU
    seconds of the call that trains."""
    run_plan(config, store, client, "labels@1")
    before = cpu_seconds()
    run_plan(config, store, client, "train@1")
    training_cpu = cpu_seconds() - before
    run_plan(config, store, client, LAST_STAGE)
    return training_cpu


@dataclass(frozen=True)
class FrontierRow:
    """One budget's measures, from its run's records (MFCC's alongside, measured in the same run)."""

    recipe: str
    model: str
    steps: int
    learning_rate: float
    train_wall_minutes: float
    train_cpu_minutes: float
    best_layer: int
    layer_used: int  # the layer features@2 clustered: the same as best_layer, or the records disagree
    pnmi_100: float
    mfcc_pnmi_100: float
    pnmi_500: float
    mfcc_pnmi_500: float
    per: float
    mfcc_per: float
    frame_accuracy: float  # the best layer's frame phone accuracy on the probe's held-out utterances
    mfcc_frame_accuracy: float
    best_valid_step: int | None
    stage_seconds: dict[str, float]
    other_seed_changes: tuple[float, ...] = ()  # the k=500 gain over MFCC with iteration 2's k-means from other seeds

    @property
    def changes_500(self) -> tuple[float, ...]:
        return (self.pnmi_500 - self.mfcc_pnmi_500, *self.other_seed_changes)

    @property
    def beats(self) -> dict[str, bool]:
        """Whether the model beats MFCC by each measure (PNMI higher, PER lower)."""
        return {
            "pnmi_100": self.pnmi_100 > self.mfcc_pnmi_100,
            "pnmi_500": min(self.changes_500) > 0,  # with every k-means seed measured
            "per": self.per < self.mfcc_per,
        }


def committed(records: RunRecords, stage: StageName, iteration: int | None) -> StageRecord:
    """The stage's record; an error naming it where the run committed none."""
    record = records.get(stage, iteration)
    if record is None:
        raise RuntimeError(f"{records.layout.run}: {stage}@{iteration} has no committed record")
    return record


def stage_seconds(config: PretrainConfig, records: RunRecords) -> dict[str, float]:
    """How long each stage of the run's plan worked, by `stage@iteration`: what the duration estimate scales."""
    return {
        stage if iteration is None else f"{stage}@{iteration}": round(record_seconds(committed(records, stage, iteration)), 1)
        for stage, iteration in plan(config, StopPoint.parse(LAST_STAGE))
    }


def frontier_row(name: str, config: PretrainConfig, records: RunRecords, training_cpu: float) -> FrontierRow:
    """The table's row of one budget, from its run's train@1, profile@1, probe@1, features@2 and reference@2 records."""
    train, profile = committed(records, "train", 1), committed(records, "profile", 1)
    probe, reference = committed(records, "probe", 1), committed(records, "reference", 2)
    best = best_layer_row(profile.metrics)
    if best is None:
        raise RuntimeError(f"{records.layout.run}: profile@1 measured no layer against phones")
    if reference.metrics["describes"]["k"] != SECOND_K or profile.metrics["k"] != FIRST_K:
        raise RuntimeError(f"{records.layout.run}: measured at other k than {FIRST_K} and {SECOND_K}")
    model, mfcc = probe.metrics["model"], probe.metrics["mfcc"]
    return FrontierRow(
        recipe=name,
        model=train.config["model"],
        steps=int(train.counts["steps"]),
        learning_rate=float(train.config["learning_rate"]),
        train_wall_minutes=record_seconds(train) / 60,
        train_cpu_minutes=training_cpu / 60,
        best_layer=int(best["layer"]),
        layer_used=int(committed(records, "features", 2).metrics["layer"]),
        pnmi_100=best["pnmi"],
        mfcc_pnmi_100=profile.metrics["mfcc"]["pnmi"],
        pnmi_500=reference.metrics["labels"]["pnmi"],
        mfcc_pnmi_500=reference.metrics["reference"]["pnmi"],
        per=model["per"],
        mfcc_per=mfcc["per"],
        frame_accuracy=model["frame_accuracy"][int(best["layer"]) - 1],
        mfcc_frame_accuracy=mfcc["frame_accuracy"][0],
        best_valid_step=train.metrics.get("best_step"),
        stage_seconds=stage_seconds(config, records),
    )


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def frontier_table(rows: list[FrontierRow]) -> str:
    """The frontier, one line per budget; each measure the model's, MFCC's, and whether it beats it."""
    header = (
        f"{'recipe':<11} {'model':<10} {'steps':>5} {'lr':>6} {'wall min':>8} {'CPU min':>7} {'L':>2}  "
        f"{'PNMI@100':>8} {'MFCC':>6} {'beats':>5}  {'PNMI@500':>8} {'MFCC':>6} {'beats':>5}  "
        f"{'PER':>6} {'MFCC':>6} {'beats':>5}  {'frame acc':>9} {'MFCC':>6}  gain@500 by k-means seed"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        beats = row.beats
        lines.append(
            f"{row.recipe:<11} {row.model:<10} {row.steps:>5} {row.learning_rate:>6g} {row.train_wall_minutes:>8.2f} "
            f"{row.train_cpu_minutes:>7.2f} {row.best_layer:>2}  "
            f"{row.pnmi_100:>8.3f} {row.mfcc_pnmi_100:>6.3f} {yes(beats['pnmi_100']):>5}  "
            f"{row.pnmi_500:>8.3f} {row.mfcc_pnmi_500:>6.3f} {yes(beats['pnmi_500']):>5}  "
            f"{row.per:>6.3f} {row.mfcc_per:>6.3f} {yes(beats['per']):>5}  "
            f"{row.frame_accuracy:>9.3f} {row.mfcc_frame_accuracy:>6.3f}  "
            + " ".join(f"{change:+.3f}" for change in row.changes_500)
        )
    return "\n".join(lines)


def consistency_notes(rows: list[FrontierRow]) -> list[str]:
    """What the records say that should not be: MFCC measured differently across runs, or
    iteration 2 clustering a layer other than the profile's best."""
    notes = [
        f"{row.recipe}: features@2 clustered layer {row.layer_used}, profile@1's best is {row.best_layer}"
        for row in rows if row.layer_used != row.best_layer
    ]
    for measure in ("mfcc_pnmi_100", "mfcc_pnmi_500", "mfcc_per"):
        values = {round(getattr(row, measure), 6) for row in rows}
        if len(values) > 1:
            notes.append(f"{measure} differs across runs on the same corpus: {sorted(values)}")
    return notes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of synthesized demo speech")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the synthesized corpus")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(DEFAULT_RECIPES), help="training budgets, by name")
    parser.add_argument(
        "--probe-steps", type=int, default=ProbeConfig.model_fields["steps"].default, help="CTC head steps of probe@1 (the pipeline's default)"
    )
    parser.add_argument(
        "--profile-utterances", type=int, default=LayerProfileConfig.model_fields["utterances"].default,
        help="utterances of profile@1's sample (the pipeline's default)",
    )
    parser.add_argument(
        "--kmeans-seeds", type=int, nargs="*", default=[1, 2],
        help="iteration 2's k-means again from these seeds (seed 0 is the run's): the spread of the k=500 gain",
    )
    parser.add_argument("--workers", type=int, default=2, help="Dask LocalCluster workers")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="where the corpus is cached and the temporary store made")
    parser.add_argument("--json", type=Path, default=None, help="write the rows (and the setting) as JSON here")
    return parser.parse_args()


def measure_budgets(args: argparse.Namespace, corpus: Path) -> tuple[list[FrontierRow], dict[str, int | float]]:
    """One run per budget in a temporary store on one LocalCluster; the rows, and the first run's intake counts."""
    rows: list[FrontierRow] = []
    with tempfile.TemporaryDirectory(dir=args.out, prefix="fidelity-") as scratch, dask_client(n_workers=args.workers) as client:
        store = ArtifactStore(scratch)
        for name in args.recipes:
            config = frontier_config(f"frontier-{name}", scratch, corpus, recipe(name), args.probe_steps, args.profile_utterances)
            log.info("budget %s: %s", name, RECIPES[name])
            training_cpu = run_budget(config, store, client)
            records = RunRecords(store, RunLayout(config.run))
            row = frontier_row(name, config, records, training_cpu)
            rows.append(dataclasses.replace(row, other_seed_changes=tuple(equal_k_changes(config, store, client, args.kmeans_seeds))))
            log.info("budget %s: stage seconds %s", name, rows[-1].stage_seconds)
        intake = committed(RunRecords(store, RunLayout(f"frontier-{args.recipes[0]}")), "intake", None).counts
    return rows, intake


def print_frontier(command: str, args: argparse.Namespace, corpus: Path, intake: dict[str, int | float], rows: list[FrontierRow]) -> None:
    """What was run, on what, measured how; the table; and what in the records disagrees."""
    print(f"command: {command}")
    print(
        f"corpus: synthesized demo, {args.minutes:g} min, seed {args.corpus_seed} ({corpus}); intake: "
        f"{intake['utterances']} utterances, {intake['valid_utterances']} of them validation (corpus.valid 0.1)"
    )
    print(
        f"measures: profile@1 PNMI at k={FIRST_K} ({args.profile_utterances} utterances at most), reference@2 PNMI at "
        f"k={SECOND_K} on iteration 2's frames, probe@1 PER ({args.probe_steps} CTC steps, held-out validation utterances)"
    )
    print(f"recipe shared by every budget: {SHARED_RECIPE}")
    print(
        "wall min: the train@1 record's seconds; CPU min: this process's CPU time (all threads) over the run_plan "
        "call that trains; L: profile@1's best layer (iteration 2 clusters it); frame acc: that layer's; "
        "PNMI@500 beats MFCC only if it does with every k-means seed measured (the last column: seed 0, then "
        f"{' '.join(map(str, args.kmeans_seeds)) or 'none'})"
    )
    print(frontier_table(rows))
    notes = consistency_notes(rows)
    for note in notes:
        print(f"note: {note}")
    if not notes and len(rows) > 1:
        print("MFCC measured the same in every run; iteration 2 clustered each run's best layer")


def write_rows(path: Path, command: str, args: argparse.Namespace, rows: list[FrontierRow]) -> None:
    setting = {
        "command": command, "minutes": args.minutes, "corpus_seed": args.corpus_seed, "probe_steps": args.probe_steps,
        "profile_utterances": args.profile_utterances, "shared_recipe": SHARED_RECIPE,
    }
    rows_json = [{**asdict(row), "beats_mfcc": row.beats, "recipe_settings": recipe(row.recipe)} for row in rows]
    path.write_text(json.dumps({"setting": setting, "rows": rows_json}, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = cached_demo_corpus(args.out, args.minutes, args.corpus_seed).parent
    rows, intake = measure_budgets(args, corpus)
    print_frontier(command, args, corpus, intake, rows)
    if args.json is not None:
        write_rows(args.json, command, args, rows)


if __name__ == "__main__":
    main()
