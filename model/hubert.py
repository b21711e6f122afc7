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

import torch
import torch.nn.functional as F
import torchaudio.models
from torch import Tensor
from torchaudio.models.wav2vec2.components import FeatureProjection, LogitGenerator

from model.fbank import FbankFeatureExtractor
from model.presets import HubertConfig


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


def matmul_logits(proj_x: Tensor, target: Tensor, label_embeddings: Tensor, temperature: float = 0.1) -> Tensor:
    """torchaudio's `_compute_logits` as one matrix product: (frames, num_classes + 1), column 0 the
    frame's own label's cosine similarity / temperature, columns 1.. every label's, the own one -inf.

    torchaudio builds a (num_classes + 1, frames, final_dim) tensor of targets and compares it whole
    (`cosine_similarity` and an equality test over it, forward and backward): at k=500 that made a
    tiny model's CPU step 2.4 times as slow as at k=100. Normalising first and multiplying gives the
    same values (to float rounding) and gradients. torchaudio marks -inf wherever a label embedding
    equals the frame's own exactly; that is the own class unless two embeddings are identical.
    """
    x = F.normalize(proj_x.float(), dim=-1, eps=1e-8)
    embeddings = F.normalize(label_embeddings.float(), dim=-1, eps=1e-8)
    similarities = (x @ embeddings.T) / temperature
    own = target.long()[:, None]
    positive = similarities.gather(1, own)
    negatives = similarities.scatter(1, own, float("-inf"))
    return torch.cat([positive, negatives], dim=1).type_as(proj_x)


class MatmulLogitGenerator(LogitGenerator):
    """torchaudio's `LogitGenerator` (same parameters, same outputs) with `matmul_logits`."""

    def forward(self, x: Tensor, label: Tensor, mask_m: Tensor, mask_u: Tensor) -> tuple[Tensor | None, Tensor | None]:
        proj_x = self.final_proj(x)
        logit_m = None if self.skip_masked else matmul_logits(proj_x[mask_m], label[mask_m], self.label_embeddings)
        logit_u = None if self.skip_nomask else matmul_logits(proj_x[mask_u], label[mask_u], self.label_embeddings)
        return logit_m, logit_u


class FixedFrontEndPretrainModel(torchaudio.models.HuBERTPretrainModel):
    """HuBERTPretrainModel with a front end that learns nothing (the filterbank): HuBERT's feature
    penalty (the mean square of the conv features, keeping a learned stack's output small) has
    nothing to act on, so it is 0 instead of a constant that would only offset the reported loss."""

    def forward(self, *args, **kwargs) -> tuple[Tensor | None, Tensor | None, Tensor]:  # type: ignore[override]
        logit_m, logit_u, penalty = super().forward(*args, **kwargs)
        return logit_m, logit_u, torch.zeros_like(penalty)


def build_pretrain_model(config: HubertConfig, num_classes: int) -> torchaudio.models.HuBERTPretrainModel:
    """A freshly initialised torchaudio `HuBERTPretrainModel` for `num_classes` k-means labels.

    Its forward takes waveforms (batch, samples), labels (batch, num_frames) and optional
    audio_lengths (batch,), and returns (logit_m, logit_u, feature_penalty) for `hubert_loss`.
    """
    if num_classes < 1:
        raise ValueError(f"expected num_classes >= 1, got {num_classes}")
    architecture = config.model_dump(exclude={"normalize_waveform", "sample_rate", "extractor", "fbank_mel_bins", "fbank_stack"})
    architecture["extractor_conv_layer_config"] = [tuple(layer) for layer in config.extractor_conv_layer_config]
    model = torchaudio.models.hubert_pretrain_model(
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
    model.logit_generator.__class__ = MatmulLogitGenerator  # same parameters and outputs, cheaper at large k
    if config.extractor == "fbank":
        encoder = model.wav2vec2
        encoder.feature_extractor = FbankFeatureExtractor(config.fbank_mel_bins, config.fbank_stack, config.sample_rate)
        encoder.encoder.feature_projection = FeatureProjection(
            config.fbank_mel_bins * config.fbank_stack, config.encoder_embed_dim, config.encoder_projection_dropout
        )
        model.__class__ = FixedFrontEndPretrainModel
    return model


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
