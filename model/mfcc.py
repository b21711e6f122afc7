"""The HuBERT paper's iteration-1 features: Kaldi MFCC (13 coefficients, no energy) + delta + delta-delta.

Values match fairseq's `dump_mfcc_feature.py` (torchaudio.compliance.kaldi.mfcc with
use_energy=False, then compute_deltas twice) to float tolerance; tests hold us to that. The code
is our own for speed (1.6x torchaudio's on one core): torchaudio's version rebuilds its window and
filters on every call, copies the frames at each step and computes an energy it then drops. One
utterance at a time, not a whole chunk in one batch: per-utterance arrays stay in cache, and
batching measured slower.
"""

from __future__ import annotations

import functools
import math

import torch
import torchaudio.compliance.kaldi
import torchaudio.functional

from model.frames import SAMPLE_RATE, FrameGeometry

FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
NUM_CEPS = 13
NUM_MEL_BINS = 23
CEPSTRAL_LIFTER = 22.0
PREEMPHASIS = 0.97
MFCC_DIM = 3 * NUM_CEPS
WINDOW_SAMPLES = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)
HOP_SAMPLES = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)
FFT_SIZE = 1 << (WINDOW_SAMPLES - 1).bit_length()
MFCC_GEOMETRY = FrameGeometry(hop=HOP_SAMPLES, window=WINDOW_SAMPLES)
"""Kaldi's framing with snip_edges: whole 25 ms windows every 10 ms."""


@functools.cache
def _constants() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kaldi's povey window, mel filters (FFT bins x mel) and liftered DCT (mel x ceps)."""
    window = torch.hann_window(WINDOW_SAMPLES, periodic=False, dtype=torch.float64).pow(0.85).float()
    mel_banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
        NUM_MEL_BINS, FFT_SIZE, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0
    )
    mel_banks = torch.nn.functional.pad(mel_banks, (0, 1)).T.contiguous()
    dct = torchaudio.functional.create_dct(NUM_MEL_BINS, NUM_MEL_BINS, "ortho")
    dct[:, 0] = math.sqrt(1 / NUM_MEL_BINS)
    lifter = 1.0 + 0.5 * CEPSTRAL_LIFTER * torch.sin(math.pi * torch.arange(NUM_CEPS) / CEPSTRAL_LIFTER)
    return window, mel_banks, (dct[:, :NUM_CEPS] * lifter).contiguous()


def _kaldi_mfcc(frames: torch.Tensor) -> torch.Tensor:
    """(frames, WINDOW_SAMPLES) raw frames -> (frames, NUM_CEPS), as Kaldi's compute-mfcc-feats."""
    window, mel_banks, dct = _constants()
    frames = frames - frames.mean(dim=1, keepdim=True)
    padded = torch.zeros((frames.shape[0], FFT_SIZE), dtype=torch.float32)
    padded[:, 1:WINDOW_SAMPLES] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
    padded[:, 0] = frames[:, 0] * (1 - PREEMPHASIS)
    padded[:, :WINDOW_SAMPLES] *= window
    spectrum = torch.fft.rfft(padded)
    power = spectrum.real.square() + spectrum.imag.square()
    log_mel = torch.clamp_min(power @ mel_banks, torch.finfo(torch.float32).eps).log_()
    return log_mel @ dct


def _deltas(features: torch.Tensor) -> torch.Tensor:
    """torchaudio.functional.compute_deltas over time (window 5, edges replicated) of (frames, dims)."""
    last = features.shape[0] - 1
    position = torch.arange(features.shape[0])
    total = torch.zeros_like(features)
    for step in (1, 2):
        total += step * (features[torch.clamp(position + step, max=last)] - features[torch.clamp(position - step, min=0)])
    return total / 10


def mfcc_with_deltas(waveform: torch.Tensor) -> torch.Tensor:
    """MFCC + deltas of a 16 kHz waveform.

    Args:
        waveform: (samples,) float, in [-1, 1) as soundfile reads it.
    Returns:
        (frames, 39) float32, frames = MFCC_GEOMETRY.num_frames(samples).
    """
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D waveform (samples,), got shape {tuple(waveform.shape)}")
    if waveform.shape[0] < WINDOW_SAMPLES:
        return torch.zeros((0, MFCC_DIM), dtype=torch.float32)
    mfccs = _kaldi_mfcc(waveform.float().unfold(0, WINDOW_SAMPLES, HOP_SAMPLES))
    deltas = _deltas(mfccs)
    return torch.cat([mfccs, deltas, _deltas(deltas)], dim=1)
