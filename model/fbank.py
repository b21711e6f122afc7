"""A fixed log-mel filterbank front end for the HuBERT encoder, in place of the learned conv stack.

MelHuBERT (Lin et al., 2022) and Fast-HuBERT (Yang et al., 2023) feed the transformer log-mel
filterbanks instead of learning a conv stack on the waveform: 80 log-mel bins every 10 ms, two
frames stacked into one 50 Hz frame, and a linear projection into the transformer. On a CPU that
removes the conv stack's cost and, more to the point for short trainings, the transformer starts
from a spectral representation instead of having to learn one.

Geometry: frame i of this front end has exactly the conv stack's frame count and centre
(`FrameGeometry(hop=320, window=400)` for the default stack of 2): the waveform is padded by
80 * (stack - 1) samples on each side, Kaldi-style 25 ms windows every 10 ms are taken, and stacked
frame i joins filterbank frames stack * i .. stack * i + stack - 1, whose windows span
[hop * i - 80 (stack - 1), hop * i + 400 + 80 (stack - 1)), centred on hop * i + 200 like conv frame i;
their count, floor(fbank frames / stack), equals 1 + (samples - 400) // hop. So labels, layer
features and frame times line up with BASE-geometry models and 50 Hz labels map one to one.

Normalisation: log-mel with per-utterance mean and variance normalisation over the utterance's own
frames (lengths respected in padded batches), which also makes the features indifferent to the
recording's gain and, to first order, its channel. The projection's LayerNorm then normalises each
frame, as for conv features.

Export: Hugging Face `transformers.HubertModel` hard-codes the conv feature encoder
(`HubertFeatureEncoder`, configured by conv_dim/conv_kernel/conv_stride): it cannot express a
filterbank, so a model with this front end does not export to HubertModel (model/hf_convert.py
refuses it), and neither can torchaudio's `wav2vec2_model`, so `export` refuses such a model.
"""

from __future__ import annotations

import functools

import torch
import torchaudio.compliance.kaldi
from torch import Tensor, nn

from model.presets import FBANK_HOP, FBANK_WINDOW

FFT_SIZE = 512
PREEMPHASIS = 0.97
PAD_PER_STACKED_FRAME = FBANK_HOP // 2  # samples of padding each side per extra stacked frame


@functools.cache
def _constants(mel_bins: int, sample_rate: int) -> tuple[Tensor, Tensor]:
    """Povey window (400,) and Kaldi mel filters (FFT_SIZE // 2 + 1, mel_bins)."""
    window = torch.hann_window(FBANK_WINDOW, periodic=False, dtype=torch.float64).pow(0.85).float()
    banks, _ = torchaudio.compliance.kaldi.get_mel_banks(mel_bins, FFT_SIZE, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).T.contiguous()
    return window, banks


def stacked_frames(samples: int, stack: int) -> int:
    """Stacked frames of an utterance of `samples`: 1 + (samples - 400) // (160 * stack), 0 if shorter than 400."""
    if samples < FBANK_WINDOW:
        return 0
    return 1 + (samples - FBANK_WINDOW) // (FBANK_HOP * stack)


class FbankFeatureExtractor(nn.Module):
    """(waveforms (batch, samples), lengths (batch,) or None) -> (features (batch, frames, mel_bins * stack), lengths).

    A drop-in for torchaudio's `FeatureExtractor` (the `wav2vec2.feature_extractor` of a model):
    no parameters, the same call and return signature.
    """

    def __init__(self, mel_bins: int = 80, stack: int = 2, sample_rate: int = 16_000) -> None:
        super().__init__()
        if mel_bins < 1 or stack < 1:
            raise ValueError(f"expected mel_bins >= 1 and stack >= 1, got {mel_bins}, {stack}")
        self.mel_bins, self.stack, self.sample_rate = mel_bins, stack, sample_rate
        self.output_dim = mel_bins * stack

    def forward(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms of shape (batch, samples), got {tuple(waveforms.shape)}")
        batch, samples = waveforms.shape
        frames_out = stacked_frames(samples, self.stack)
        if frames_out == 0:
            empty = waveforms.new_zeros((batch, 0, self.output_dim))
            return empty, None if lengths is None else torch.zeros_like(lengths)
        pad = PAD_PER_STACKED_FRAME * (self.stack - 1)
        x = torch.nn.functional.pad(waveforms.float(), (pad, pad))
        window, banks = _constants(self.mel_bins, self.sample_rate)
        window, banks = window.to(x.device), banks.to(x.device)
        frames = x.unfold(1, FBANK_WINDOW, FBANK_HOP)[:, : frames_out * self.stack]  # (batch, n, 400)
        frames = frames - frames.mean(dim=2, keepdim=True)
        emphasised = torch.cat([frames[..., :1] * (1 - PREEMPHASIS), frames[..., 1:] - PREEMPHASIS * frames[..., :-1]], dim=2)
        spectrum = torch.fft.rfft(emphasised * window, n=FFT_SIZE)
        power = spectrum.real.square() + spectrum.imag.square()
        log_mel = torch.clamp_min(power @ banks, 1e-10).log()  # (batch, n, mel)
        if lengths is None:
            out_lengths = None
            valid = torch.full((batch,), frames_out * self.stack, device=x.device)
        else:
            out_lengths = torch.tensor([stacked_frames(int(n), self.stack) for n in lengths.tolist()], device=lengths.device)
            valid = out_lengths * self.stack
        mask = (torch.arange(log_mel.shape[1], device=x.device)[None, :] < valid[:, None]).unsqueeze(2).float()
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (log_mel * mask).sum(dim=1, keepdim=True) / count
        variance = ((log_mel - mean).square() * mask).sum(dim=1, keepdim=True) / count
        normalised = (log_mel - mean) / torch.sqrt(variance + 1e-5) * mask
        stacked = normalised.reshape(batch, frames_out, self.stack * self.mel_bins)
        return stacked, out_lengths
