"""Label fidelity: MFCC PNMI against the per-layer PNMI of the model trained on its labels, at the same k.

    .venv/bin/python bench/fidelity.py [--minutes 10] [--steps 200 800] [--model tiny] [--k 100]

On the synthesized demo corpus (phone alignments known), runs iteration 1 (intake, MFCC, k-means,
labels, train) once per `--steps` value with the demo's training recipe, and prints the MFCC
labels' PNMI, the layer profile of each trained model (every layer clustered at k on the same
seeded sample, tasks/stages/profile.py) and the wall time of each training: the frontier of
iteration-2 label quality against CPU (or GPU) minutes. On a GPU machine use `--model base`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES, run_plan

DEMO_RECIPE = {"learning_rate": 1e-3, "max_batch_seconds": 8, "max_sample_seconds": 4, "unmasked_weight": 1.0}


def fidelity_config(run: str, store: str, corpus: Path, k: int, model: str, steps: int, profile_utterances: int) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": store,
            "corpus": {"source": str(corpus / "manifest.jsonl"), "alignments": str(corpus / "align")},
            "iterations": [
                {
                    "features": {"kind": "mfcc"},
                    "kmeans": {"k": k},
                    "train": {
                        "model": model, "steps": steps, **DEMO_RECIPE, "io": {"checkpoint_every": max(steps // 4, 1)},
                        "logging": {"log_every": max(steps // 10, 1)},
                    },
                    "profile": {"utterances": profile_utterances, "k": k},
                }
            ],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--profile-utterances", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    corpus = cached_demo_corpus(args.out, args.minutes).parent
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as scratch, dask_client(n_workers=2) as client:
        for steps in args.steps:
            config = fidelity_config(f"fidelity-{steps}", scratch, corpus, args.k, args.model, steps, args.profile_utterances)
            store = ArtifactStore(config.store)
            labels = run_plan(config, store, client, "labels")[("labels", 1)]
            start = time.perf_counter()
            run_stage(STAGES["train"], StageContext(config, store, client, 1))
            profile = run_stage(STAGES["profile"], StageContext(config, store, client, 1))
            rows.append((steps, time.perf_counter() - start, labels, profile))
    print(f"demo corpus: {args.minutes:g} min, model {args.model}, k={args.k}, recipe {DEMO_RECIPE}")
    first_labels = rows[0][2]
    print(f"MFCC labels (all frames): PNMI {first_labels.metrics['quality']['pnmi']:.3f}")
    for steps, seconds, _, measured in rows:
        profile = measured.metrics
        layers = " ".join(f"L{row['layer']} {row['pnmi']:.3f}" for row in profile["layers"])
        print(
            f"{steps:>6} steps  {seconds / 60:6.1f} min (train + profile)  "
            f"profile sample ({profile['utterances']} utts): MFCC {profile['mfcc']['pnmi']:.3f}  {layers}  "
            f"best L{profile['best_layer']}"
        )


if __name__ == "__main__":
    main()
