"""Training throughput: the trainer against a plain torchaudio loop, and its steps' wait for object storage.

    .venv/bin/python bench/train.py [--minutes 3] [--steps 20] [--repeats 3] [--model tiny] [--device cpu]
                                    [--batch-seconds S] [--crop-seconds S] [--threads N] [--out bench-out]

Sets up once, untimed: `--minutes` of synthesized speech uploaded to a SeaweedFS server on loopback
(devtools/seaweed.py, started by this script), and iteration 1 of a run on that `s3://` store up to
its labels (MFCC, k=100) on a LocalCluster of 2 workers, which is then closed. Then, interleaved
`--repeats` times, each run training a freshly seeded `--model` for 2 x `--steps` steps, of which
the second `--steps` are measured (the first warm the allocator up):

  (a) in memory: every training utterance read once into memory, then
      - the reference a user would write: torchaudio's HuBERTPretrainModel (model/hubert.py builds
        it), a plain Python loop over the same length-bucketed groups of utterances, a random crop
        and padding inline, the same loss, AdamW, warm-up/decay schedule and clipping;
      - the trainer (model/trainer.py `train`) on a `BatchStream` over the in-memory utterances,
        with its default prefetch;
  (b) from S3: the trainer on the store's source (tasks/stages/train/rank.py `StoreUtteranceSource`: audio
      and labels read from SeaweedFS per utterance, as the train stage does) with prefetch 0 (each
      batch read in the step, as before prefetching) and with the default prefetch.

Prints audio-seconds per second of each (best of --repeats), the trainer's ratio to the plain loop
(target at least 0.95x), and the share of the trainer's step time spent waiting for data (target
under 5% from S3 with prefetch). The trainer measures both itself: they are the `audio_seconds_per_second`
and `data_wait_share` of its log. On a small machine the S3 server and the loader threads share the
cores with training, so (b) also pays for the server's work, which a remote object store does elsewhere
(printed: the cores the server kept busy during each run).
Where other work shares the cores, torch's intra-op threads lose much of their speed waiting for each
other; `--threads 1` then gives steadier ratios.

`--model base --device cuda` measures BASE on a GPU (bf16 autocast, as the trainer uses there); the
default batch and crop sizes are then the config's (87.5 s, 15.625 s) rather than the demo's (8 s, 4 s).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
import time
from pathlib import Path

import s3fs
import torch
from in_memory import InMemoryUtterances, NoCheckpoints
from torch.nn.utils.rnn import pad_sequence

from devtools.demo_corpus import cached_demo_corpus
from devtools.seaweed import seaweed_s3
from infra.cluster import dask_client
from infra.store import ArtifactStore
from model.data import PREFETCH_BATCHES, BatchShape, BatchStream, BucketBatches, map_labels
from model.frames import SAMPLE_RATE
from model.hubert import build_pretrain_model, hubert_loss
from model.presets import HUBERT_CONFIGS, HubertConfig
from model.trainer import TrainerSettings, train, warmup_then_linear_decay
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest
from tasks.run.sections import TrainConfig
from tasks.stages.catalog import run_plan
from tasks.stages.train.rank import StoreUtteranceSource, batch_shape, trainer_settings

BUCKET = "bench"
RUN = "bench-train"


def read_into_memory(source: StoreUtteranceSource) -> InMemoryUtterances:
    """Every utterance of `source` read once."""
    indices = range(len(source))
    return InMemoryUtterances(
        [source.load(index) for index in indices], [source.samples(index) for index in indices],
        [source.name(index) for index in indices],
    )


def labelled_store(wav_folder: Path, s3, train: TrainConfig) -> ArtifactStore:
    """The corpus uploaded to the S3 server, and iteration 1 of a run on it up to its labels."""
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    wavs = sorted(wav_folder.glob("*.wav"))
    fs.put([str(path) for path in wavs], [f"{BUCKET}/corpus/{path.name}" for path in wavs])
    config = PretrainConfig.model_validate(
        {
            "run": RUN,
            "store": f"s3://{BUCKET}/runs",
            "storage_options": s3.storage_options(),
            "corpus": {"source": f"s3://{BUCKET}/corpus"},
            "iterations": [{"features": {"kind": "mfcc"}, "kmeans": {"k": 100, "max_iter": 10},
                            "train": train.model_dump(exclude_unset=True)}],
        }
    )
    store = ArtifactStore(config.store, config.fsspec_options)
    with dask_client(n_workers=2, threads_per_worker=1) as client:
        run_plan(config, store, client, "labels")
    return store


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_model(architecture: HubertConfig, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_pretrain_model(architecture, num_classes=k)
    torch.manual_seed(1)
    return model


def trainer_run(source, shape: BatchShape, architecture: HubertConfig, k: int, settings: TrainerSettings,
                device: torch.device, prefetch: int) -> dict[str, float]:
    """The trainer's own log entry for the measured second half of its steps."""
    stream = BatchStream(source, shape, seed=0, prefetch=prefetch)
    history = train(fresh_model(architecture, k), stream, settings, NoCheckpoints(), device)
    return history[-1]


