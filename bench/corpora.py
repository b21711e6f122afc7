"""Intake of one corpus on S3 three ways: loose files, 2,000 WebDataset shards, 2,000 Parquet shards.

    .venv/bin/python bench/corpora.py [--utterances 20000] [--shards 2000] [--workers 2] [--out bench-out]
                                      [--clips ../shared/data/fsdd-8k/wav]

The same audio (the real recordings of `--clips`, repeated under new ids up to `--utterances`) is
put on a SeaweedFS S3 server on loopback (devtools/seaweed.py) as loose wav objects (folders of a
thousand), as `--shards` WebDataset tars and as `--shards` Parquet files of Hugging Face's Audio
layout (struct<bytes, path> plus an `id` column); then intake takes each in on a fresh Dask
LocalCluster of `--workers` single-threaded workers into a local store. It prints the wall time
of each intake, utterances per second, the server's CPU seconds during it, the ratio to the
loose files (target: shards at least as fast) and how long the upload took. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import s3fs

from devtools.seaweed import seaweed_s3
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES

BUCKET = "corpus"


def clip_names(clips: list[Path], count: int) -> list[tuple[str, Path]]:
    """(utterance id, clip) for `count` utterances cycling through the clips."""
    return [(f"{index // len(clips):04d}-{clips[index % len(clips)].stem}", clips[index % len(clips)]) for index in range(count)]


def write_loose(items: list[tuple[str, Path]], folder: Path) -> None:
    for index, (name, clip) in enumerate(items):
        sub = folder / f"c{index // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{name}.wav").symlink_to(clip.resolve())


def write_webdataset(items: list[tuple[str, Path]], shards: int, folder: Path) -> None:
    folder.mkdir(parents=True)
    per = -(-len(items) // shards)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as tar:
            for name, clip in items[shard * per : (shard + 1) * per]:
                data = clip.read_bytes()
                info = tarfile.TarInfo(f"{name}.wav")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_parquet(items: list[tuple[str, Path]], shards: int, folder: Path) -> None:
    folder.mkdir(parents=True)
    per = -(-len(items) // shards)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for shard in range(shards):
        rows = items[shard * per : (shard + 1) * per]
        table = pa.table(
            {
                "audio": pa.array([{"bytes": clip.read_bytes(), "path": clip.name} for _, clip in rows], audio_type),
                "id": pa.array([name for name, _ in rows], pa.string()),
            }
        )
        pq.write_table(table, folder / f"train-{shard:05d}-of-{shards:05d}.parquet", row_group_size=100)


def intake_seconds(source: str, storage_options: dict, workers: int, store_root: Path) -> tuple[float, int]:
    """Wall seconds of intake of `source` into a fresh local store, and the utterances it took."""
    shutil.rmtree(store_root, ignore_errors=True)
    config = PretrainConfig.model_validate(
        {
            "run": "bench", "store": str(store_root), "corpus": {"source": source}, "storage_options": storage_options,
            "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 8}, "train": {"model": "tiny"}}],
        }
    )
    with dask_client(n_workers=workers) as client:
        start = time.perf_counter()
        record = run_stage(STAGES["intake"], StageContext(config, ArtifactStore(config.store), client, None))
        return time.perf_counter() - start, int(record.counts["utterances"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--clips", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd-8k" / "wav")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    items = clip_names(sorted(args.clips.glob("*.wav")), args.utterances)
    work = Path(tempfile.mkdtemp(prefix="corpora-", dir=args.out))
    try:
        write_loose(items, work / "loose")
        write_webdataset(items, args.shards, work / "wds")
        write_parquet(items, args.shards, work / "parquet")
        with seaweed_s3(work / "seaweed") as server:
            server.create_bucket(BUCKET)
            fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
            rows = []
            for name in ("loose", "wds", "parquet"):
                start = time.perf_counter()
                fs.put(str(work / name), f"{BUCKET}/{name}", recursive=True)
                uploaded = time.perf_counter() - start
                objects = len(fs.find(f"{BUCKET}/{name}"))
                cpu_before = server.cpu_seconds()
                seconds, taken = intake_seconds(f"s3://{BUCKET}/{name}", server.storage_options(), args.workers, work / "store")
                rows.append((name, objects, seconds, taken, server.cpu_seconds() - cpu_before, uploaded))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loose_seconds = rows[0][2]
    print(f"\nintake of {args.utterances} utterances from SeaweedFS S3 on {args.workers} workers")
    print(f"  {'source':<10}{'objects':>9}{'intake s':>10}{'utt/s':>9}{'server CPU s':>14}{'vs loose':>10}{'upload s':>10}")
    for name, objects, seconds, taken, server_cpu, uploaded in rows:
        assert taken == args.utterances, f"{name}: {taken} utterances taken in, {args.utterances} put"
        print(
            f"  {name:<10}{objects:>9}{seconds:>10.1f}{taken / seconds:>9.0f}{server_cpu:>14.1f}"
            f"{loose_seconds / seconds:>9.2f}x{uploaded:>10.1f}"
        )


if __name__ == "__main__":
    main()
