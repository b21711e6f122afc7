"""HuBERT architectures as typed, frozen configs, and the frame geometry of their conv stacks.

Plain pydantic and arithmetic (no torch), so a config can name and check a preset, and a record
can carry one, without loading torch. model/hubert.py builds the network from these.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.frames import FrameGeometry

MAX_PARAMETERS = 4_000_000_000
MAX_CONV_CHANNELS = 8192
MAX_CONV_KERNEL = 1024
FBANK_WINDOW = 400  # a filterbank front end's analysis window: 25 ms at 16 kHz
FBANK_HOP = 160  # and its hop: 10 ms


class HubertConfig(BaseModel):
    """Every architecture knob of torchaudio's `hubert_pretrain_model` that a preset varies.

    Field names are torchaudio's argument names, so `build_pretrain_model` passes them straight
    through; the comments give fairseq's names where they differ (fairseq's hubert configs are
    what the paper trained with). Knobs no preset varies (static span lengths, no channel
    masking, overlapping spans, logits on masked and unmasked frames) are fixed in the builder.
    Two fields are not torchaudio's: whether the input is normalised, and the sample rate.

    Every size has a ceiling well above the largest preset (xlarge: 48 layers of 1280, about 1 G
    parameters), and the whole network one of `MAX_PARAMETERS`: a record or weights file read
    from the store names an architecture before any model is built, and a hostile one must not
    make a worker allocate terabytes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # fairseq: extractor_mode ("default" is group_norm: one GroupNorm after the first conv).
    extractor_mode: Literal["group_norm", "layer_norm"]
    # (out_channels, kernel, stride) per conv layer; fairseq: conv_feature_layers.
    extractor_conv_layer_config: tuple[tuple[int, int, int], ...] = Field(min_length=1, max_length=32)
    # fairseq: conv_bias.
    extractor_conv_bias: bool = False
    encoder_embed_dim: int = Field(gt=0, le=8192)
    # Dropout after projecting conv features to encoder_embed_dim; fairseq: dropout_input.
    encoder_projection_dropout: float = Field(ge=0.0, lt=1.0)
    # Convolutional positional embedding; fairseq: conv_pos, conv_pos_groups.
    encoder_pos_conv_kernel: int = Field(gt=0, le=1024)
    encoder_pos_conv_groups: int = Field(gt=0, le=1024)
    # fairseq: encoder_layers, encoder_attention_heads.
    encoder_num_layers: int = Field(gt=0, le=256)
    encoder_num_heads: int = Field(gt=0, le=256)
    # fairseq: attention_dropout.
    encoder_attention_dropout: float = Field(ge=0.0, lt=1.0)
    # Feed-forward width and the dropout after its activation; fairseq: encoder_ffn_embed_dim,
    # activation_dropout.
    encoder_ff_interm_features: int = Field(gt=0, le=65536)
    encoder_ff_interm_dropout: float = Field(ge=0.0, lt=1.0)
    # fairseq: dropout.
    encoder_dropout: float = Field(ge=0.0, lt=1.0)
    # fairseq: layer_norm_first.
    encoder_layer_norm_first: bool
    # fairseq: encoder_layerdrop.
    encoder_layer_drop: float = Field(ge=0.0, lt=1.0)
    final_dim: int = Field(gt=0, le=8192)
    # fairseq's mask_prob is span starts per frame times mask_length: 0.8 with spans of 10 is the
    # paper's start probability of 0.08, which masks about half of the frames.
    mask_prob: float = Field(ge=0.0, le=1.0)
    mask_length: int = Field(gt=0, le=10_000)
    # Gradient scale into the conv stack; None is fairseq's 1.0 (torchaudio refuses 1.0 itself).
    feature_grad_mult: float | None = Field(gt=0.0, lt=1.0)
    # Layer-normalise each utterance's waveform before the model; fairseq: task.normalize, which
    # its configs tie to the extractor (True for the layer_norm models). See `prepare_waveform`.
    normalize_waveform: bool = False
    # The rate the conv geometry is measured at; HuBERT's data is 16 kHz.
    sample_rate: int = Field(default=16_000, gt=0, le=384_000)
    # Front end: the learned conv stack above (the paper's), or a fixed log-mel filterbank
    # (model/fbank.py: fbank_mel_bins bins every 10 ms, fbank_stack frames stacked, projected
    # linearly into the transformer; MelHuBERT, Fast-HuBERT). With "fbank" the conv layer config
    # is not built; the frame geometry is (hop 160 * fbank_stack, window 400), the conv stack's for
    # a stack of 2. Transformers' HubertModel cannot hold it (model/hf_convert.py refuses it).
    extractor: Literal["conv", "fbank"] = "conv"
    fbank_mel_bins: int = Field(default=80, gt=0, le=512)
    fbank_stack: int = Field(default=2, gt=0, le=8)

    @model_validator(mode="after")
    def _check_shapes(self) -> HubertConfig:
        for channels, kernel, stride in self.extractor_conv_layer_config:
            if not (0 < channels <= MAX_CONV_CHANNELS and 0 < kernel <= MAX_CONV_KERNEL and 0 < stride <= MAX_CONV_KERNEL):
                raise ValueError(
                    f"conv layers need (channels, kernel, stride) in (0, {MAX_CONV_CHANNELS}], (0, {MAX_CONV_KERNEL}], "
                    f"(0, {MAX_CONV_KERNEL}], got {self.extractor_conv_layer_config}"
                )
        for name in ("encoder_num_heads", "encoder_pos_conv_groups"):
            if self.encoder_embed_dim % getattr(self, name):
                raise ValueError(
                    f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by {name} {getattr(self, name)}"
                )
        if (parameters := estimated_parameters(self)) > MAX_PARAMETERS:
            raise ValueError(f"an architecture of about {parameters:.2g} parameters exceeds the {MAX_PARAMETERS:.0g} this pipeline builds")
        return self


