"""The HuBERT network: presets, frame geometry, loss, training signal and layer-feature extraction."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio.models.wav2vec2.model

from model.hubert import build_pretrain_model, hubert_loss, prepare_waveform
from model.layer_features import extract_layer_features, extract_layer_features_batch
from model.mfcc import MFCC_GEOMETRY
from model.presets import HUBERT_CONFIGS, HubertConfig, frame_geometry, hop, receptive_field

TINY = HUBERT_CONFIGS["tiny"]
BASE = HUBERT_CONFIGS["base"]


def _parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _speechlike(samples: int, seed: int = 0) -> torch.Tensor:
    """A modulated tone with noise and a near-silent stretch, so GroupNorm statistics matter."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(samples) / 16_000
    waveform = 0.5 * torch.sin(2 * math.pi * 220 * time) * (1 + torch.sin(2 * math.pi * 0.7 * time))
    waveform = waveform + 0.05 * torch.randn(samples, generator=generator)
    waveform[samples // 3 : samples // 2] *= 0.01
    return waveform


def _tiny_encoder(config: HubertConfig = TINY, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_pretrain_model(config, num_classes=20).wav2vec2.eval()


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_pretrain_model(BASE, num_classes=500)


@pytest.fixture(scope="module")
def tiny_encoder() -> torch.nn.Module:
    return _tiny_encoder()


def test_base_has_the_papers_95m_parameters(base_model):
    assert 94e6 <= _parameters(base_model) <= 96e6


@pytest.mark.parametrize(("name", "paper"), [("large", 317e6), ("xlarge", 964e6)])
def test_large_presets_match_the_paper_in_size(monkeypatch, name, paper):
    # Built on the meta device (no memory, no time); torchaudio's initialiser copies weights
    # through the CPU, which meta tensors cannot do, so it is skipped: it changes no shapes.
    monkeypatch.setattr(torchaudio.models.wav2vec2.model, "_init_hubert_pretrain_model", lambda module: None)
    with torch.device("meta"):
        model = build_pretrain_model(HUBERT_CONFIGS[name], num_classes=500)
    assert abs(_parameters(model) - paper) / paper < 0.01


def test_presets_mask_as_the_paper():
    for config in HUBERT_CONFIGS.values():
        assert (config.mask_prob / config.mask_length, config.mask_length) == (0.08, 10)
    assert BASE.feature_grad_mult == TINY.feature_grad_mult == 0.1


@pytest.mark.parametrize("name", ["base", "tiny"])
def test_frame_geometry_is_derived_from_the_conv_stack(name):
    config = HUBERT_CONFIGS[name]
    assert (hop(config), receptive_field(config), frame_geometry(config).frame_rate) == (320, 400, 50.0)


@pytest.mark.parametrize("name", ["base", "tiny"])
def test_num_frames_is_what_the_conv_stack_outputs(name, base_model, tiny_encoder):
    config = HUBERT_CONFIGS[name]
    num_frames = frame_geometry(config).num_frames
    extractor = (base_model.wav2vec2 if name == "base" else tiny_encoder).feature_extractor
    lengths = torch.tensor([0, 1, 9, 10, 399, 400, 401, 719, 720, 721, 1000, 16_000, 16_319, 16_320, 24_123])
    with torch.no_grad():
        _, counted = extractor(torch.zeros(len(lengths), int(lengths.max())), lengths)
        for samples in [400, 401, 719, 720, 5_000, 16_320]:
            features, _ = extractor(torch.zeros(1, samples), None)
            assert features.shape[1] == num_frames(samples)
    assert counted.tolist() == [num_frames(int(samples)) for samples in lengths]
    assert [num_frames(samples) for samples in (0, 399, 400, 719, 720)] == [0, 0, 1, 1, 2]


def test_mfcc_framing_is_kaldis() -> None:
    """25 ms windows every 10 ms with snip_edges: torchaudio's Kaldi MFCC frame count."""
    import torchaudio.compliance.kaldi

    for samples in (400, 401, 559, 560, 16_000, 24_123):
        expected = torchaudio.compliance.kaldi.mfcc(torch.randn(1, samples), sample_frequency=16_000).shape[0]
        assert MFCC_GEOMETRY.num_frames(samples) == expected, samples
    assert MFCC_GEOMETRY.num_frames(399) == 0 and MFCC_GEOMETRY.frame_rate == 100.0


def test_base_forward_and_backward_on_a_padded_batch(base_model):
    lengths = torch.tensor([24_000, 19_200])
    waveforms = torch.zeros(2, 24_000)
    for row, length in enumerate(lengths.tolist()):
        waveforms[row, :length] = _speechlike(length, seed=row)
    labels = torch.randint(0, 500, (2, frame_geometry(BASE).num_frames(24_000)), generator=torch.Generator().manual_seed(0))
    base_model.train()
    base_model.zero_grad()
    loss, metrics = hubert_loss(*base_model(waveforms, labels, lengths))
    loss.backward()
    assert torch.isfinite(loss)
    assert metrics["masked_frames"] + metrics["unmasked_frames"] == sum(frame_geometry(BASE).num_frames(n) for n in lengths.tolist())
    gradients = {name: parameter.grad for name, parameter in base_model.named_parameters()}
    assert all(torch.isfinite(gradient).all() for gradient in gradients.values() if gradient is not None)
    # BASE drops each transformer layer with probability 0.05 in training; nothing else may lack one.
    assert all(".transformer.layers." in name for name, gradient in gradients.items() if gradient is None)
    assert base_model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.grad.abs().sum() > 0


def _tones(samples: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A waveform whose label each 0.5 s is a tone of its own frequency, and its frame labels."""
    generator = torch.Generator().manual_seed(seed)
    segment = 25 * hop(TINY)
    segments = torch.randint(0, classes, (samples // segment + 1,), generator=generator)
    position = torch.arange(samples)
    waveform = 0.5 * torch.sin(2 * math.pi * 200.0 * (1 + segments[position // segment].float()) * position / 16_000)
    centres = torch.arange(frame_geometry(TINY).num_frames(samples)) * hop(TINY) + receptive_field(TINY) // 2
    return waveform, segments[centres // segment]


def test_tiny_learns_to_predict_masked_labels():
    pairs = [_tones(24_000, classes=4, seed=seed) for seed in (0, 1)]
    waveforms, labels = torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])
    torch.manual_seed(0)
    model = build_pretrain_model(TINY, num_classes=4)

    def masked_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return hubert_loss(*model(waveforms, labels))[1]["masked_loss"]

    before = masked_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss, _ = hubert_loss(*model(waveforms, labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert masked_loss() < 0.5 * before


def test_loss_targets_column_zero_and_averages_over_masked_frames():
    logit_m = torch.tensor([[5.0, 0.0, -math.inf], [0.0, 5.0, -math.inf], [5.0, -math.inf, 1.0]])
    logit_u = torch.tensor([[0.0, 3.0, -math.inf]])
    penalty = torch.tensor(0.5)
    loss, metrics = hubert_loss(logit_m, logit_u, penalty)
    summed = torch.nn.functional.cross_entropy(logit_m, torch.zeros(3, dtype=torch.long), reduction="sum")
    assert loss.item() == pytest.approx(summed.item() / 3 + 10 * 0.5)
    assert metrics["masked_accuracy"] == pytest.approx(2 / 3)
    assert (metrics["unmasked_accuracy"], metrics["masked_frames"], metrics["unmasked_frames"]) == (0.0, 3.0, 1.0)
    weighted, _ = hubert_loss(logit_m, logit_u, penalty, unmasked_weight=1.0, feature_penalty_weight=0.0)
    unmasked = torch.nn.functional.cross_entropy(logit_u, torch.zeros(1, dtype=torch.long), reduction="sum")
    assert weighted.item() == pytest.approx((summed + unmasked).item() / 3)


def test_layer_features_of_short_input_are_extract_features_exactly(tiny_encoder, base_model):
    for encoder, config in [(tiny_encoder, TINY), (base_model.wav2vec2.eval(), BASE)]:
        waveform = _speechlike(20_123)
        for layer in (1, 3):
            with torch.no_grad():
                expected = encoder.extract_features(waveform[None], num_layers=layer)[0][layer - 1][0]
            features = extract_layer_features(encoder, waveform, layer, config)
            assert features.shape == (frame_geometry(config).num_frames(20_123), config.encoder_embed_dim)
            assert torch.equal(features, expected)


def test_layer_features_restore_training_mode(tiny_encoder):
    waveform = _speechlike(8_000)
    expected = extract_layer_features(tiny_encoder, waveform, 2, TINY)
    tiny_encoder.train()
    try:
        assert torch.equal(extract_layer_features(tiny_encoder, waveform, 2, TINY), expected)
        assert tiny_encoder.training
    finally:
        tiny_encoder.eval()


def _unchunked(encoder: torch.nn.Module, waveform: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return encoder.extract_features(waveform[None], num_layers=layer)[0][layer - 1][0]


@pytest.mark.parametrize("extractor_mode", ["group_norm", "layer_norm"])
def test_chunked_features_with_whole_utterance_context_are_exact(extractor_mode):
    # Windows of 1 s whose context reaches the whole 5 s: only the piecewise conv stack (with
    # GroupNorm statistics of the whole utterance) and the core arithmetic are left to differ.
    config = HubertConfig.model_validate({**TINY.model_dump(), "extractor_mode": extractor_mode})
    encoder = _tiny_encoder(config)
    for samples in (80_000, 80_123, 16_000 * 3 + 319):
        waveform = _speechlike(samples)
        chunked = extract_layer_features(encoder, waveform, 2, config, max_chunk_samples=16_000, context_samples=80_000)
        assert chunked.shape == (frame_geometry(config).num_frames(samples), config.encoder_embed_dim)
        torch.testing.assert_close(chunked, _unchunked(encoder, waveform, 2), atol=1e-4, rtol=1e-4)


def test_chunked_features_are_close_with_enough_context(tiny_encoder):
    # Outputs are layer-normed (unit scale). With 1 s of context, more than tiny's positional
    # convolution reaches (32 frames), what differs is attention not seeing beyond the window, at
    # its worst in a randomly initialised model, which attends almost uniformly. Measured at the
    # last layer (max, mean abs difference): 0.05, 0.009 with 1 s; 0.03, 0.004 with 2 s; 1.4,
    # 0.028 with 0.5 s (short of the positional convolution); 2.5, 0.12 with none.
    waveform = _speechlike(80_123)
    expected = _unchunked(tiny_encoder, waveform, 3)
    with_context, without = (
        extract_layer_features(tiny_encoder, waveform, 3, TINY, max_chunk_samples=16_000, context_samples=context)
        for context in (16_000, 0)
    )
    assert with_context.shape == without.shape == expected.shape == (frame_geometry(TINY).num_frames(80_123), TINY.encoder_embed_dim)
    difference = (with_context - expected).abs()
    assert difference.max() < 0.15 and difference.mean() < 0.03
    assert (without - expected).abs().max() > 1.0


def test_batch_features_equal_one_at_a_time(tiny_encoder):
    lengths = [16_000, 35_000, 300, 400, 50_000, 721]
    waveforms = [_speechlike(samples, seed=index) for index, samples in enumerate(lengths)]
    batch = extract_layer_features_batch(tiny_encoder, waveforms, 3, TINY, max_chunk_samples=45_000)
    for waveform, features in zip(waveforms, batch):
        single = extract_layer_features(tiny_encoder, waveform, 3, TINY, max_chunk_samples=45_000)
        assert features.shape == (frame_geometry(TINY).num_frames(waveform.shape[0]), TINY.encoder_embed_dim)
        torch.testing.assert_close(features, single, atol=1e-5, rtol=1e-5)


def test_layer_norm_models_normalise_the_waveform():
    waveform = 3.0 + 2.0 * _speechlike(4_000)
    normalised = prepare_waveform(HUBERT_CONFIGS["large"], waveform)
    assert abs(normalised.mean().item()) < 1e-5 and normalised.std().item() == pytest.approx(1.0, abs=1e-3)
    assert prepare_waveform(BASE, waveform) is waveform


def test_bad_shapes_raise_value_errors_naming_both(tiny_encoder):
    with pytest.raises(ValueError, match=r"\(samples,\).*\(1, 8000\)"):
        extract_layer_features(tiny_encoder, torch.zeros(1, 8_000), 1, TINY)
    with pytest.raises(ValueError, match=r"waveforms\[1\].*\(samples,\).*\(2, 10\)"):
        extract_layer_features_batch(tiny_encoder, [torch.zeros(800), torch.zeros(2, 10)], 1, TINY)
    with pytest.raises(ValueError, match=r"conv layers .*512.*got .*64"):
        extract_layer_features(tiny_encoder, torch.zeros(8_000), 1, BASE)
    with pytest.raises(ValueError, match=r"layer in 1\.\.6, got 7"):
        extract_layer_features(tiny_encoder, torch.zeros(8_000), 7, TINY)
    with pytest.raises(ValueError, match=r"logit_m of shape \(frames, num_classes \+ 1\), got \(5,\)"):
        hubert_loss(torch.zeros(5), None, torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"logit_u of shape \(frames, 6\), got \(3, 4\)"):
        hubert_loss(torch.zeros(5, 6), torch.zeros(3, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"shape \(\) or \(1,\), got \(2,\)"):
        hubert_loss(torch.zeros(5, 6), None, torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(samples,\), got shape \(2, 3\)"):
        prepare_waveform(TINY, torch.zeros(2, 3))


def test_config_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="not divisible by encoder_num_heads"):
        HubertConfig.model_validate({**TINY.model_dump(), "encoder_num_heads": 5})
