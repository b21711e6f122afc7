"""Export a trained encoder as a Hugging Face `transformers` HubertModel folder.

The pipeline trains torchaudio's HuBERT (`model.hubert.build_pretrain_model`); its `.wav2vec2` is
a `torchaudio.models.Wav2Vec2Model`. `transformers.HubertModel` is the same network under other
parameter names, so a trained encoder converts with renames only (no arithmetic on any weight):

    pretrain = build_pretrain_model(config, num_classes)      # ... trained
    save_hf_pretrained(folder, pretrain.wav2vec2.state_dict(), config,
                       pretrain.mask_generator.mask_embedding)
    hf = transformers.HubertModel.from_pretrained(folder)     # a local folder, nothing downloaded

What converts: the conv feature extractor, the feature projection (LayerNorm + Linear), the
convolutional positional embedding (weight-normed), the transformer, and the pretraining model's
mask embedding (HF's `masked_spec_embed`, used by SpecAugment when fine-tuning). What does not:
the pretraining heads (`logit_generator`: final_proj and label embeddings); HubertModel has none.

Layer convention (checked by tests/test_hf_convert.py on real speech, every preset):

    pipeline layer L (1-based; `model.layer_features.extract_layer_features(encoder, w, L, config)`,
    i.e. `encoder.extract_features(prepare_waveform(config, w)[None], num_layers=L)[0][L - 1][0]`)
        == HF `model(prepare_waveform(config, w)[None], output_hidden_states=True).hidden_states[L][0]`

    so `hf_layer_index(L, config) == L` for post-norm (tiny, base) and layer-norm-first (large,
    xlarge) models alike. hidden_states has encoder_num_layers + 1 entries; hidden_states[0] is
    the input to the first transformer layer (post-norm: after pos-conv + LayerNorm; layer-norm-
    first: after pos-conv, un-normalised), which is not a pipeline layer.

Why, and the one place it differs: torchaudio's `Transformer.get_intermediate_outputs` returns
each layer's raw output; for layer-norm-first models the encoder's final LayerNorm
(`encoder.transformer.layer_norm`, HF `encoder.layer_norm`) is applied only in `forward`, after the
last layer, never to an intermediate output. transformers 5.x records hidden_states with forward
hooks on the encoder layers (`capture_outputs(tie_last_hidden_states=False)` on HubertModel), so
hidden_states[N] is also the raw output of layer N, and only `last_hidden_state` carries the final
LayerNorm:

    layer-norm-first: last_hidden_state == layer_norm(hidden_states[N]) == torchaudio
                      `encoder(w)[0]` (Wav2Vec2Model.forward), != pipeline layer N
    post-norm:        last_hidden_state == hidden_states[N] == pipeline layer N (no final norm;
                      the encoder LayerNorm sits before the first layer in both libraries)

`hf_config` pins `tie_last_hidden_states: False` (a transformers 5.x config knob that, if True,
would replace hidden_states[-1] by last_hidden_state) so the equality holds for every L whatever
HubertModel's default is. transformers 4.x ignores that key and, for layer-norm-first models,
appended the final-LayerNorm output as hidden_states[N] (HubertEncoderStableLayerNorm.forward):
there, for large/xlarge, hidden_states[N] == layer_norm(pipeline layer N) and layers 1..N-1 still
match. Post-norm models agree in every version.

Input: neither model normalises the waveform. Feed HF exactly what the pipeline feeds torchaudio,
`prepare_waveform(config, waveform)` (per utterance, before padding): unchanged for tiny/base,
`F.layer_norm` over the utterance (eps 1e-5) for large/xlarge (normalize_waveform=True). HF's
`Wav2Vec2FeatureExtractor(do_normalize=True)` is the intended equivalent (that is what
`hf_feature_extractor_config` writes for those models) but divides by sqrt(var + 1e-7), not
sqrt(var + 1e-5): the scale differs by sqrt((var + 1e-5) / (var + 1e-7)), about 0.05 % at
var = 1e-2 but 0.5 % at 1e-3 and 5 % at 1e-4 (quiet audio), so for features equal to the
pipeline's, call `prepare_waveform` and skip the feature extractor's normalisation. Batches: the
group_norm models (tiny, base) normalise the first conv layer over the whole input, padding
included, so padded HF batches differ from single utterances; run them one utterance at a time
(the pipeline runs their conv stack per utterance for the same reason).

This module imports neither transformers nor safetensors at import time (`save_hf_pretrained`
imports safetensors when called).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from model.presets import HubertConfig

# transformers' HubertPositionalConvEmbedding uses torch's parametrization-based weight_norm when
# torch has it (torch >= 2.1) and the old weight_g / weight_v hooks otherwise; mirror that choice.
if hasattr(torch.nn.utils.parametrizations, "weight_norm"):
    _HF_WEIGHT_G, _HF_WEIGHT_V = "parametrizations.weight.original0", "parametrizations.weight.original1"
else:  # pragma: no cover - torch < 2.1
    _HF_WEIGHT_G, _HF_WEIGHT_V = "weight_g", "weight_v"

_POS_CONV_TA = "encoder.transformer.pos_conv_embed.conv."
_POS_CONV_HF = "encoder.pos_conv_embed.conv."

# torchaudio -> HF key prefixes, first match wins; the rest of the key is kept as it is.
_PREFIXES = (
    ("feature_extractor.conv_layers.", "feature_extractor.conv_layers."),
    ("encoder.feature_projection.", "feature_projection."),
    ("encoder.transformer.layer_norm.", "encoder.layer_norm."),
    ("encoder.transformer.layers.", "encoder.layers."),
)


class NotExportable(ValueError):
    """A model transformers' HubertModel cannot hold: one with a filterbank front end."""


