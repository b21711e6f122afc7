"""The filterbank front end (model/fbank.py): geometry equal to the conv stack's, training, layer features, no HF export."""

from __future__ import annotations

import pytest
import torch

from model.data import map_labels
from model.fbank import FbankFeatureExtractor, stacked_frames
from model.hf_convert import NotExportable, hf_config, torchaudio_encoder_kwargs
from model.hubert import build_pretrain_model, hubert_loss
from model.layer_features import extract_layer_features, extract_layer_features_batch
from model.presets import HUBERT_CONFIGS, frame_geometry

TINY_FBANK = HUBERT_CONFIGS["tiny-fbank"]


@pytest.mark.parametrize("samples", [0, 239, 399, 400, 401, 719, 720, 721, 1039, 16_000, 48_123])
def test_frames_and_centres_match_the_conv_stack(samples):
    conv = frame_geometry(HUBERT_CONFIGS["tiny"])
    fbank = frame_geometry(TINY_FBANK)
    assert fbank == conv
    assert stacked_frames(samples, 2) == conv.num_frames(samples)
    if samples >= 400:
        features, _ = FbankFeatureExtractor()(torch.randn(1, samples), None)
        assert features.shape == (1, conv.num_frames(samples), 160)


def test_padded_batch_equals_one_at_a_time():
    torch.manual_seed(0)
    waves = [torch.randn(16_000), torch.randn(9_000)]
    extractor = FbankFeatureExtractor()
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    batch, lengths = extractor(padded, torch.tensor([16_000, 9_000]))
    for row, wave in enumerate(waves):
        alone, _ = extractor(wave[None], None)
        frames = alone.shape[1]
        assert int(lengths[row]) == frames
        torch.testing.assert_close(batch[row, :frames], alone[0], atol=1e-4, rtol=1e-4)


def test_trains_and_gives_layer_features():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY_FBANK, num_classes=10)
    assert not any(name.startswith("wav2vec2.feature_extractor.") for name, _ in model.named_parameters())
    waves = torch.randn(2, 32_000)
    frames = frame_geometry(TINY_FBANK).num_frames(32_000)
    labels = torch.randint(10, (2, frames))
    logit_m, logit_u, penalty = model(waves, labels, torch.tensor([32_000, 20_000]))
    loss, _ = hubert_loss(logit_m, logit_u, penalty, unmasked_weight=1.0)
    loss.backward()
    assert model.wav2vec2.encoder.feature_projection.projection.weight.grad is not None
    encoder = model.wav2vec2
    wave = torch.randn(40_000)
    whole = extract_layer_features(encoder, wave, 3, TINY_FBANK)
    assert whole.shape == (frame_geometry(TINY_FBANK).num_frames(40_000), 192)
    windowed = extract_layer_features(encoder, wave, 3, TINY_FBANK, max_chunk_samples=16_000, context_samples=32_000)
    torch.testing.assert_close(windowed, whole, atol=1e-4, rtol=1e-4)
    batched = extract_layer_features_batch(encoder, [wave, wave[:20_000]], 3, TINY_FBANK)
    torch.testing.assert_close(batched[0], whole, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="conv"):
        extract_layer_features(encoder, wave, 3, HUBERT_CONFIGS["tiny"])


def test_labels_map_one_to_one():
    geometry = frame_geometry(TINY_FBANK)
    labels = torch.arange(12)
    assert torch.equal(map_labels(labels, geometry, geometry, 12), labels)


def test_not_exportable_to_hubert_model():
    with pytest.raises(NotExportable):
        hf_config(TINY_FBANK)
    with pytest.raises(NotExportable):
        torchaudio_encoder_kwargs(TINY_FBANK)


def test_the_fixed_front_end_adds_no_feature_penalty():
    torch.manual_seed(0)
    model = build_pretrain_model(TINY_FBANK, num_classes=10)
    labels = torch.randint(10, (1, frame_geometry(TINY_FBANK).num_frames(16_000)))
    _, _, penalty = model(torch.randn(1, 16_000), labels, torch.tensor([16_000]))
    assert float(penalty) == 0.0


def test_export_of_a_filterbank_model_is_refused_before_anything_is_written(tmp_path, demo_corpus, client):
    from tests.support import demo_config, run_chain, run_cli, with_settings

    config = with_settings(
        demo_config(tmp_path, demo_corpus, k=8), 1,
        train={"model": "tiny-fbank", "steps": 2, "max_batch_seconds": 2, "max_sample_seconds": 1},
        profile={"enabled": False},
    )
    run_chain(config, client, "train")
    out = tmp_path / "bundle"
    result = run_cli(tmp_path, "export", str(tmp_path / "runs" / "t"), "--iteration", "1", "--out", str(out), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "iteration 1's model: a model with a 'fbank' front end does not convert to transformers' HubertModel" in result.stderr
    assert not out.exists()
