"""The scaling curve: intake -> features -> k-means -> labels on 1x, 4x and 16x an hour of audio,
or (`--utterances`) on 10k, 100k and 1M utterances.

    .venv/bin/python bench/scale.py [--hours 1] [--scales 1 4 16] [--workers 2] [--k 100]
                                    [--sample-fraction 0.1] [--out bench-out]
    .venv/bin/python bench/scale.py --utterances 10000 100000 1000000 [--clips ../shared/data/fsdd-8k/wav]

The corpus is `--hours` of synthesized speech (devtools/demo_corpus.py), repeated under new
utterance ids (symbolic links named `r<copy>-<id>.wav`) up to each scale: the audio is real and
every stage does the full work, but the disk holds one copy. With `--utterances`, it is the real
short recordings of `--clips` (FSDD: 300 of about 0.4 s at 8 kHz, resampled once to 16 kHz) linked again and again into
folders of a thousand (`c0000/`, `c0001/`, ...) up to each count, so file names repeat across
folders and intake gives them ids from their paths (`corpus.ids: auto`). Each scale runs
iteration 1 (MFCC, k-means at `--k` on `--sample-fraction` of the frames, as the paper fits on a
sample) into a fresh local store on a fresh Dask LocalCluster of `--workers` single-threaded workers.

Per stage it prints the wall time, the peak RSS of the driver (a fresh process per scale, as a run
has its own) and of each worker while the stage ran (sampled every 50 ms with psutil), and the
store bytes the stage wrote; then the ratios to 1x per audio hour (target: time linear within 15%,
memory flat within 20%); then extrapolates the per-hour cost measured at the largest scale to
LibriSpeech-960 and Libri-Light 60k hours on 8, 64 and 512 workers, assuming the work divides
evenly over workers (it does for features and labels, one task per chunk; k-means' per-pass cost
divides, its round trips do not). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import soundfile
import torch
import torchaudio.functional

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.store import ArtifactStore
from tasks.run.config import PretrainConfig
from tasks.run.layout import stage_iteration
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES

STAGE_NAMES = ("intake", "features", "kmeans", "labels")
EXTRAPOLATED = {"LibriSpeech-960": 960, "Libri-Light 60k": 60_000}
WORKER_COUNTS = (8, 64, 512)


class PeakRss:
    """The largest RSS each watched process reached while the sampler ran (MiB)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peaks = dict.fromkeys(pids, 0.0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                try:
                    self.peaks[name] = max(self.peaks[name], process.memory_info().rss / 2**20)
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def repeated_corpus(wav_folder: Path, copies: int, folder: Path) -> Path:
    """A folder of `copies` links to every file of `wav_folder`, each copy under new ids."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sources = sorted(wav_folder.glob("*.wav"))
    for copy in range(copies):
        for source in sources:
            (folder / f"r{copy:03d}-{source.name}").symlink_to(source.resolve())
    return folder


def clips_at_16k(clips: Path, folder: Path) -> Path:
    """The clips resampled to 16 kHz once (16-bit wav), so that every stage's cost is the
    pipeline's own and not the resampler's (which costs more than the MFCC of a short clip)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(clips.glob("*.wav")):
        target = folder / path.name
        if not target.exists():
            samples, rate = soundfile.read(path, dtype="float32")
            resampled = torchaudio.functional.resample(torch.from_numpy(samples), rate, 16_000).numpy()
            soundfile.write(target, resampled, 16_000, subtype="PCM_16")
    return folder


def linked_corpus(clips: Path, count: int, folder: Path, per_folder: int = 1000) -> Path:
    """`count` links to the clips of `clips`, cycling through them, in folders of `per_folder`."""
    if folder.exists():
        shutil.rmtree(folder)
    sources = sorted(path.resolve() for path in clips.glob("*.wav"))
    for start in range(0, count, per_folder):
        sub = folder / f"c{start // per_folder:04d}"
        sub.mkdir(parents=True)
        for index in range(start, min(start + per_folder, count)):
            source = sources[index % len(sources)]
            os.symlink(source, sub / f"{index // len(sources):04d}-{source.name}")
    return folder


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.exists() else 0


def run_scale(corpus: Path, store_root: Path, workers: int, k: int, sample_fraction: float) -> dict[str, dict]:
    """Per stage: wall seconds, driver and worker peak RSS (MiB), store bytes written."""
    config = PretrainConfig.model_validate(
        {
            "run": "scale",
            "store": str(store_root),
            "corpus": {"source": str(corpus)},
            "iterations": [
                {"features": {"kind": "mfcc"}, "kmeans": {"k": k, "sample_fraction": sample_fraction}, "train": {"model": "tiny"}}
            ],
        }
    )
    store = ArtifactStore(config.store)
    results = {}
    with dask_client(n_workers=workers) as client:
        pids = {"driver": os.getpid(), **{f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}}
        for name in STAGE_NAMES:
            before = folder_bytes(store_root)
            with PeakRss(pids) as peaks:
                start = time.perf_counter()
                record = run_stage(STAGES[name], StageContext(config, store, client, stage_iteration(name, 1)))
                seconds = time.perf_counter() - start
            results[name] = {"seconds": seconds, "rss": peaks.peaks, "bytes": folder_bytes(store_root) - before, "record": record}
    return results


def _run_scale_into(queue: multiprocessing.Queue, *arguments: object) -> None:
    queue.put(run_scale(*arguments))


def run_scale_in_own_process(*arguments: object) -> dict[str, dict]:
    """`run_scale` in a fresh process: the driver's peak RSS is then this scale's alone, not the
    high-water mark earlier scales left in this process (as each real run has a driver of its own)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_scale_into, args=(queue, *arguments))
    process.start()
    results = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the scale's process exited with {process.exitcode}")
    return results


LIBRI_LIGHT_PIECES = 60_000 * 3600 // 30
"""Libri-Light's 60k hours cut into 30 s spans: the utterance count a driver would plan."""


def driver_summary(rows: dict[int, dict], scales: list[int]) -> None:
    """The driver's peak over all stages at each count, its growth per utterance, and what that gives
    for LibriSpeech-960 (281k utterances) and Libri-Light in 30 s spans (7.2M)."""
    peaks = {scale: max(rows[scale][name]["rss"]["driver"] for name in STAGE_NAMES) for scale in scales}
    base, largest = scales[0], scales[-1]
    slope = (peaks[largest] - peaks[base]) / (largest - base) if largest > base else 0.0
    per_utterance = {
        name: (rows[largest][name]["seconds"] / largest) / (rows[base][name]["seconds"] / base) for name in STAGE_NAMES
    }
    print("\ndriver peak RSS over all stages: " + ", ".join(f"{scale}: {peaks[scale]:.0f} MiB" for scale in scales))
    print(f"  {largest} / {base}: {peaks[largest] / peaks[base]:.2f}x (target: at most 1.25x); {slope * 2**20:.0f} bytes per utterance")
    print("  time per utterance, " + f"{largest} / {base}: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in per_utterance.items()))
    for corpus_name, count in (("LibriSpeech-960", 281_241), ("Libri-Light in 30 s spans", LIBRI_LIGHT_PIECES)):
        print(f"  {corpus_name} ({count} utterances): driver about {peaks[base] + slope * (count - base):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--sample-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--utterances", type=int, nargs="+", help="scales as utterance counts of --clips, e.g. 10000 100000 1000000")
    parser.add_argument("--clips", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd-8k" / "wav")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    if args.utterances:
        args.scales = args.utterances
    wav_folder = clips_at_16k(args.clips, args.out / "clips-16k") if args.utterances else cached_demo_corpus(args.out, args.hours * 60)
    rows = {}
    for scale in args.scales:
        if args.utterances:
            corpus = linked_corpus(wav_folder, scale, args.out / "scale-corpus")
        else:
            corpus = repeated_corpus(wav_folder, scale, args.out / "scale-corpus")
        store_root = args.out / "scale-store"
        shutil.rmtree(store_root, ignore_errors=True)
        rows[scale] = run_scale_in_own_process(corpus, store_root, args.workers, args.k, args.sample_fraction)
        shutil.rmtree(store_root, ignore_errors=True)
        audio_hours = rows[scale]["features"]["record"].counts["audio_hours"]
        rows[scale]["audio_hours"] = audio_hours
        utterances = rows[scale]["intake"]["record"].counts["utterances"]
        print(
            f"\n{scale}{'' if args.utterances else 'x'}: {utterances} utterances, {audio_hours:.2f} h of audio, "
            f"{rows[scale]['features']['record'].counts['frames']} frames"
        )
        print(f"  {'stage':<10}{'wall s':>9}{'s/audio h':>11}{'driver MiB':>12}{'workers MiB':>16}{'store MB':>10}")
        for name in STAGE_NAMES:
            row = rows[scale][name]
            worker_peaks = [value for key, value in row["rss"].items() if key != "driver"]
            print(
                f"  {name:<10}{row['seconds']:>9.1f}{row['seconds'] / audio_hours:>11.1f}{row['rss']['driver']:>12.0f}"
                f"{'/'.join(f'{peak:.0f}' for peak in worker_peaks):>16}{row['bytes'] / 1e6:>10.1f}"
            )
    shutil.rmtree(args.out / "scale-corpus", ignore_errors=True)
    base, largest = args.scales[0], args.scales[-1]
    print(f"\nratios to {base}x, per audio hour (time: target within 15% of 1.0; memory: within 20%)")
    print(f"  {'stage':<10}" + "".join(f"{f'{s}x time':>10}{f'{s}x drv':>9}{f'{s}x wrk':>9}" for s in args.scales[1:]))
    for name in STAGE_NAMES:
        cells = []
        for scale in args.scales[1:]:
            mine, first = rows[scale], rows[base]
            per_hour = (mine[name]["seconds"] / mine["audio_hours"]) / (first[name]["seconds"] / first["audio_hours"])
            driver = mine[name]["rss"]["driver"] / first[name]["rss"]["driver"]
            worker = max(v for key, v in mine[name]["rss"].items() if key != "driver") / max(
                v for key, v in first[name]["rss"].items() if key != "driver"
            )
            cells.append(f"{per_hour:>10.2f}{driver:>9.2f}{worker:>9.2f}")
        print(f"  {name:<10}" + "".join(cells))
    if args.utterances:
        driver_summary(rows, args.scales)
    per_hour = {name: rows[largest][name]["seconds"] / rows[largest]["audio_hours"] for name in STAGE_NAMES}
    print(f"\nextrapolated from {largest}x on {args.workers} workers (seconds per audio hour x hours x {args.workers} / N workers)")
    print(f"  {'corpus':<18}{'workers':>8}" + "".join(f"{name:>11}" for name in STAGE_NAMES) + f"{'total':>11}")
    for corpus_name, hours in EXTRAPOLATED.items():
        for count in WORKER_COUNTS:
            hours_per_stage = [per_hour[name] * hours * args.workers / count / 3600 for name in STAGE_NAMES]
            print(
                f"  {corpus_name:<18}{count:>8}" + "".join(f"{h:>10.2f}h" for h in hours_per_stage)
                + f"{sum(hours_per_stage):>10.2f}h"
            )


if __name__ == "__main__":
    main()
