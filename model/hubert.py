"""The HuBERT pretraining network: architecture presets, frame geometry, builder and loss.

The network itself is torchaudio's `HuBERTPretrainModel` (built by `hubert_pretrain_model`); its
`.wav2vec2` is the encoder whose layer outputs feed the next iteration's k-means. What is ours:
the presets as one typed, frozen config (torchaudio's presets are functions that fix most knobs
and cannot be stored with a checkpoint), frame geometry derived from the conv stack instead of
retyped, and a loss that reports the frame counts a trainer needs to average over frames.

How torchaudio arranges the logits (torchaudio/models/wav2vec2/components.py, `_compute_logits`):
each row of `logit_m` (masked frames) and `logit_u` (unmasked frames) has num_classes + 1
columns of cosine similarity / 0.1 (the paper's temperature, fixed inside torchaudio). Column 0
is the frame's own label embedding, columns 1.. are all label embeddings in class order, with
the frame's own class set to -inf so it is not counted twice. The target of every row is
therefore index 0, not the label; accuracy is argmax == 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
import torchaudio.models
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from model.frames import FrameGeometry


class HubertConfig(BaseModel):
    """Every architecture knob of torchaudio's `hubert_pretrain_model` that a preset varies.

    Field names are torchaudio's argument names, so `build_pretrain_model` passes them straight
    through; the comments give fairseq's names where they differ (fairseq's hubert configs are
    what the paper trained with). Knobs no preset varies (static span lengths, no channel
    masking, overlapping spans, logits on masked and unmasked frames) are fixed in the builder.
    Two fields are not torchaudio's: whether the input is normalised, and the sample rate.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # fairseq: extractor_mode ("default" is group_norm: one GroupNorm after the first conv).
    extractor_mode: Literal["group_norm", "layer_norm"]
    # (out_channels, kernel, stride) per conv layer; fairseq: conv_feature_layers.
    extractor_conv_layer_config: tuple[tuple[int, int, int], ...] = Field(min_length=1)
    # fairseq: conv_bias.
    extractor_conv_bias: bool = False
    encoder_embed_dim: int = Field(gt=0)
    # Dropout after projecting conv features to encoder_embed_dim; fairseq: dropout_input.
    encoder_projection_dropout: float = Field(ge=0.0, lt=1.0)
    # Convolutional positional embedding; fairseq: conv_pos, conv_pos_groups.
    encoder_pos_conv_kernel: int = Field(gt=0)
    encoder_pos_conv_groups: int = Field(gt=0)
    # fairseq: encoder_layers, encoder_attention_heads.
    encoder_num_layers: int = Field(gt=0)
    encoder_num_heads: int = Field(gt=0)
    # fairseq: attention_dropout.
    encoder_attention_dropout: float = Field(ge=0.0, lt=1.0)
    # Feed-forward width and the dropout after its activation; fairseq: encoder_ffn_embed_dim,
    # activation_dropout.
    encoder_ff_interm_features: int = Field(gt=0)
    encoder_ff_interm_dropout: float = Field(ge=0.0, lt=1.0)
    # fairseq: dropout.
    encoder_dropout: float = Field(ge=0.0, lt=1.0)
    # fairseq: layer_norm_first.
    encoder_layer_norm_first: bool
    # fairseq: encoder_layerdrop.
    encoder_layer_drop: float = Field(ge=0.0, lt=1.0)
    final_dim: int = Field(gt=0)
    # fairseq's mask_prob is span starts per frame times mask_length: 0.8 with spans of 10 is the
    # paper's start probability of 0.08, which masks about half of the frames.
    mask_prob: float = Field(ge=0.0, le=1.0)
    mask_length: int = Field(gt=0)
    # Gradient scale into the conv stack; None is fairseq's 1.0 (torchaudio refuses 1.0 itself).
    feature_grad_mult: float | None = Field(gt=0.0, lt=1.0)
    # Layer-normalise each utterance's waveform before the model; fairseq: task.normalize, which
    # its configs tie to the extractor (True for the layer_norm models). See `prepare_waveform`.
    normalize_waveform: bool = False
    # The rate the conv geometry is measured at; HuBERT's data is 16 kHz.
    sample_rate: int = Field(default=16_000, gt=0)

    @model_validator(mode="after")
    def _check_shapes(self) -> HubertConfig:
        for channels, kernel, stride in self.extractor_conv_layer_config:
            if channels <= 0 or kernel <= 0 or stride <= 0:
                raise ValueError(
                    f"conv layers need positive (channels, kernel, stride), got {self.extractor_conv_layer_config}"
                )
        for name in ("encoder_num_heads", "encoder_pos_conv_groups"):
            if self.encoder_embed_dim % getattr(self, name):
                raise ValueError(
                    f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by {name} {getattr(self, name)}"
                )
        return self


_PAPER_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2