def require_conv_front_end(config: HubertConfig) -> None:
    """HubertModel's feature encoder is the conv stack (conv_dim, conv_kernel, conv_stride), and so
    is torchaudio's `wav2vec2_model`'s; a filterbank front end (model/fbank.py) has no counterpart
    in either, so a model with one cannot be exported as one."""
    if config.extractor != "conv":
        raise NotExportable(
            f"a model with a {config.extractor!r} front end does not convert to transformers' HubertModel or "
            "torchaudio's wav2vec2_model, whose feature encoder is the learned conv stack; train a conv preset "
            "(tiny, base, large, xlarge) to export an encoder"
        )


def torchaudio_encoder_kwargs(config: HubertConfig) -> dict:
    """Arguments of `torchaudio.models.wav2vec2_model` that build the encoder of `build_pretrain_model(config, k)`.

    `torchaudio.models.wav2vec2_model(**torchaudio_encoder_kwargs(config))` has the same state-dict
    keys and shapes as `build_pretrain_model(config, k).wav2vec2` (no aux head), so a saved
    encoder loads into it with strict=True.
    """
    require_conv_front_end(config)
    return {
        "extractor_mode": config.extractor_mode,
        "extractor_conv_layer_config": [tuple(layer) for layer in config.extractor_conv_layer_config],
        "extractor_conv_bias": config.extractor_conv_bias,
        "encoder_embed_dim": config.encoder_embed_dim,
        "encoder_projection_dropout": config.encoder_projection_dropout,
        "encoder_pos_conv_kernel": config.encoder_pos_conv_kernel,
        "encoder_pos_conv_groups": config.encoder_pos_conv_groups,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_num_heads": config.encoder_num_heads,
        "encoder_attention_dropout": config.encoder_attention_dropout,
        "encoder_ff_interm_features": config.encoder_ff_interm_features,
        "encoder_ff_interm_dropout": config.encoder_ff_interm_dropout,
        "encoder_dropout": config.encoder_dropout,
        "encoder_layer_norm_first": config.encoder_layer_norm_first,
        "encoder_layer_drop": config.encoder_layer_drop,
        "aux_num_out": None,
    }


