"""Export to Hugging Face transformers: every preset, on real speech, layer by layer.

Each preset is built with `build_pretrain_model` and its weights are moved away from their
initialisation (noise on every parameter, so LayerNorm weights are not 1 and biases not 0),
converted with model.hf_convert, written as a folder and loaded back with
`transformers.HubertModel.from_pretrained(folder)` (a local folder; nothing is downloaded).
large and xlarge keep their widths, conv stack and norm placement but only 2 layers, so the test
stays fast; tiny and base are full size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from model.hf_convert import (  # noqa: E402
    hf_config,
    hf_expected_shapes,
    hf_layer_index,
    hf_state_dict,
    save_hf_pretrained,
    torchaudio_encoder_kwargs,
)
from model.hubert import build_pretrain_model, prepare_waveform  # noqa: E402
from model.layer_features import extract_layer_features  # noqa: E402
from model.presets import HUBERT_CONFIGS, HubertConfig

FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd-8k" / "wav"

# Layers kept per preset: None is the preset's own depth.
PRESET_LAYERS = {"tiny": None, "base": None, "large": 2, "xlarge": 2}


def _config(name: str) -> HubertConfig:
    layers = PRESET_LAYERS[name]
    config = HUBERT_CONFIGS[name]
    return config if layers is None else config.model_copy(update={"encoder_num_layers": layers})


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter: 10 % of its spread, or 0.1 where it is constant (norms, biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            spread = parameter.std().item() if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise * (0.1 * spread if spread > 0 else 0.1))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-4 * max(scale, 1.0), msg=what)


@pytest.fixture(scope="module")
def waveform() -> torch.Tensor:
    """One real recording (8 kHz FSDD digit) resampled to 16 kHz, float32 (samples,)."""
    if not FSDD.is_dir():
        pytest.skip(f"real speech sample {FSDD} is absent (it lives in ../shared beside the checkout)")
    path = sorted(FSDD.glob("*.wav"))[0]
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    return torchaudio.functional.resample(mono, rate, 16_000).contiguous()


@pytest.fixture(scope="module", params=list(PRESET_LAYERS))
def converted(request, tmp_path_factory):
    """(name, config, pretrain model, loaded HubertModel, folder) for one preset."""
    name = request.param
    config = _config(name)
    torch.manual_seed(0)
    pretrain = build_pretrain_model(config, num_classes=8)
    _perturb(pretrain, seed=1)
    pretrain.eval()
    folder = save_hf_pretrained(
        tmp_path_factory.mktemp(f"hf_{name}"),
        pretrain.wav2vec2.state_dict(),
        config,
        pretrain.mask_generator.mask_embedding,
    )
    model, info = transformers.HubertModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    yield name, config, pretrain, model, folder
    del pretrain, model


def test_folder_holds_exactly_the_converted_weights(converted):
    name, config, pretrain, model, folder = converted
    assert sorted(path.name for path in folder.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]
    assert json.loads((folder / "config.json").read_text()) == hf_config(config)
    loaded = model.state_dict()
    assert {key: tuple(value.shape) for key, value in loaded.items()} == hf_expected_shapes(config)
    expected = hf_state_dict(pretrain.wav2vec2.state_dict(), config, pretrain.mask_generator.mask_embedding)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(model.masked_spec_embed, pretrain.mask_generator.mask_embedding)
    # The HF model really is the preset's architecture.
    assert model.config.do_stable_layer_norm is config.encoder_layer_norm_first
    assert model.config.feat_extract_norm == {"group_norm": "group", "layer_norm": "layer"}[config.extractor_mode]
    assert model.config.num_hidden_layers == config.encoder_num_layers
    assert model.config.hidden_size == config.encoder_embed_dim


def test_every_layer_matches_the_pipeline(converted, waveform):
    """hidden_states[hf_layer_index(L)] is extract_layer_features(..., L) for every L."""
    name, config, pretrain, model, _ = converted
    encoder = pretrain.wav2vec2
    with torch.no_grad():
        outputs = model(prepare_waveform(config, waveform)[None], output_hidden_states=True)
    assert len(outputs.hidden_states) == config.encoder_num_layers + 1
    for layer in range(1, config.encoder_num_layers + 1):
        expected = extract_layer_features(encoder, waveform, layer, config)
        assert expected.shape[0] > 10
        _assert_close(outputs.hidden_states[hf_layer_index(layer, config)][0], expected, f"{name} layer {layer}")


def test_last_hidden_state_and_the_final_layer_norm(converted, waveform):
    """last_hidden_state is torchaudio's forward output; only layer-norm-first models add a norm there."""
    name, config, pretrain, model, _ = converted
    encoder = pretrain.wav2vec2
    prepared = prepare_waveform(config, waveform)[None]
    with torch.no_grad():
        outputs = model(prepared, output_hidden_states=True)
        forward, _ = encoder(prepared)
    last = config.encoder_num_layers
    pipeline_last = extract_layer_features(encoder, waveform, last, config)
    _assert_close(outputs.last_hidden_state[0], forward[0], f"{name} last_hidden_state")
    if config.encoder_layer_norm_first:
        norm = model.encoder.layer_norm
        final = F.layer_norm(pipeline_last, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        _assert_close(outputs.last_hidden_state[0], final, f"{name} final norm")
        # The difference is real, so the per-layer test above would catch an off-by-norm index.
        assert (outputs.last_hidden_state[0] - pipeline_last).abs().max() > 0.1
    else:
        _assert_close(outputs.last_hidden_state[0], pipeline_last, f"{name} last layer")


def test_torchaudio_encoder_rebuilds_strictly(converted, waveform):
    name, config, pretrain, _, _ = converted
    encoder = pretrain.wav2vec2
    fresh = torchaudio.models.wav2vec2_model(**torchaudio_encoder_kwargs(config))
    fresh.load_state_dict(encoder.state_dict(), strict=True)
    fresh.eval()
    prepared = prepare_waveform(config, waveform)[None]
    with torch.no_grad():
        for ours, theirs in zip(fresh.extract_features(prepared)[0], encoder.extract_features(prepared)[0], strict=True):
            assert torch.equal(ours, theirs), name
        assert torch.equal(fresh(prepared)[0], encoder(prepared)[0]), name


def test_feature_extractor_config_normalises_like_prepare_waveform_up_to_eps(converted, waveform):
    """HF's do_normalize divides by sqrt(var + 1e-7), prepare_waveform by sqrt(var + 1e-5)."""
    name, config, _, _, folder = converted
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(folder)
    assert extractor.do_normalize is config.normalize_waveform
    values = torch.from_numpy(
        np.asarray(extractor(waveform.numpy(), sampling_rate=16_000).input_values[0], dtype=np.float32)
    )
    prepared = prepare_waveform(config, waveform)
    if not config.normalize_waveform:
        assert torch.equal(values, prepared)
        return
    centred = waveform.double() - waveform.double().mean()
    variance = centred.square().mean()
    torch.testing.assert_close(values.double(), centred / torch.sqrt(variance + 1e-7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prepared.double(), centred / torch.sqrt(variance + 1e-5), rtol=1e-4, atol=1e-4)


def test_hf_config_is_json_and_a_valid_transformers_config():
    for name, config in HUBERT_CONFIGS.items():
        if config.extractor != "conv":
            continue  # refused: tests/test_fbank.py
        kwargs = json.loads(json.dumps(hf_config(config)))
        assert kwargs["architectures"] == ["HubertModel"] and kwargs["model_type"] == "hubert"
        hf = transformers.HubertConfig(**kwargs)
        assert list(hf.conv_kernel) == [kernel for _, kernel, _ in config.extractor_conv_layer_config], name
        assert hf.num_hidden_layers == config.encoder_num_layers
        assert hf.do_stable_layer_norm is config.encoder_layer_norm_first
        assert hf.hidden_dropout == config.encoder_dropout and hf.layerdrop == config.encoder_layer_drop
        assert hf.mask_time_prob == config.mask_prob
        assert transformers.HubertConfig(**hf_config(config, mask_embedding=False)).mask_time_prob == 0.0


def test_hf_layer_index_bounds():
    config = HUBERT_CONFIGS["base"]
    assert [hf_layer_index(layer, config) for layer in (1, 6, 12)] == [1, 6, 12]
    for bad in (0, 13, -1):
        with pytest.raises(ValueError, match="1..12"):
            hf_layer_index(bad, config)


@pytest.fixture(scope="module")
def small():
    """A 1-layer tiny encoder's config, state and mask embedding, for the key-mapping checks."""
    config = HUBERT_CONFIGS["tiny"].model_copy(update={"encoder_num_layers": 1})
    torch.manual_seed(0)
    pretrain = build_pretrain_model(config, num_classes=3)
    _perturb(pretrain, seed=2)
    return config, pretrain.wav2vec2, pretrain.mask_generator.mask_embedding


def test_unmapped_keys_are_named_in_both_directions(small):
    config, encoder, mask = small
    state = dict(encoder.state_dict())
    with pytest.raises(ValueError, match=r"aux\.weight"):
        hf_state_dict({**state, "aux.weight": torch.zeros(3, 192)}, config, mask)
    missing = {key: value for key, value in state.items() if key != "encoder.transformer.layers.0.layer_norm.bias"}
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.layer_norm\.bias"):
        hf_state_dict(missing, config, mask)
    with pytest.raises(ValueError, match=r"\.wav2vec2\.state_dict\(\)"):
        hf_state_dict({f"wav2vec2.{key}": value for key, value in state.items()}, config, mask)
    with pytest.raises(ValueError, match="shapes"):
        hf_state_dict(state, config.model_copy(update={"encoder_ff_interm_features": 512}), mask)
    # Without a mask embedding, the HF state has no masked_spec_embed and the config no masking.
    without = hf_state_dict(state, config, None)
    assert "masked_spec_embed" not in without
    assert set(without) == set(hf_expected_shapes(config, mask_embedding=False))


def test_every_form_of_the_positional_weight_norm_converts(small):
    """Parametrized (torchaudio >= 2.1), weight_g/weight_v (older) and weight-norm-removed states agree."""
    config, encoder, mask = small
    state = dict(encoder.state_dict())
    reference = hf_state_dict(state, config, mask)
    prefix = "encoder.transformer.pos_conv_embed.conv."
    g = state.pop(prefix + "parametrizations.weight.original0")
    v = state.pop(prefix + "parametrizations.weight.original1")
    hooks = hf_state_dict({**state, prefix + "weight_g": g, prefix + "weight_v": v}, config, mask)
    assert all(torch.equal(hooks[key], reference[key]) for key in reference)
    weight = encoder.encoder.transformer.pos_conv_embed.conv.weight.detach()
    plain = hf_state_dict({**state, prefix + "weight": weight}, config, mask)
    hf_prefix = "encoder.pos_conv_embed.conv.parametrizations.weight."
    rebuilt = torch._weight_norm(plain[hf_prefix + "original1"], plain[hf_prefix + "original0"], 2)
    torch.testing.assert_close(rebuilt, weight)
    with pytest.raises(ValueError, match="exactly one form"):
        hf_state_dict({**state, prefix + "weight_g": g, prefix + "weight_v": v, prefix + "weight": weight}, config, mask)


def test_a_folder_without_mask_embedding_loads_completely(small, tmp_path):
    config, encoder, _ = small
    folder = save_hf_pretrained(tmp_path / "hf", encoder.state_dict(), config, None)
    model, info = transformers.HubertModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not hasattr(model, "masked_spec_embed")


def test_half_a_weight_norm_is_refused(small):
    config, encoder, mask = small
    state = dict(encoder.state_dict())
    state.pop("encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1")
    with pytest.raises(ValueError, match="half of the positional conv weight norm"):
        hf_state_dict(state, config, mask)
