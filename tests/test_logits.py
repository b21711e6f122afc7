"""matmul_logits / MatmulLogitGenerator: torchaudio's HuBERT logits and gradients, computed as one matrix product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchaudio.models.wav2vec2.components import _compute_logits

from model.hubert import MatmulLogitGenerator, build_pretrain_model, matmul_logits
from model.presets import HUBERT_CONFIGS


def test_same_logits_and_gradients_as_torchaudio():
    torch.manual_seed(0)
    for k in (1, 7, 100, 500):
        embeddings = torch.nn.Parameter(torch.rand(k, 16))
        x = torch.randn(50, 16, requires_grad=True)
        target = torch.randint(k, (50,))
        expected, actual = _compute_logits(x, target, embeddings), matmul_logits(x, target, embeddings)
        assert expected.shape == actual.shape == (50, k + 1)
        assert torch.equal(torch.isinf(expected), torch.isinf(actual))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(actual[finite], expected[finite], atol=1e-5, rtol=1e-5)
        zeros = torch.zeros(50, dtype=torch.long)
        grads = [torch.autograd.grad(F.cross_entropy(logits, zeros), [x, embeddings]) for logits in (expected, actual)]
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_model_uses_it_and_keeps_torchaudio_parameter_names():
    model = build_pretrain_model(HUBERT_CONFIGS["tiny"], num_classes=5)
    assert isinstance(model.logit_generator, MatmulLogitGenerator)
    assert {name for name, _ in model.logit_generator.named_parameters()} == {"label_embeddings", "final_proj.weight", "final_proj.bias"}
