"""Accelerator figures: training steps and layer-feature extraction of one model, with their MFU.

    python3 bench/gpu.py [--device cuda] [--model base] [--steps 20] [--minutes 20] [--layer 9]
                         [--features-batch-seconds 160] [--peak-tflops P]

Imports only `model/` and `bench/in_memory.py` (torch, torchaudio, numpy, pydantic), so it runs
where the pipeline's other parts are not installed, e.g. a GPU machine with its own torch: from the
repository root, `PYTHONPATH=. python3 bench/gpu.py`, with pydantic, pydantic-core, annotated-types
and typing-inspection carried as wheels where that machine lacks them.
The audio is noise and the labels random: the speed of a step does not depend on what is said.
`--minutes` of utterances of 2-20 s (LibriSpeech-like lengths, a fixed seed) are made in memory.

(a) Training: the trainer itself (model/trainer.py `train`, bf16 autocast on a GPU) over a
    `BatchStream` with its default prefetch, batches and crops of the config's defaults (87.5 s,
    15.625 s), `--steps` warm-up steps and then `--steps` measured: audio-seconds per second (the
    trainer's own `audio_seconds_per_second`), seconds per step and the share of step time spent
    waiting for data.
(b) Layer features: `extract_layer_features_batch` (what the feature stage's workers run) on
    the same utterances in groups of about `--features-batch-seconds` of audio, unmasked, in eval
    mode under inference mode (bf16 autocast on a GPU), after one warm-up group.

MFU = achieved FLOP/s / peak FLOP/s. The FLOPs are counted by torch's FlopCounterMode on real
batches (a training step: forward and backward; features: forward), per second of audio, so
padding counts as work done. The peak is measured in the same run (the best of ten square matrix
products, bf16 on a GPU, float32 on a CPU) and, with `--peak-tflops` or a known GPU, also the
vendor's dense figure (H100/H200 SXM bf16: 989 TFLOP/s). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import time
from collections.abc import Callable

import numpy as np
import torch
from in_memory import InMemoryUtterances, NoCheckpoints
from torch.utils.flop_counter import FlopCounterMode

from model.data import PREFETCH_BATCHES, BatchShape, BatchStream
from model.frames import SAMPLE_RATE
from model.hubert import build_pretrain_model, prepare_waveform
from model.layer_features import extract_layer_features_batch
from model.presets import HUBERT_CONFIGS, HubertConfig, frame_geometry
from model.trainer import TrainerSettings, bf16_autocast, forward_loss, train

K = 500
VENDOR_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peaks (SXM parts), by a name `torch.cuda.get_device_name` contains."""


