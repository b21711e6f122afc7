"""Object-storage overhead: the feature and label stages on a local folder store and on S3 (SeaweedFS).

    .venv/bin/python bench/s3.py [--minutes 120] [--repeats 3] [--workers 2] [--out bench-out]

Prints the wall time (best of --repeats runs) of the feature stage and of the label stage writing
into (a) a local folder store and (b) an `s3://` store on a SeaweedFS server on loopback
(devtools/seaweed.py, started by this script), and the ratio S3/local per stage (target: at most
1.5x). Same synthesized corpus, read from local disk in both cases, the same LocalCluster of
--workers workers (one thread each) for both stores, runs of the two interleaved. Only the stage
calls are timed: intake and k-means (k=100, at most 10 Lloyd iterations) run between them untimed.

Also printed, for the same best runs: the CPU seconds the driver and the workers spent during each
stage on each store, and those of the SeaweedFS server itself during the S3 stage. On a small
machine the server shares the cores with the workers, so part of the S3 overhead measured here is
the server's own work, which a remote object store does elsewhere; and where every side's CPU
seconds over the cores come near the wall time, the stage is bound by this machine's cores, not
by waiting on requests. Last, what one whole-object GET costs the client and the server in CPU
(per request and per MB, from chunk reads of 1 KB and of 32 MB, read as the label stage reads
them), and so what the label stage's reads of the features alone cost.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from devtools.demo_corpus import cached_demo_corpus
from devtools.seaweed import S3Server, seaweed_s3
from infra.cluster import dask_client
from infra.store import ArtifactStore
from infra.zarr_io import read_row_chunks
from tasks.run.config import PretrainConfig
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES, run_plan

BUCKET = "bench"
TIMED = ("features", "labels")


def process_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds (user + system) of the driver, the cluster's workers and the S3 server, if any."""

    def __init__(self, client, server: S3Server | None) -> None:
        self.driver = psutil.Process()
        self.workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        self.server = server

    def read(self) -> dict[str, float]:
        return {
            "driver": process_cpu(self.driver),
            "workers": sum(process_cpu(worker) for worker in self.workers),
            "server": 0.0 if self.server is None else self.server.cpu_seconds(),
        }


def measured(call: Callable[[], object], meter: CpuMeter) -> tuple[object, float, dict[str, float]]:
    """The call's result, its wall seconds, and the CPU seconds each side spent meanwhile."""
    before, start = meter.read(), time.perf_counter()
    result = call()
    seconds, after = time.perf_counter() - start, meter.read()
    return result, seconds, {side: after[side] - before[side] for side in after}


@dataclass(frozen=True)
class GetCost:
    """CPU milliseconds a whole-object GET costs the client (this process) and the server: a part
    per request and a part per MB (2**20 bytes) moved."""

    client_fixed: float
    server_fixed: float
    client_per_mb: float
    server_per_mb: float

    def cpu_seconds(self, requests: int, megabytes: float) -> float:
        """Client and server CPU seconds of `requests` GETs moving `megabytes` in all."""
        fixed, per_mb = self.client_fixed + self.server_fixed, self.client_per_mb + self.server_per_mb
        return (requests * fixed + megabytes * per_mb) / 1e3


def get_cost(server: S3Server, root: str, options: dict, small_reads: int = 64, big_mb: int = 32, big_reads: int = 4) -> GetCost:
    """Chunk reads of 1 KB (the fixed part) and of `big_mb` MB (the part per MB), one chunk a GET,
    each the best of 3 rounds, through the label stage's own read path (`read_row_chunks`)."""
    group = ArtifactStore(root, options).open_zarr("get-cost.zarr", mode="w")
    arrays = {}
    for name, rows, reads in (("small", 256, small_reads), ("big", big_mb * 2**18, big_reads)):
        array = group.create_array(name, shape=(rows * reads, 1), chunks=(rows, 1), dtype="float32", compressors=None)
        array[:] = np.random.default_rng(0).standard_normal((rows * reads, 1), dtype=np.float32)
        arrays[name] = (array, rows, reads)

    def cpu_of(name: str) -> tuple[float, float]:
        array, rows, reads = arrays[name]
        rounds = []
        for _ in range(3):
            client, served = time.process_time(), server.cpu_seconds()
            for index in range(reads):
                read_row_chunks(array, index * rows, (index + 1) * rows)
            rounds.append((time.process_time() - client, server.cpu_seconds() - served))
        return min(rounds, key=sum)

    small_client, small_server = cpu_of("small")
    big_client, big_server = cpu_of("big")
    fixed_client, fixed_server = small_client / small_reads, small_server / small_reads
    megabytes = big_reads * big_mb
    return GetCost(
        client_fixed=1e3 * fixed_client,
        server_fixed=1e3 * fixed_server,
        client_per_mb=1e3 * max(big_client - big_reads * fixed_client, 0.0) / megabytes,
        server_per_mb=1e3 * max(big_server - big_reads * fixed_server, 0.0) / megabytes,
    )


def timed_stages(config: PretrainConfig, client, server: S3Server | None = None) -> tuple[dict, dict, dict]:
    """Wall seconds and CPU seconds (by side) of the feature and label stage calls of one fresh run, and its size."""
    store = ArtifactStore(config.store, config.fsspec_options)
    intake = run_plan(config, store, client, "intake")[("intake", None)]
    context = StageContext(config, store, client, 1)
    meter = CpuMeter(client, server)
    seconds, cpu = {}, {}
    features, seconds["features"], cpu["features"] = measured(lambda: run_stage(STAGES["features"], context), meter)
    run_stage(STAGES["kmeans"], context)
    _, seconds["labels"], cpu["labels"] = measured(lambda: run_stage(STAGES["labels"], context), meter)
    size = {
        "utterances": intake.counts["utterances"], "frames": features.counts["frames"], "chunks": features.counts["chunks"],
        "feature_bytes": features.sizes["features.zarr"],
    }
    return seconds, cpu, size


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
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers, one thread each (default 2)")
    args = parser.parse_args()
    wav_folder = cached_demo_corpus(args.out, args.minutes)
    best = {(kind, stage): float("inf") for kind in ("local", "s3") for stage in TIMED}
    best_cpu: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.out) as scratch_name:
        scratch = Path(scratch_name)
        with seaweed_s3(scratch / "seaweed") as s3:
            s3.create_bucket(BUCKET)
            cost = get_cost(s3, f"s3://{BUCKET}/probe", s3.storage_options())  # before the cluster's scheduler runs here
            stores = {
                "local": (str(scratch / "store"), None),
                "s3": (f"s3://{BUCKET}/runs", s3.storage_options()),
            }
            with dask_client(n_workers=args.workers, threads_per_worker=1) as client:
                for repeat in range(args.repeats):
                    for kind, (root, options) in stores.items():
                        config = bench_config(f"bench-{kind}-{repeat}", root, wav_folder, options)
                        server = s3 if kind == "s3" else None
                        seconds, cpu, size = timed_stages(config, client, server)
                        for stage in TIMED:
                            if seconds[stage] < best[kind, stage]:
                                best[kind, stage], best_cpu[kind, stage] = seconds[stage], cpu[stage]
    print(
        f"corpus: {args.minutes:g} min of synthesized speech ({size['utterances']} utterances, {size['frames']} frames "
        f"in {size['chunks']} chunks), read from local disk; LocalCluster of {args.workers} worker(s); "
        f"best of {args.repeats} runs each"
    )
    print(f"{'stage':<10}{'local folder':>14}{'SeaweedFS S3':>14}{'S3/local':>11}")
    for stage in TIMED:
        local, s3_seconds = best["local", stage], best["s3", stage]
        print(f"{stage:<10}{local:>12.2f} s{s3_seconds:>12.2f} s{s3_seconds / local:>10.2f}x   (target <= 1.5x)")
    cores = psutil.cpu_count()
    print(f"CPU seconds in those runs ({cores} cores; 'all / cores': the wall time if every core were busy throughout):")
    print(f"{'stage':<10}{'store':<7}{'driver':>8}{'workers':>9}{'server':>8}{'all / cores':>13}{'wall':>8}")
    for stage in TIMED:
        for kind in ("local", "s3"):
            cpu = best_cpu[kind, stage]
            print(
                f"{stage:<10}{kind:<7}{cpu['driver']:>8.2f}{cpu['workers']:>9.2f}{cpu['server']:>8.2f}"
                f"{sum(cpu.values()) / cores:>11.2f} s{best[kind, stage]:>6.2f} s"
            )
    megabytes = size["feature_bytes"] / 2**20
    reading = cost.cpu_seconds(size["chunks"], megabytes)
    print(
        f"a whole-object GET here costs (CPU): client {cost.client_fixed:.2f} ms + {cost.client_per_mb:.2f} ms/MB, "
        f"server {cost.server_fixed:.2f} ms + {cost.server_per_mb:.2f} ms/MB"
    )
    print(
        f"the label stage's reads of the features from S3 alone ({size['chunks']} GETs, {megabytes:.0f} MB): "
        f"{reading:.2f} CPU-s, {reading / cores:.2f} s of the {cores} cores; 1.5x local leaves "
        f"{0.5 * best['local', 'labels']:.2f} s for all that S3 adds to the label stage"
    )


if __name__ == "__main__":
    main()