def plain_loop(memory: InMemoryUtterances, shape: BatchShape, architecture: HubertConfig, k: int, settings: TrainerSettings,
               device: torch.device) -> float:
    """Audio-seconds per second of the reference loop over the second half of `settings.steps`."""
    geometry = shape.model_geometry
    utterances = []
    for waveform, labels in memory.items:
        prepared = shape.prepare(waveform) if shape.prepare is not None else waveform
        utterances.append((prepared, map_labels(labels, shape.labels_geometry, geometry, geometry.num_frames(prepared.shape[0]))))
    buckets = BucketBatches(memory.lengths, shape.max_batch_samples, shape.max_sample_size, seed=0)
    groups = itertools.islice((group for epoch in itertools.count() for group in buckets.epoch(epoch)), settings.steps)
    crop_frames = geometry.num_frames(shape.max_sample_size)

    model = fresh_model(architecture, k).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(settings.warmup_steps, settings.steps))
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if settings.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    measured_from = settings.steps - settings.logging.log_every
    model.train()
    audio, started = 0.0, time.perf_counter()
    for step, group in enumerate(groups):
        if step == measured_from:
            synchronize(device)
            audio, started = 0.0, time.perf_counter()
        pieces = []
        for index in group:
            waveform, labels = utterances[index]
            if waveform.shape[0] > shape.max_sample_size:
                start_frame = int(torch.randint((waveform.shape[0] - shape.max_sample_size) // geometry.hop + 1, (1,)))
                start = start_frame * geometry.hop
                waveform, labels = waveform[start : start + shape.max_sample_size], labels[start_frame : start_frame + crop_frames]
            pieces.append((waveform, labels))
        waveforms = pad_sequence([waveform for waveform, _ in pieces], batch_first=True)
        labels = pad_sequence([labels for _, labels in pieces], batch_first=True)
        lengths = torch.tensor([waveform.shape[0] for waveform, _ in pieces])
        with autocast:
            logit_m, logit_u, penalty = model(waveforms.to(device), labels.to(device), lengths.to(device))
        loss, _ = hubert_loss(logit_m.float(), None if logit_u is None else logit_u.float(), penalty.float(),
                              unmasked_weight=settings.unmasked_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        audio += float(lengths.sum()) / SAMPLE_RATE
    synchronize(device)
    return audio / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="synthesized speech in the corpus (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="steps measured, after as many warm-up steps (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each (default 3)")
    parser.add_argument("--model", default="tiny", choices=sorted(HUBERT_CONFIGS), help="architecture (default tiny)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; cuda for a GPU)")
    parser.add_argument("--batch-seconds", type=float, help="audio per batch (default 8 for tiny, else the config's)")
    parser.add_argument("--crop-seconds", type=float, help="longest crop (default 4 for tiny, else the config's)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's; 1 is the honest figure on shared cores)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="cached corpora live here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = args.model == "tiny"
    sizes = {
        "max_batch_seconds": args.batch_seconds or (8.0 if tiny else TrainConfig.model_fields["max_batch_seconds"].default),
        "max_sample_seconds": args.crop_seconds or (4.0 if tiny else TrainConfig.model_fields["max_sample_seconds"].default),
    }
    train_config = TrainConfig(model=args.model, steps=2 * args.steps, logging={"log_every": args.steps},
                               io={"checkpoint_every": 2 * args.steps}, **sizes)
    settings = trainer_settings(train_config)
    device = torch.device(args.device)
    architecture = HUBERT_CONFIGS[args.model]
    wav_folder = cached_demo_corpus(args.out, args.minutes)

    with tempfile.TemporaryDirectory(dir=args.out) as scratch_name, seaweed_s3(Path(scratch_name) / "seaweed") as s3:
        s3.create_bucket(BUCKET)
        started = time.perf_counter()
        store = labelled_store(wav_folder, s3, train_config)
        on_s3 = StoreUtteranceSource(store, RunLayout(RUN).labels_store(1), load_manifest(store, RunLayout(RUN)))
        on_s3.check()
        memory = read_into_memory(on_s3)
        shape = batch_shape(train_config, on_s3, architecture)
        print(f"set-up (upload, labels on S3, reading into memory): {time.perf_counter() - started:.0f} s")

        best: dict[str, dict[str, float]] = {}

        def keep(name: str, entry: dict[str, float]) -> None:
            if name not in best or entry["audio_seconds_per_second"] > best[name]["audio_seconds_per_second"]:
                best[name] = entry

        def from_s3(prefetch: int) -> dict[str, float]:
            """The trainer's entry on the S3 source, with the cores the server kept busy meanwhile."""
            cpu, started = s3.cpu_seconds(), time.perf_counter()
            entry = trainer_run(on_s3, shape, architecture, on_s3.k, settings, device, prefetch)
            return {**entry, "server_cores": (s3.cpu_seconds() - cpu) / (time.perf_counter() - started)}

        for _ in range(args.repeats):
            rate = plain_loop(memory, shape, architecture, on_s3.k, settings, device)
            keep("plain", {"audio_seconds_per_second": rate})
            keep("memory", trainer_run(memory, shape, architecture, on_s3.k, settings, device, PREFETCH_BATCHES))
            keep("s3-0", from_s3(0))
            keep("s3", from_s3(PREFETCH_BATCHES))

    audio = sum(memory.lengths) / SAMPLE_RATE
    plain = best["plain"]["audio_seconds_per_second"]
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ", bf16 autocast"
    print(
        f"corpus: {args.minutes:g} min of synthesized speech ({len(memory)} training utterances, {audio:.0f} s), "
        f"MFCC labels k={on_s3.k}; model {args.model} on {device}{threads}; batches of at most "
        f"{sizes['max_batch_seconds']:g} s, crops of at most {sizes['max_sample_seconds']:g} s; "
        f"{args.steps} steps measured after {args.steps} warm-up steps, best of {args.repeats}"
    )

    def line(label: str, name: str, target: str = "") -> str:
        entry = best[name]
        rate = entry["audio_seconds_per_second"]
        text = f"    {label:<40}{rate:8.1f} audio-s/s  {rate / plain:5.2f}x the plain loop"
        text += f"  waiting for data {100 * entry['data_wait_share']:5.1f}% of step time{target}"
        return text + (f"  (S3 server: {entry['server_cores']:.2f} cores busy)" if "server_cores" in entry else "")

    print("(a) audio in memory")
    print(f"    {'plain torchaudio loop':<40}{plain:8.1f} audio-s/s")
    print(line(f"trainer, prefetch {PREFETCH_BATCHES}", "memory") + "  (target: ratio at least 0.95x)")
    print("(b) audio and labels on SeaweedFS S3 (loopback)")
    print(line("trainer, prefetch 0 (read in the step)", "s3-0"))
    print(line(f"trainer, prefetch {PREFETCH_BATCHES}", "s3", " (target: under 5%)"))


if __name__ == "__main__":
    main()