def hf_config(config: HubertConfig, *, mask_embedding: bool = True) -> dict:
    """`transformers.HubertConfig` kwargs (JSON-serialisable; config.json) for the same architecture.

    Every architecture field transformers reads is set explicitly rather than left to its
    defaults (several differ from ours: dropouts 0.1, layerdrop 0.1, conv_kernel's last two).
    Dropouts and layer drop are the config's training values; they only act in train mode.
    Masking: HF's SpecAugment spans (mask_time_prob / mask_time_length, same meaning as fairseq's
    and torchaudio's mask_prob / mask_length, and torchaudio's min_masks=2) use the converted
    mask embedding. HubertModel only has `masked_spec_embed` when mask_time_prob > 0, so pass
    mask_embedding=False when converting without one (then mask_time_prob is 0: no time masking
    when fine-tuning unless the caller sets it and initialises the embedding).
    """
    require_conv_front_end(config)
    conv = config.extractor_conv_layer_config
    return {
        "architectures": ["HubertModel"],
        "model_type": "hubert",
        # Conv feature extractor: "group" is one GroupNorm (per channel) after the first conv,
        # "layer" a LayerNorm after every conv; gelu after each.
        "feat_extract_norm": {"group_norm": "group", "layer_norm": "layer"}[config.extractor_mode],
        "feat_extract_activation": "gelu",
        "conv_dim": [channels for channels, _, _ in conv],
        "conv_kernel": [kernel for _, kernel, _ in conv],
        "conv_stride": [stride for _, _, stride in conv],
        "conv_bias": config.extractor_conv_bias,
        # Feature projection: LayerNorm over conv channels, Linear, dropout (torchaudio always
        # has the LayerNorm for HuBERT).
        "feat_proj_layer_norm": True,
        "feat_proj_dropout": config.encoder_projection_dropout,
        # Transformer.
        "hidden_size": config.encoder_embed_dim,
        "num_hidden_layers": config.encoder_num_layers,
        "num_attention_heads": config.encoder_num_heads,
        "intermediate_size": config.encoder_ff_interm_features,
        "hidden_act": "gelu",
        "hidden_dropout": config.encoder_dropout,
        "attention_dropout": config.encoder_attention_dropout,
        "activation_dropout": config.encoder_ff_interm_dropout,
        "layerdrop": config.encoder_layer_drop,
        "layer_norm_eps": 1e-5,  # torch's default, which every torchaudio LayerNorm uses
        "do_stable_layer_norm": config.encoder_layer_norm_first,
        # Convolutional positional embedding, weight-normed over the kernel axis (dim=2) in both.
        "num_conv_pos_embeddings": config.encoder_pos_conv_kernel,
        "num_conv_pos_embedding_groups": config.encoder_pos_conv_groups,
        "conv_pos_batch_norm": False,
        # Masking (train mode only).
        "apply_spec_augment": True,
        "mask_time_prob": config.mask_prob if mask_embedding else 0.0,
        "mask_time_length": config.mask_length,
        "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        # hidden_states[L] is layer L's raw output for every L (see the module docstring).
        "tie_last_hidden_states": False,
    }


def hf_feature_extractor_config(config: HubertConfig) -> dict:
    """`Wav2Vec2FeatureExtractor` kwargs (preprocessor_config.json) closest to `prepare_waveform`.

    do_normalize = normalize_waveform; close to but not exactly `prepare_waveform` (eps 1e-7
    against 1e-5, see the module docstring). Attention masks only for the layer_norm extractor,
    as for the published HuBERT checkpoints: the group_norm one cannot ignore padding.
    """
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": config.sample_rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": config.normalize_waveform,
        "return_attention_mask": config.extractor_mode == "layer_norm",
    }