HUBERT_CONFIGS: dict[str, HubertConfig] = {
    # fairseq examples/hubert/config/pretrain/hubert_base_librispeech.yaml (= torchaudio's base).
    "base": HubertConfig(
        extractor_mode="group_norm",
        extractor_conv_layer_config=_PAPER_CONV,
        encoder_embed_dim=768,
        encoder_projection_dropout=0.1,
        encoder_pos_conv_kernel=128,
        encoder_pos_conv_groups=16,
        encoder_num_layers=12,
        encoder_num_heads=12,
        encoder_attention_dropout=0.1,
        encoder_ff_interm_features=3072,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.1,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.05,
        final_dim=256,
        mask_prob=0.8,
        mask_length=10,
        feature_grad_mult=0.1,
    ),
    # hubert_large_librivox.yaml: no dropout, full conv gradient (feature_grad_mult 1.0).
    "large": HubertConfig(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=_PAPER_CONV,
        encoder_embed_dim=1024,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=128,
        encoder_pos_conv_groups=16,
        encoder_num_layers=24,
        encoder_num_heads=16,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=4096,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=True,
        encoder_layer_drop=0.0,
        final_dim=768,
        mask_prob=0.8,
        mask_length=10,
        feature_grad_mult=None,
        normalize_waveform=True,
    ),
    # Ours, for CPU runs and tests: BASE's kernels and strides (so the same 400-sample window and
    # 20 ms hop, and labels line up as for BASE) with 64 channels, and 6 layers of 192: 2.9 M
    # parameters, about 0.1 s for forward and backward of 10 s of audio on 2 CPU cores. On the
    # demo corpus's MFCC labels it learned as well as 128 channels and 4 layers of 256, at twice
    # the speed. Layer drop would remove a third of the model, and a model this small has no use
    # for dropout.
    "tiny": HubertConfig(
        extractor_mode="group_norm",
        extractor_conv_layer_config=tuple((64, kernel, stride) for _, kernel, stride in _PAPER_CONV),
        encoder_embed_dim=192,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=64,
        encoder_pos_conv_groups=16,
        encoder_num_layers=6,  # so that the paper's iteration-2 setting, layer 6, exists
        encoder_num_heads=4,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=768,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        final_dim=64,
        mask_prob=0.8,
        mask_length=10,
        feature_grad_mult=0.1,
    ),
}
# hubert_xlarge_librivox.yaml: LARGE, wider and twice as deep.
HUBERT_CONFIGS["xlarge"] = HUBERT_CONFIGS["large"].model_copy(
    update={"encoder_embed_dim": 1280, "encoder_num_layers": 48, "encoder_ff_interm_features": 5120, "final_dim": 1024}
)


def hop(config: HubertConfig) -> int:
    """Samples between frames: the product of the conv strides (320 for the paper's stack)."""
    return math.prod(stride for _, _, stride in config.extractor_conv_layer_config)


def receptive_field(config: HubertConfig) -> int:
    """Samples one frame sees: frame i covers [i * hop, i * hop + receptive_field) (400 for the paper's).

    Each layer widens the window by (kernel - 1) steps of the stride accumulated below it.
    """
    field, step = 1, 1
    for _, kernel, stride in config.extractor_conv_layer_config:
        field += (kernel - 1) * step
        step *= stride
    return field


def frame_geometry(config: HubertConfig) -> FrameGeometry:
    """The conv stack's framing: frame i covers [i * hop, i * hop + receptive_field).

    Its `num_frames` equals what the conv layers output, counted layer by layer (tests hold us to it).
    """
    return FrameGeometry(hop=hop(config), window=receptive_field(config))


def prepare_waveform(config: HubertConfig, waveform: Tensor) -> Tensor:
    """What the model is fed for one utterance: as read, or layer-normalised over the whole utterance.

    fairseq normalises the waveform of the layer_norm models (task.normalize) and torchaudio's
    pretrained LARGE bundles do too; the model does not do it itself, so training data and feature
    extraction both call this, per utterance, before any padding or chunking.

    Args:
        waveform: (samples,) float.
    Returns:
        (samples,), the same tensor when `config.normalize_waveform` is False.
    """
    if waveform.dim() != 1:
        raise ValueError(f"expected a 1-D waveform (samples,), got shape {tuple(waveform.shape)}")
    if not config.normalize_waveform:
        return waveform
    return F.layer_norm(waveform, waveform.shape)


def build_pretrain_model(config: HubertConfig, num_classes: int) -> torchaudio.models.HuBERTPretrainModel:
    """A freshly initialised torchaudio `HuBERTPretrainModel` for `num_classes` k-means labels.

    Its forward takes waveforms (batch, samples), labels (batch, num_frames) and optional
    audio_lengths (batch,), and returns (logit_m, logit_u, feature_penalty) for `hubert_loss`.
    """
    if num_classes < 1:
        raise ValueError(f"expected num_classes >= 1, got {num_classes}")
    architecture = config.model_dump(exclude={"normalize_waveform", "sample_rate"})
    architecture["extractor_conv_layer_config"] = [tuple(layer) for layer in config.extractor_conv_layer_config]
    return torchaudio.models.hubert_pretrain_model(
        **architecture,
        mask_selection="static",
        mask_other=0.0,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_prob=0.0,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        mask_channel_length=10,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        num_classes=num_classes,
    )


