"""Cutting a long recording into spans: at its quietest points (as libri-light's cut_by_vad.py cuts
books at silences) or into equal windows.

`energy`: the recording's energy in 10 ms frames, smoothed over 100 ms; from the start, each cut
falls at the quietest smoothed frame between half the longest span (or the shortest span, if more)
and the longest span after the last cut, leaving at least the shortest span behind it; the last
span is what remains (at most the longest). `fixed`: the fewest equal spans no longer than the
longest. Every span is at most `max_seconds`; with `energy`, at least `min_seconds`, and with
`fixed` at least half of `max_seconds` (a recording that needs cutting at all).
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

FRAME_SECONDS = 0.01
SMOOTH_FRAMES = 10


class SegmentSettings(Protocol):
    """`corpus.segment` (tasks/run/config.py `SegmentConfig` is one)."""

    max_seconds: float
    min_seconds: float
    method: Literal["fixed", "energy"]


def frame_energy(mono: np.ndarray, frame: int) -> np.ndarray:
    """Mean power of each whole `frame`-sample frame of a 1-D signal, smoothed over SMOOTH_FRAMES frames, in dB."""
    count = mono.shape[0] // frame
    power = np.square(mono[: count * frame].astype(np.float64)).reshape(count, frame).mean(axis=1)
    smoothed = np.convolve(power, np.ones(SMOOTH_FRAMES) / SMOOTH_FRAMES, mode="same")
    return 10 * np.log10(smoothed + 1e-10)


def cut_spans(mono: np.ndarray, sample_rate: int, settings: SegmentSettings) -> list[tuple[int, int]]:
    """[start, stop) sample ranges covering the recording, in order, each at most `max_seconds`."""
    total = int(mono.shape[0])
    longest = int(settings.max_seconds * sample_rate)
    if total <= longest:
        return [(0, total)]
    if settings.method == "fixed":
        count = -(-total // longest)
        edges = np.round(np.linspace(0, total, count + 1)).astype(np.int64)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    frame = max(1, int(round(sample_rate * FRAME_SECONDS)))
    energy = frame_energy(mono, frame)
    longest_frames = longest // frame
    shortest_frames = -(-int(settings.min_seconds * sample_rate) // frame)
    spans, start = [], 0
    while total - start > longest:
        first = start // frame
        low = first + max(shortest_frames, longest_frames // 2)
        high = min(first + longest_frames, energy.shape[0] - shortest_frames)
        cut = low if high <= low else low + int(np.argmin(energy[low : high + 1]))
        stop = min(cut * frame, start + longest)
        spans.append((start, stop))
        start = stop
    spans.append((start, total))
    return spans
