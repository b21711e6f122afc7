"""Layer-L outputs of a trained encoder, the features the next iteration clusters.

The encoder is the pretraining model's `.wav2vec2`; features come from its
`extract_features(..., num_layers=layer)`: unmasked, in eval mode, without gradients. Frame i of
an utterance covers samples [i * hop, i * hop + receptive_field), so an utterance has exactly
`frame_geometry(config).num_frames(samples)` frames, whichever path computed them.

Long utterances are cut so memory stays bounded (self-attention grows with the square of the
length). torchaudio has no chunked inference, and its conv stack falls short of one in one place:
in BASE's "group_norm" mode the first conv layer is normalised with each channel's mean and
variance over the whole utterance, so conv features of a piece are not those of the utterance.
The conv stack is local apart from that, so we compute its output exactly, piece by piece, with
those statistics gathered over the whole utterance first (`_conv_features_in_pieces`). Only
attention is then windowed: each window of frames is extended by context on both sides and only
its core is kept. The same GroupNorm is why a padded batch cannot go through the conv stack in
one call (padding would enter the statistics): `extract_layer_features_batch` runs the conv stack
per utterance and batches the transformer, whose padding torchaudio masks exactly. A filterbank
front end (model/fbank.py) normalises over the whole utterance too; it is computed whole (it is
cheap) and only attention is windowed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.models import Wav2Vec2Model

from model.fbank import FbankFeatureExtractor
from model.hubert import prepare_waveform
from model.presets import HubertConfig, frame_geometry, hop, receptive_field

DEFAULT_MAX_CHUNK_SAMPLES = 16_000 * 30
DEFAULT_CONTEXT_SAMPLES = 16_000 * 2


def extract_layer_features(
    encoder: Wav2Vec2Model,
    waveform: Tensor,
    layer: int,
    config: HubertConfig,
    max_chunk_samples: int = DEFAULT_MAX_CHUNK_SAMPLES,
    context_samples: int = DEFAULT_CONTEXT_SAMPLES,
) -> Tensor:
    """Output of transformer layer `layer` (1-based) for one utterance.

    Up to `max_chunk_samples` samples this is exactly
    `encoder.extract_features(waveform[None], num_layers=layer)[0][layer - 1][0]` (after
    `prepare_waveform`, which leaves BASE's input as it is). A longer utterance gets exact conv
    features, and attention over windows: cores of max_chunk_samples // hop frames starting at
    multiples of that (so at sample multiples of the hop), each seeing context_samples (rounded up
    to whole frames) more on both sides, clipped to the utterance; each frame comes from the one
    core that holds it. Context should reach at least half the positional convolution
    (encoder_pos_conv_kernel // 2 frames, 1.28 s for the paper's models): frames nearer a window
    edge than that get a truncated positional embedding; the default 2 s does. Where the context
    reaches both ends of the utterance, values match the unwindowed ones to float tolerance. The
    encoder's train/eval mode is restored afterwards.

    Args:
        encoder: `build_pretrain_model(config, k).wav2vec2`, trained.
        waveform: (samples,) float at config.sample_rate.
        layer: 1 .. config.encoder_num_layers.
    Returns:
        (frame_geometry(config).num_frames(samples), encoder_embed_dim) in the encoder's dtype, on its device.
    """
    _check_waveform(waveform, "waveform")
    _check_arguments(encoder, layer, config, max_chunk_samples, context_samples)
    with _evaluating(encoder):
        return _extract(encoder, _prepare(encoder, config, waveform), layer, config, max_chunk_samples, context_samples)


def extract_layer_features_batch(
    encoder: Wav2Vec2Model,
    waveforms: list[Tensor],
    layer: int,
    config: HubertConfig,
    max_chunk_samples: int = DEFAULT_MAX_CHUNK_SAMPLES,
    context_samples: int = DEFAULT_CONTEXT_SAMPLES,
) -> list[Tensor]:
    """`extract_layer_features` of each utterance, the short ones in one padded transformer pass.

    Utterances up to `max_chunk_samples` go through the conv stack one by one (see the module
    docstring) and through the transformer together, padded, with `lengths` so attention ignores
    the padding; values equal the one-at-a-time ones to float tolerance. Longer ones take the
    windowed path. The caller bounds the batch's total length.

    Args:
        waveforms: each (samples,) float at config.sample_rate.
    Returns:
        Per utterance, in order, (frame_geometry(config).num_frames(samples), encoder_embed_dim) float32.
    """
    for index, waveform in enumerate(waveforms):
        _check_waveform(waveform, f"waveforms[{index}]")
    _check_arguments(encoder, layer, config, max_chunk_samples, context_samples)
    with _evaluating(encoder):
        prepared = [_prepare(encoder, config, waveform) for waveform in waveforms]
        batched = [
            index
            for index, waveform in enumerate(prepared)
            if frame_geometry(config).num_frames(waveform.shape[0]) > 0 and waveform.shape[0] <= max_chunk_samples
        ]
        results = dict(zip(batched, _transformer_batch(encoder, [prepared[index] for index in batched], layer)))
        for index, waveform in enumerate(prepared):
            if index not in results:
                results[index] = _extract(encoder, waveform, layer, config, max_chunk_samples, context_samples)
        return [results[index] for index in range(len(prepared))]


def _check_waveform(waveform: Tensor, name: str) -> None:
    if waveform.dim() != 1 or not waveform.is_floating_point():
        raise ValueError(
            f"expected {name} to be a 1-D float waveform (samples,), "
            f"got {waveform.dtype} of shape {tuple(waveform.shape)}"
        )


def _check_arguments(
    encoder: Wav2Vec2Model, layer: int, config: HubertConfig, max_chunk_samples: int, context_samples: int
) -> None:
    """The encoder must have the config's conv stack, or every frame count and window would be wrong."""
    extractor = encoder.feature_extractor
    if config.extractor == "fbank":
        if not isinstance(extractor, FbankFeatureExtractor) or (extractor.mel_bins, extractor.stack) != (
            config.fbank_mel_bins, config.fbank_stack
        ):
            raise ValueError(
                f"expected an encoder with a {config.fbank_mel_bins}-bin filterbank front end stacking "
                f"{config.fbank_stack} frames, got {type(extractor).__name__}"
            )
    else:
        if isinstance(extractor, FbankFeatureExtractor):
            raise ValueError("expected an encoder with a conv front end, got a filterbank one")
        actual = tuple((block.conv.out_channels, block.kernel_size, block.stride) for block in extractor.conv_layers)
        if actual != tuple(config.extractor_conv_layer_config):
            raise ValueError(f"expected an encoder with conv layers {config.extractor_conv_layer_config}, got {actual}")
    layers = len(encoder.encoder.transformer.layers)
    if not 1 <= layer <= layers:
        raise ValueError(f"expected a layer in 1..{layers}, got {layer}")
    one_frame = max(receptive_field(config), hop(config))
    if max_chunk_samples < one_frame:
        raise ValueError(f"expected max_chunk_samples >= {one_frame} (one frame), got {max_chunk_samples}")
    if context_samples < 0:
        raise ValueError(f"expected context_samples >= 0, got {context_samples}")


@contextlib.contextmanager
def _evaluating(encoder: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) without gradients, then the caller's mode back."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        encoder.train(was_training)


def _prepare(encoder: Wav2Vec2Model, config: HubertConfig, waveform: Tensor) -> Tensor:
    """The waveform as the model takes it, on the encoder's device and in its dtype."""
    parameter = next(encoder.parameters())
    return prepare_waveform(config, waveform.to(device=parameter.device, dtype=parameter.dtype))


def _extract(
    encoder: Wav2Vec2Model,
    waveform: Tensor,
    layer: int,
    config: HubertConfig,
    max_chunk_samples: int,
    context_samples: int,
) -> Tensor:
    """One prepared utterance (samples,) -> (frames, dim); shorter than one frame gives (0, dim)."""
    if frame_geometry(config).num_frames(waveform.shape[0]) == 0:
        return waveform.new_zeros((0, config.encoder_embed_dim))
    if waveform.shape[0] <= max_chunk_samples:
        return encoder.extract_features(waveform[None], num_layers=layer)[0][layer - 1][0]
    if config.extractor == "fbank":  # cheap and exact whole: per-utterance normalisation needs every frame
        conv = encoder.feature_extractor(waveform[None], None)[0][0]
    else:
        conv = _conv_features_in_pieces(encoder.feature_extractor, waveform, config, max_chunk_samples)
    core_frames = max_chunk_samples // hop(config)
    context_frames = -(-context_samples // hop(config))
    return _windowed_layer(encoder, conv, layer, core_frames, context_frames)


def _transformer_batch(encoder: Wav2Vec2Model, waveforms: list[Tensor], layer: int) -> list[Tensor]:
    """Conv stack per utterance, transformer on the zero-padded batch with lengths; (frames_b, dim) each."""
    if not waveforms:
        return []
    conv = [encoder.feature_extractor(waveform[None], None)[0][0] for waveform in waveforms]
    lengths = torch.tensor([features.shape[0] for features in conv], device=conv[0].device)
    padded = nn.utils.rnn.pad_sequence(conv, batch_first=True)
    output = encoder.encoder.extract_features(padded, lengths, num_layers=layer)[layer - 1]
    return [output[row, :length] for row, length in enumerate(lengths.tolist())]


def _first_norm_affine(first: nn.Module, waveform: Tensor, max_chunk_samples: int) -> tuple[Tensor, Tensor]:
    """GroupNorm of the first conv layer over the whole utterance, as a per-channel (scale, shift).

    Its output frame j covers samples [j * stride, j * stride + kernel); the sums run over pieces
    of whole frames, summed in float64, so the result matches one GroupNorm over the utterance.
    """
    norm: nn.GroupNorm = first.layer_norm
    kernel, stride = first.kernel_size, first.stride
    total = (waveform.shape[0] - kernel) // stride + 1
    per_piece = (max_chunk_samples - kernel) // stride + 1
    sums = torch.zeros((2, norm.num_channels), dtype=torch.float64, device=waveform.device)
    for start in range(0, total, per_piece):
        stop = min(start + per_piece, total)
        output = first.conv(waveform[start * stride : (stop - 1) * stride + kernel][None, None])[0]
        sums[0] += output.sum(dim=1, dtype=torch.float64)
        sums[1] += output.square().sum(dim=1, dtype=torch.float64)
    group = norm.num_channels // norm.num_groups
    count = total * group
    grouped = sums.view(2, norm.num_groups, group).sum(dim=2) / count
    mean = grouped[0].repeat_interleave(group)
    variance = (grouped[1] - grouped[0].square()).clamp_min(0.0).repeat_interleave(group)
    scale = norm.weight.double() / torch.sqrt(variance + norm.eps)
    return scale.to(waveform.dtype), (norm.bias.double() - mean * scale).to(waveform.dtype)


def _conv_stack(extractor: nn.Module, samples: Tensor, first_affine: tuple[Tensor, Tensor] | None) -> Tensor:
    """torchaudio's conv blocks on (samples,) -> (frames, channels), the first GroupNorm replaced by `first_affine`."""
    x = samples[None, None]
    for index, block in enumerate(extractor.conv_layers):
        if index == 0 and first_affine is not None:
            scale, shift = first_affine
            x = F.gelu(block.conv(x) * scale[:, None] + shift[:, None])
        else:
            x, _ = block(x, None)
    return x[0].T


def _conv_features_in_pieces(
    extractor: nn.Module, waveform: Tensor, config: HubertConfig, max_chunk_samples: int
) -> Tensor:
    """The conv stack's output (frames, channels) for a whole utterance, max_chunk_samples at a time.

    Frames [start, stop) need samples [start * hop, (stop - 1) * hop + receptive_field); a piece
    starting at a multiple of the hop lines up with every layer's frames, so pieces are exact.
    """
    first = extractor.conv_layers[0]
    first_affine = None
    if isinstance(first.layer_norm, nn.GroupNorm):
        first_affine = _first_norm_affine(first, waveform, max_chunk_samples)
    step, field = hop(config), receptive_field(config)
    total = frame_geometry(config).num_frames(waveform.shape[0])
    per_piece = (max_chunk_samples - field) // step + 1
    pieces = []
    for start in range(0, total, per_piece):
        stop = min(start + per_piece, total)
        pieces.append(_conv_stack(extractor, waveform[start * step : (stop - 1) * step + field], first_affine))
    return torch.cat(pieces)


def _windowed_layer(
    encoder: Wav2Vec2Model, conv: Tensor, layer: int, core_frames: int, context_frames: int
) -> Tensor:
    """Layer output (frames, dim) of conv features (frames, channels), attention in windows.

    Window cores [start, start + core_frames) tile the frames; each runs with context_frames more
    on both sides (clipped) and keeps its core, so every frame is produced once and in order.
    """
    total = conv.shape[0]
    pieces = []
    for start in range(0, total, core_frames):
        stop = min(start + core_frames, total)
        left, right = max(start - context_frames, 0), min(stop + context_frames, total)
        output = encoder.encoder.extract_features(conv[None, left:right], num_layers=layer)[layer - 1]
        pieces.append(output[0, start - left : stop - left])
    return torch.cat(pieces)
