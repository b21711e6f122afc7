"""What the training benches share: utterances held in memory, and a checkpoint store that keeps none.

Imports torch alone, so `bench/gpu.py` can use it where the pipeline's other parts are not installed.
"""

from __future__ import annotations

import torch


class InMemoryUtterances:
    """(waveform, labels) pairs in memory, with their sample counts and names: the source a
    `model.data.BatchStream` reads, without I/O."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int], names: list[str]) -> None:
        self.items, self.lengths, self.names = items, lengths, names

    def __len__(self) -> int:
        return len(self.items)

    def samples(self, index: int) -> int:
        return self.lengths[index]

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]

    def name(self, index: int) -> str:
        return self.names[index]


class NoCheckpoints:
    """A checkpoint store that starts empty and keeps only the newest checkpoint, in memory."""

    def __init__(self) -> None:
        self.newest: bytes | None = None

    def latest(self) -> dict | None:
        return None

    def save(self, step: int, data: bytes) -> None:
        self.newest = data