def estimated_parameters(config: HubertConfig) -> int:
    """About how many parameters the encoder has (conv stack, projection, positional conv,
    transformer layers): enough to refuse an absurd architecture before anything is allocated."""
    conv, channels_in = 0, 1
    for channels, kernel, _ in config.extractor_conv_layer_config:
        conv += channels_in * channels * kernel
        channels_in = channels
    if config.extractor == "fbank":
        conv, channels_in = 0, config.fbank_mel_bins * config.fbank_stack
    dim = config.encoder_embed_dim
    positional = dim * dim // config.encoder_pos_conv_groups * config.encoder_pos_conv_kernel
    layers = config.encoder_num_layers * (4 * dim * dim + 2 * dim * config.encoder_ff_interm_features)
    return conv + channels_in * dim + positional + layers + dim * config.final_dim


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
# Ours: the same transformers fed 80 log-mel bins, two 10 ms frames stacked into each 20 ms frame
# (MelHuBERT, Fast-HuBERT), in place of the learned conv stack. The same frames as the conv
# presets (hop 320, window 400). On CPU budgets their layers beat MFCC at equal k where the conv
# stack's do not yet (bench/fidelity.py); they do not export to transformers' HubertModel.
HUBERT_CONFIGS["tiny-fbank"] = HUBERT_CONFIGS["tiny"].model_copy(update={"extractor": "fbank"})
HUBERT_CONFIGS["base-fbank"] = HUBERT_CONFIGS["base"].model_copy(update={"extractor": "fbank"})


def hop(config: HubertConfig) -> int:
    """Samples between frames: the product of the conv strides (320 for the paper's stack)."""
    if config.extractor == "fbank":
        return FBANK_HOP * config.fbank_stack
    return math.prod(stride for _, _, stride in config.extractor_conv_layer_config)


def receptive_field(config: HubertConfig) -> int:
    """Samples one frame sees: frame i covers [i * hop, i * hop + receptive_field) (400 for the paper's).

    Each layer widens the window by (kernel - 1) steps of the stride accumulated below it. The
    filterbank front end's frames are centred as a 400-sample window's (model/fbank.py), so 400.
    """
    if config.extractor == "fbank":
        return FBANK_WINDOW
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