def _check_logits(name: str, logits: Tensor, columns: int | None) -> None:
    if logits.dim() != 2 or (columns is not None and logits.shape[1] != columns):
        expected = f"(frames, {columns})" if columns is not None else "(frames, num_classes + 1)"
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(logits.shape)}")


def _sum_and_correct(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy against column 0 (the true label's column) and how often argmax hits it."""
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    summed = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(dim=1) == 0).sum()
    return summed, correct


def hubert_loss(
    logit_m: Tensor,
    logit_u: Tensor | None,
    feature_penalty: Tensor,
    *,
    unmasked_weight: float = 0.0,
    feature_penalty_weight: float = 10.0,
) -> tuple[Tensor, dict[str, float]]:
    """HuBERT's loss for one batch, per masked frame, with the counts to weight batches by.

    loss = (sum of cross-entropy over masked frames
            + unmasked_weight * sum over unmasked frames) / masked_frames
           + feature_penalty_weight * feature_penalty

    Why per masked frame: the number of masked frames varies from batch to batch, so a trainer
    that accumulates gradients over micro-batches (or ranks) weights each loss by its
    `masked_frames` and divides by their total; that yields fairseq's objective exactly
    (fairseq sums the cross-entropy, adds the penalty times the frame count, and divides by the
    frame count of the whole update). torchaudio's examples/hubert `hubert_loss` sums too but adds
    the penalty unscaled, so after its division by frames the penalty counts for almost nothing;
    here it keeps fairseq's weight. With unmasked_weight > 0 fairseq would also count the unmasked
    frames in the divisor; we keep masked frames so the normaliser is the same whatever the
    weight (the difference is a constant factor on the learning rate).

    Args:
        logit_m: (masked_frames, num_classes + 1) from `HuBERTPretrainModel`; target column 0.
        logit_u: (unmasked_frames, num_classes + 1), or None when not computed.
        feature_penalty: () or (1,), mean square of the conv features.
        unmasked_weight: weight of the unmasked frames' cross-entropy (the paper uses 0).
        feature_penalty_weight: fairseq's loss_weights [10].
    Returns:
        The scalar loss, and floats: masked_accuracy, unmasked_accuracy (0 where there are no such
        frames), masked_frames, unmasked_frames, masked_loss and unmasked_loss (mean cross-entropy
        per frame) and feature_penalty.
    """
    _check_logits("logit_m", logit_m, None)
    if logit_u is not None:
        _check_logits("logit_u", logit_u, logit_m.shape[1])
    elif unmasked_weight:
        raise ValueError(f"unmasked_weight is {unmasked_weight} but logit_u is None")
    if feature_penalty.numel() != 1:
        raise ValueError(f"expected a scalar feature_penalty of shape () or (1,), got {tuple(feature_penalty.shape)}")

    masked_frames = logit_m.shape[0]
    unmasked_frames = 0 if logit_u is None else logit_u.shape[0]
    summed_m, correct_m = _sum_and_correct(logit_m)
    objective = summed_m
    summed_u, correct_u = summed_m.new_zeros(()), correct_m.new_zeros(())
    if logit_u is not None:
        summed_u, correct_u = _sum_and_correct(logit_u)
        if unmasked_weight:
            objective = objective + unmasked_weight * summed_u
    penalty = feature_penalty.reshape(())
    loss = objective / max(masked_frames, 1) + feature_penalty_weight * penalty
    # One transfer to the host for all the metrics, not one per number.
    values = torch.stack([correct_m.double(), correct_u.double(), summed_m.detach().double(),
                          summed_u.detach().double(), penalty.detach().double()]).tolist()
    hits_m, hits_u, total_m, total_u, penalty_value = values
    metrics = {
        "masked_accuracy": hits_m / max(masked_frames, 1),
        "unmasked_accuracy": hits_u / max(unmasked_frames, 1),
        "masked_frames": float(masked_frames),
        "unmasked_frames": float(unmasked_frames),
        "masked_loss": total_m / max(masked_frames, 1),
        "unmasked_loss": total_u / max(unmasked_frames, 1),
        "feature_penalty": penalty_value,
    }
    return loss, metrics


LABEL_DEPENDENT = ("logit_generator.",)
"""Parameters tied to one iteration's labels: torchaudio's `LogitGenerator` holds the label
embeddings (num_classes, final_dim) and the final projection into their space."""


def warm_start(model: torchaudio.models.HuBERTPretrainModel, previous: dict[str, Tensor]) -> list[str]:
    """Load an earlier model's state dict into `model`, except what depends on its labels.

    Everything but `LABEL_DEPENDENT` parameters, and any parameter whose shape differs, is copied;
    those keep `model`'s fresh initialisation. Returns the names left fresh.
    """
    own = model.state_dict()
    taken = {
        name: value
        for name, value in previous.items()
        if name in own and not name.startswith(LABEL_DEPENDENT) and tuple(value.shape) == tuple(own[name].shape)
    }
    model.load_state_dict(taken, strict=False)
    return sorted(set(own) - set(taken))
