"""Object-storage overhead: the feature and label stages on a local folder store and on S3 (SeaweedFS).

    .venv/bin/python bench/s3.py [--minutes 30] [--repeats 3] [--out bench-out]

Prints the wall time (best of --repeats runs) of the feature stage and of the label stage writing
into (a) a local folder store and (b) an `s3://` store on a SeaweedFS server on loopback
(infra/seaweed.py, started by this script), and the ratio S3/local per stage (target: at most
1.5x). Same synthesized corpus, read from local disk in both cases, the same LocalCluster of 2
workers for both stores, runs of the two interleaved. Only the stage calls are timed: intake and
k-means (k=100, at most 10 Lloyd iterations) run between them untimed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from infra.cluster import dask_client
from infra.seaweed import seaweed_s3
from infra.store import ArtifactStore
from tasks.config import PretrainConfig
from tasks.demo_corpus import cached_demo_corpus
from tasks.features import MfccSource, run_features
from tasks.intake import load_manifest, run_intake
from tasks.kmeans import run_kmeans
from tasks.labels import run_labels

BUCKET = "bench"
STAGES = ("features", "labels")


def timed_stages(config: PretrainConfig, client) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds of the feature and label stage calls of one fresh run, and the run's size."""
    store = ArtifactStore(config.store, config.storage_options)
    intake = run_intake(config, store, client)
    utterances = load_manifest(store, config.run)
    start = time.perf_counter()
    features = run_features(config, 1, store, client, intake, utterances, MfccSource())
    seconds = {"features": time.perf_counter() - start}
    kmeans = run_kmeans(config, 1, store, client, features)
    start = time.perf_counter()
    run_labels(config, 1, store, client, features, kmeans, utterances)
    seconds["labels"] = time.perf_counter() - start
    size = {"utterances": len(utterances), "frames": features.counts["frames"], "chunks": features.counts["chunks"]}
    return seconds, size


def bench_config(run: str, store: str, wav_folder: Path, storage_options: dict | None = None) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": store,
            "storage_options": storage_options or {},
            "corpus": {"source": str(wav_folder)},
            "iterations": [
                {"features": {"kind": "mfcc"}, "kmeans": {"k": 100, "max_iter": 10}, "train": {"model": "tiny"}}
            ],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each (default 3)")
    args = parser.parse_args()
    wav_folder = cached_demo_corpus(args.out, args.minutes)
    best = {(kind, stage): float("inf") for kind in ("local", "s3") for stage in STAGES}
    with tempfile.TemporaryDirectory(dir=args.out) as scratch_name:
        scratch = Path(scratch_name)
        with seaweed_s3(scratch / "seaweed") as s3, dask_client(n_workers=2, threads_per_worker=1) as client:
            s3.create_bucket(BUCKET)
            stores = {
                "local": (str(scratch / "store"), None),
                "s3": (f"s3://{BUCKET}/runs", s3.storage_options()),
            }
            for repeat in range(args.repeats):
                for kind, (root, options) in stores.items():
                    config = bench_config(f"bench-{kind}-{repeat}", root, wav_folder, options)
                    seconds, size = timed_stages(config, client)
                    for stage in STAGES:
                        best[kind, stage] = min(best[kind, stage], seconds[stage])
    print(
        f"corpus: {args.minutes:g} min of synthesized speech ({size['utterances']} utterances, {size['frames']} frames "
        f"in {size['chunks']} chunks), read from local disk; LocalCluster of 2 workers; "
        f"best of {args.repeats} runs each"
    )
    print(f"{'stage':<10}{'local folder':>14}{'SeaweedFS S3':>14}{'S3/local':>11}")
    for stage in STAGES:
        local, s3_seconds = best["local", stage], best["s3", stage]
        print(f"{stage:<10}{local:>12.2f} s{s3_seconds:>12.2f} s{s3_seconds / local:>10.2f}x   (target <= 1.5x)")


if __name__ == "__main__":
    main()