def hf_layer_index(layer: int, config: HubertConfig) -> int:
    """Index into HF `outputs.hidden_states` of pipeline layer `layer` (1-based): `layer` itself.

    hidden_states[0] is the transformer's input, hidden_states[L] the output of layer L, pre any
    final LayerNorm, for post-norm and layer-norm-first models alike (transformers 5.x; under 4.x
    the last entry of a layer-norm-first model carried the final LayerNorm, see the module
    docstring).
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"expected an int layer, got {layer!r}")
    if not 1 <= layer <= config.encoder_num_layers:
        raise ValueError(f"expected a layer in 1..{config.encoder_num_layers}, got {layer}")
    return layer


def hf_expected_shapes(config: HubertConfig, *, mask_embedding: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of `HubertModel(HubertConfig(**hf_config(config))).state_dict()` with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    dim, ff = config.encoder_embed_dim, config.encoder_ff_interm_features
    if mask_embedding:
        shapes["masked_spec_embed"] = (dim,)
    in_channels = 1
    for index, (channels, kernel, _) in enumerate(config.extractor_conv_layer_config):
        prefix = f"feature_extractor.conv_layers.{index}."
        shapes[prefix + "conv.weight"] = (channels, in_channels, kernel)
        if config.extractor_conv_bias:
            shapes[prefix + "conv.bias"] = (channels,)
        if config.extractor_mode == "layer_norm" or index == 0:
            shapes[prefix + "layer_norm.weight"] = (channels,)
            shapes[prefix + "layer_norm.bias"] = (channels,)
        in_channels = channels
    shapes["feature_projection.layer_norm.weight"] = (in_channels,)
    shapes["feature_projection.layer_norm.bias"] = (in_channels,)
    shapes["feature_projection.projection.weight"] = (dim, in_channels)
    shapes["feature_projection.projection.bias"] = (dim,)
    kernel, groups = config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups
    shapes[_POS_CONV_HF + "bias"] = (dim,)
    shapes[_POS_CONV_HF + _HF_WEIGHT_G] = (1, 1, kernel)
    shapes[_POS_CONV_HF + _HF_WEIGHT_V] = (dim, dim // groups, kernel)
    shapes["encoder.layer_norm.weight"] = (dim,)
    shapes["encoder.layer_norm.bias"] = (dim,)
    for index in range(config.encoder_num_layers):
        prefix = f"encoder.layers.{index}."
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{prefix}attention.{projection}.weight"] = (dim, dim)
            shapes[f"{prefix}attention.{projection}.bias"] = (dim,)
        shapes[prefix + "feed_forward.intermediate_dense.weight"] = (ff, dim)
        shapes[prefix + "feed_forward.intermediate_dense.bias"] = (ff,)
        shapes[prefix + "feed_forward.output_dense.weight"] = (dim, ff)
        shapes[prefix + "feed_forward.output_dense.bias"] = (dim,)
        for norm in ("layer_norm", "final_layer_norm"):
            shapes[f"{prefix}{norm}.weight"] = (dim,)
            shapes[f"{prefix}{norm}.bias"] = (dim,)
    return shapes


def _hf_name(key: str) -> str | None:
    """HF name of a torchaudio Wav2Vec2Model key (pos-conv weights handled separately), or None."""
    for source, target in _PREFIXES:
        if key.startswith(source):
            return target + key[len(source) :]
    if key == _POS_CONV_TA + "bias":
        return _POS_CONV_HF + "bias"
    return None


def _pos_conv_weight_norm(encoder_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], set[str], list[str]]:
    """HF's (g, v) of the positional conv from whichever form the torchaudio state holds it in.

    torchaudio >= 2.1 saves `parametrizations.weight.original0/1` (g, v), older ones
    `weight_g/weight_v`; a model whose weight norm was removed (TorchScript export) saves the
    plain `weight`, which is split exactly into g = ||weight|| over dims (0, 1) and v = weight.
    Returns the HF tensors, the torchaudio keys used, and problems (several forms, half a pair);
    with no form at all it returns nothing and the HF keys are reported missing.
    """
    forms = (
        ("parametrizations.weight.original0", "parametrizations.weight.original1"),
        ("weight_g", "weight_v"),
        ("weight",),
    )
    present = [form for form in forms if any(_POS_CONV_TA + key in encoder_state for key in form)]
    if not present:
        return {}, set(), []
    if len(present) > 1:
        found = sorted(_POS_CONV_TA + key for form in present for key in form if _POS_CONV_TA + key in encoder_state)
        return {}, set(found), [f"expected exactly one form of the positional conv weight, found {found}"]
    form = present[0]
    used = {_POS_CONV_TA + key for key in form}
    missing = sorted(key for key in used if key not in encoder_state)
    if missing:
        return {}, used & set(encoder_state), [f"half of the positional conv weight norm is missing: {missing}"]
    if form == ("weight",):
        weight = encoder_state[_POS_CONV_TA + "weight"]
        g = torch.linalg.vector_norm(weight, dim=(0, 1), keepdim=True)
        return {_POS_CONV_HF + _HF_WEIGHT_G: g, _POS_CONV_HF + _HF_WEIGHT_V: weight}, used, []
    g_key, v_key = form
    return {
        _POS_CONV_HF + _HF_WEIGHT_G: encoder_state[_POS_CONV_TA + g_key],
        _POS_CONV_HF + _HF_WEIGHT_V: encoder_state[_POS_CONV_TA + v_key],
    }, used, []


def hf_state_dict(
    encoder_state: dict[str, Tensor], config: HubertConfig, mask_embedding: Tensor | None
) -> dict[str, Tensor]:
    """torchaudio Wav2Vec2Model state dict -> HF HubertModel state dict, renames only.

    Args:
        encoder_state: `build_pretrain_model(config, k).wav2vec2.state_dict()` (keys without the
            pretraining model's "wav2vec2." prefix).
        mask_embedding: `pretrain.mask_generator.mask_embedding` (encoder_embed_dim,), which
            becomes `masked_spec_embed`; None to leave it out (then save with
            `hf_config(config, mask_embedding=False)`).
    Returns:
        Exactly the keys and shapes of `hf_expected_shapes(config, mask_embedding=...)`, tensors
        detached and contiguous (sharing storage with the input where already contiguous).
    Raises:
        ValueError naming every torchaudio key that maps nowhere (e.g. an aux head, a pretraining
        key), every HF key left unfilled, and every shape that disagrees with `config`.
    """
    expected = hf_expected_shapes(config, mask_embedding=mask_embedding is not None)
    converted, used, problems = _pos_conv_weight_norm(encoder_state)
    unmapped = []
    for key, tensor in encoder_state.items():
        if key in used:
            continue
        name = _hf_name(key)
        if name is None or name not in expected or name in converted:
            unmapped.append(key)
            continue
        converted[name] = tensor
    if mask_embedding is not None:
        converted["masked_spec_embed"] = mask_embedding
    if unmapped:
        hint = ""
        if any(key.startswith("wav2vec2.") for key in unmapped):
            hint = " (pass the pretraining model's .wav2vec2.state_dict(), not the whole model's)"
        problems.append(f"torchaudio keys with no HubertModel counterpart{hint}: {sorted(unmapped)}")
    missing = sorted(set(expected) - set(converted))
    if missing:
        problems.append(f"HubertModel keys the torchaudio state does not fill: {missing}")
    wrong = sorted(
        f"{key}: {tuple(tensor.shape)} for expected {expected[key]}"
        for key, tensor in converted.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    )
    if wrong:
        problems.append(f"shapes that do not match the config: {wrong}")
    if problems:
        raise ValueError("cannot convert to HubertModel: " + "; ".join(problems))
    return {key: converted[key].detach().contiguous() for key in expected}


def save_hf_pretrained(
    folder: str | Path,
    encoder_state: dict[str, Tensor],
    config: HubertConfig,
    mask_embedding: Tensor | None,
) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json for `HubertModel.from_pretrained(folder)`.

    Tensors are saved in the dtype they have (float32 for a trained encoder).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(encoder_state, config, mask_embedding)
    (folder / "config.json").write_text(
        json.dumps(hf_config(config, mask_embedding=mask_embedding is not None), indent=2) + "\n"
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(hf_feature_extractor_config(config), indent=2) + "\n")
    save_file({key: tensor.cpu() for key, tensor in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder
