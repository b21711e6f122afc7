"""The HuBERT paper's iteration-1 features: Kaldi MFCC (13 coefficients, no energy) + delta + delta-delta.

Computed exactly as fairseq's `dump_mfcc_feature.py` does, so labels made here match those made there.
"""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi
import torchaudio.functional

SAMPLE_RATE = 16_000
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
NUM_CEPS = 13
MFCC_DIM = 3 * NUM_CEPS
WINDOW_SAMPLES = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)
HOP_SAMPLES = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)
FRAME_RATE = SAMPLE_RATE / HOP_SAMPLES


def mfcc_num_frames(num_samples: int) -> int:
    """Kaldi's frame count with snip_edges: 1 + (samples - window) // hop, or 0 if shorter than a window."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // HOP_SAMPLES


def mfcc_with_deltas(waveform: torch.Tensor) -> torch.Tensor:
    """MFCC + deltas of a 16 kHz waveform.

    Args:
        waveform: (samples,) float, in [-1, 1) as soundfile reads it.
    Returns:
        (frames, 39) float32, frames = mfcc_num_frames(samples).
    """
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D waveform (samples,), got shape {tuple(waveform.shape)}")
    if waveform.shape[0] < WINDOW_SAMPLES:
        return torch.zeros((0, MFCC_DIM), dtype=torch.float32)
    mfccs = torchaudio.compliance.kaldi.mfcc(
        waveform=waveform.float().view(1, -1),
        sample_frequency=SAMPLE_RATE,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        num_ceps=NUM_CEPS,
        use_energy=False,
    ).transpose(0, 1)
    deltas = torchaudio.functional.compute_deltas(mfccs)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()
