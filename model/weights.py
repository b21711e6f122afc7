"""The saved-weights format: what train writes (its final and best weights) and features, the profile, a
warm start and export read.

One file holds the pretraining model's state dict, the architecture it fills and its label
vocabulary size. It is read with `torch.load(weights_only=True)`: torch's restricted unpickler,
which builds tensors and plain containers and refuses any other object, so a file planted in the
store cannot run code where it is read. Readers check the file's digest against the record
before they get here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import Tensor
from torchaudio.models import HuBERTPretrainModel, Wav2Vec2Model

from model.hubert import build_pretrain_model
from model.presets import HubertConfig

MAX_CLASSES = 32768
"""Labels are stored as int16: no k-means of this pipeline has more clusters."""

ENCODER_PREFIX = "wav2vec2."
"""The pretraining model's keys of its encoder (torchaudio's `HuBERTPretrainModel.wav2vec2`)."""


@dataclass(frozen=True)
class SavedWeights:
    state: dict[str, Tensor]
    architecture: HubertConfig
    num_classes: int

    def encoder_state(self) -> dict[str, Tensor]:
        """The encoder's part of the state dict, as `torchaudio.models.wav2vec2_model` names it."""
        return {key[len(ENCODER_PREFIX) :]: tensor for key, tensor in self.state.items() if key.startswith(ENCODER_PREFIX)}

    def pretrain_model(self) -> HuBERTPretrainModel:
        model = build_pretrain_model(self.architecture, num_classes=self.num_classes)
        model.load_state_dict(self.state)
        return model

    def encoder(self) -> Wav2Vec2Model:
        """The encoder, in eval mode: what layer features are computed with."""
        return self.pretrain_model().wav2vec2.eval()


def save_weights(model: torch.nn.Module, architecture: HubertConfig, preset: str, num_classes: int) -> bytes:
    """The bytes of a weights file for `model` (a pretraining model of `architecture`)."""
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "architecture": preset, "config": architecture.model_dump(), "num_classes": num_classes},
        buffer,
    )
    return buffer.getvalue()


def load_weights(data: bytes) -> SavedWeights:
    """A weights file's contents; ValueError when it is not one (a restricted load refuses anything but data)."""
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unpickling error of any kind means the same
        raise ValueError(f"not a weights file this pipeline wrote ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(saved, dict) or not {"model", "config", "num_classes"} <= set(saved):
        raise ValueError("not a weights file this pipeline wrote (it lacks model, config or num_classes)")
    num_classes = int(saved["num_classes"])
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"not a weights file this pipeline wrote (num_classes {num_classes} is not in [1, {MAX_CLASSES}])")
    return SavedWeights(saved["model"], HubertConfig.model_validate(saved["config"]), num_classes)