def noise_utterances(minutes: float, architecture: HubertConfig, seed: int = 0) -> InMemoryUtterances:
    """Utterances of 2-20 s of noise with random labels at the model's frame rate, made once, in memory."""
    rng = np.random.default_rng(seed)
    geometry = frame_geometry(architecture)
    lengths: list[int] = []
    while sum(lengths) < minutes * 60 * SAMPLE_RATE:
        lengths.append(int(rng.uniform(2.0, 20.0) * SAMPLE_RATE))
    generator = torch.Generator().manual_seed(seed)
    items = [
        (0.1 * torch.randn(samples, generator=generator),
         torch.randint(K, (geometry.num_frames(samples),), generator=generator))
        for samples in lengths
    ]
    return InMemoryUtterances(items, lengths, [f"noise-{index:05d}" for index in range(len(lengths))])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_flops(work: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def measured_peak(device: torch.device) -> float:
    """FLOP/s of the best of ten square matrix products: bf16 8192^3 on a GPU, float32 2048^3 on a CPU."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(13):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def vendor_peak(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for part, tflops in VENDOR_PEAK_TFLOPS.items() if part in name), None)


def training_settings(steps: int) -> TrainerSettings:
    return TrainerSettings(
        steps=2 * steps, learning_rate=5e-4, warmup_steps=max(1, steps // 4), weight_decay=0.01, clip_norm=10.0,
        accumulation=1, checkpoint_every=2 * steps, log_every=steps, unmasked_weight=0.0, bf16=True,
    )


def training_figures(source: InMemoryUtterances, architecture: HubertConfig, steps: int, device: torch.device) -> dict[str, float]:
    """The trainer's measured half: audio-s/s, seconds per step, data wait; and FLOPs per audio second."""
    shape = BatchShape(
        labels_geometry=frame_geometry(architecture), model_geometry=frame_geometry(architecture),
        max_batch_samples=int(87.5 * SAMPLE_RATE), max_sample_size=int(15.625 * SAMPLE_RATE),
        prepare=functools.partial(prepare_waveform, architecture),
    )
    settings = training_settings(steps)
    torch.manual_seed(0)
    model = build_pretrain_model(architecture, num_classes=K)
    logged_at: list[float] = []
    history = train(model, BatchStream(source, shape, seed=0, prefetch=PREFETCH_BATCHES), settings, NoCheckpoints(),
                    device, on_log=lambda entry: logged_at.append(time.perf_counter()))
    entry = history[-1]

    flops = audio = 0
    for batch in itertools.islice(iter(BatchStream(source, shape, seed=1, prefetch=0)), 3):
        def step() -> None:
            loss, _ = forward_loss(model, batch, device, settings)
            loss.backward()
        flops += counted_flops(step)
        audio += float(batch.lengths.sum()) / SAMPLE_RATE
    model.zero_grad(set_to_none=True)
    return {
        "audio_seconds_per_second": entry["audio_seconds_per_second"],
        "seconds_per_step": (logged_at[-1] - logged_at[-2]) / steps,
        "data_wait_share": entry["data_wait_share"],
        "flops_per_audio_second": flops / audio,
    }


def feature_groups(source: InMemoryUtterances, seconds: float) -> list[list[int]]:
    """Consecutive utterances, about `seconds` of audio a group."""
    groups, group, total = [], [], 0
    for index, samples in enumerate(source.lengths):
        group.append(index)
        total += samples
        if total >= seconds * SAMPLE_RATE:
            groups.append(group)
            group, total = [], 0
    return groups + ([group] if group else [])


def feature_figures(
    source: InMemoryUtterances, architecture: HubertConfig, layer: int, group_seconds: float, device: torch.device
) -> dict[str, float]:
    """Layer features of every utterance: audio-s/s after a warm-up group, and FLOPs per audio second."""
    torch.manual_seed(0)
    encoder = build_pretrain_model(architecture, num_classes=K).wav2vec2.to(device)
    groups = feature_groups(source, group_seconds)

    def extract(group: list[int], mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode) -> None:
        waveforms = [source.items[index][0].to(device) for index in group]
        with mode(), bf16_autocast(device):
            extract_layer_features_batch(encoder, waveforms, layer, architecture)

    extract(groups[0])
    synchronize(device)
    started = time.perf_counter()
    for group in groups[1:]:
        extract(group)
    synchronize(device)
    seconds = time.perf_counter() - started
    audio = sum(source.lengths[index] for group in groups[1:] for index in group) / SAMPLE_RATE
    # Counted on the groups timed (padding differs between groups), under no_grad: under inference
    # mode the counter fails on the weight-normed positional conv.
    flops = counted_flops(lambda: [extract(group, torch.no_grad) for group in groups[1:]])
    return {"audio_seconds_per_second": audio / seconds, "flops_per_audio_second": flops / audio, "groups": len(groups) - 1}


def mfu_text(flops_per_second: float, measured: float, vendor: float | None) -> str:
    text = f"{flops_per_second / 1e12:8.2f} TFLOP/s = {100 * flops_per_second / measured:5.1f}% of the measured peak"
    return text + (f", {100 * flops_per_second / vendor:5.1f}% of the vendor's" if vendor else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="base", choices=sorted(HUBERT_CONFIGS))
    parser.add_argument("--steps", type=int, default=20, help="steps measured, after as many warm-up steps (default 20)")
    parser.add_argument("--minutes", type=float, default=20.0, help="audio made in memory (default 20)")
    parser.add_argument("--layer", type=int, default=9, help="layer whose features are extracted (default 9)")
    parser.add_argument("--features-batch-seconds", type=float, default=160.0, help="audio per extraction call (default 160)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for an MFU against it too")
    args = parser.parse_args()
    device = torch.device(args.device)
    architecture = HUBERT_CONFIGS[args.model]
    if not 1 <= args.layer <= architecture.encoder_num_layers:
        parser.error(f"--layer must be 1..{architecture.encoder_num_layers} for {args.model}")
    source = noise_utterances(args.minutes, architecture)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    measured, vendor = measured_peak(device), vendor_peak(device, args.peak_tflops)
    print(f"device: {name}; model {args.model} ({precision}); {len(source)} utterances, {sum(source.lengths) / SAMPLE_RATE / 60:.1f} min")
    print(f"peak: measured {measured / 1e12:.3g} TFLOP/s" + (f", vendor {vendor / 1e12:.4g} TFLOP/s" if vendor else ""))

    training = training_figures(source, architecture, args.steps, device)
    rate = training["audio_seconds_per_second"]
    print(f"(a) training, {args.steps} steps after {args.steps} warm-up, batches of at most 87.5 s, crops of at most 15.625 s")
    print(f"    {rate:10.1f} audio-s/s   {1000 * training['seconds_per_step']:8.1f} ms/step   "
          f"waiting for data {100 * training['data_wait_share']:.1f}% of step time")
    print(f"    {training['flops_per_audio_second'] / 1e9:,.1f} GFLOP per audio second (forward + backward); MFU "
          + mfu_text(rate * training["flops_per_audio_second"], measured, vendor))

    features = feature_figures(source, architecture, args.layer, args.features_batch_seconds, device)
    rate = features["audio_seconds_per_second"]
    print(f"(b) layer-{args.layer} features, {features['groups']} groups of about {args.features_batch_seconds:g} s after one warm-up")
    print(f"    {rate:10.1f} audio-s/s   ({rate * frame_geometry(architecture).frame_rate:,.0f} frames/s)")
    print(f"    {features['flops_per_audio_second'] / 1e9:,.1f} GFLOP per audio second (forward); MFU "
          + mfu_text(rate * features["flops_per_audio_second"], measured, vendor))


if __name__ == "__main__":
    main()
