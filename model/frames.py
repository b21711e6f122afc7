"""Frame geometry: the one frame-count formula that MFCC, the HuBERT conv stack, labels and training share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
"""Every feature, label and model here works on 16 kHz audio (it is resampled when read)."""


@dataclass(frozen=True)
class FrameGeometry:
    """Frame i covers samples [i * hop, i * hop + window) at 16 kHz."""

    hop: int
    window: int

    def num_frames(self, samples: int | np.ndarray) -> int | np.ndarray:
        """Whole windows that fit: 1 + (samples - window) // hop, or 0 when shorter than one window.

        Of one count (an int), or element-wise of an array of counts (int64)."""
        if isinstance(samples, np.ndarray):
            return np.where(samples < self.window, 0, 1 + (samples - self.window) // self.hop).astype(np.int64)
        return 0 if samples < self.window else 1 + (samples - self.window) // self.hop

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.hop

    def centre_seconds(self, frames: np.ndarray) -> np.ndarray:
        """Times (s) of the centres of the given frame indices."""
        return (frames * self.hop + self.window / 2) / SAMPLE_RATE
