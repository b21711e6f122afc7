"""Reading audio: decode (libsndfile via soundfile), check, mix down to mono, resample to 16 kHz.

Files are read through fsspec, so a path may be local or on object storage. torchaudio 2.9+ needs
torchcodec for file I/O; soundfile handles wav and flac with no extra system package.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio.functional

from infra.paths import read_whole
from model.frames import SAMPLE_RATE


class AudioError(ValueError):
    """A file that cannot be used, with a short reason category ('unreadable', 'truncated', ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    samples: int
    format: str


def _declared_wav_frames(data: bytes) -> int | None:
    """Frames that a RIFF/WAVE header promises, or None when it does not say (streamed files)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position, block_align = 12, None
    while position + 8 <= len(data):
        chunk_id, chunk_size = data[position : position + 4], struct.unpack("<I", data[position + 4 : position + 8])[0]
        if chunk_id == b"fmt " and position + 22 <= len(data):
            block_align = struct.unpack("<H", data[position + 20 : position + 22])[0]
        if chunk_id == b"data":
            if block_align in (None, 0) or chunk_size in (0, 0xFFFFFFFF):
                return None
            return chunk_size // block_align
        position += 8 + chunk_size + (chunk_size & 1)
    return None


def _libsndfile_message(error: Exception) -> str:
    """libsndfile's own words, without the in-memory file object's repr."""
    return str(getattr(error, "error_string", None) or error).strip()


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Samples as float32 [samples, channels] in [-1, 1), and the sample rate.

    Raises AudioError for anything that is not whole, decodable audio.
    """
    if not data:
        raise AudioError("empty", "file has zero bytes")
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError("unreadable", f"not a decodable audio file ({_libsndfile_message(error)})") from error
    try:
        samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError("corrupt", f"decoding failed ({_libsndfile_message(error)})") from error
    if samples.shape[0] == 0:
        raise AudioError("empty", "no audio samples")
    check_samples(samples)
    declared = _declared_wav_frames(data) if info.format == "WAV" else info.frames
    if declared is not None and samples.shape[0] < declared:
        raise AudioError("truncated", f"header declares {declared} samples, file holds {samples.shape[0]}")
    return samples, int(sample_rate)


def check_samples(samples: np.ndarray) -> None:
    """Refuse samples no feature can be computed from: NaN or Inf (float files), or digital silence."""
    finite = np.isfinite(samples)
    if not finite.all():
        first = int(np.argmin(finite.all(axis=1)))
        raise AudioError("non-finite", f"{int((~finite).sum())} NaN or Inf sample value(s), the first at sample {first}")
    if not samples.any():
        raise AudioError("silent", "every sample is zero (digital silence)")


def probe_audio(data: bytes) -> AudioInfo:
    """Decode the whole file once to prove it is usable, and describe it."""
    samples, sample_rate = decode_audio(data)
    return AudioInfo(
        sample_rate=sample_rate,
        channels=samples.shape[1],
        samples=samples.shape[0],
        format=soundfile.info(io.BytesIO(data)).format,
    )


def resampled_length(samples: int, sample_rate: int, target_rate: int = SAMPLE_RATE) -> int:
    """Samples after torchaudio.functional.resample: ceil(samples * target / source), rates reduced by gcd."""
    divisor = math.gcd(sample_rate, target_rate)
    source, target = sample_rate // divisor, target_rate // divisor
    return -(-samples * target // source)


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> torch.Tensor:
    """[samples, channels] float32 -> 1-D float32 tensor at 16 kHz (channels averaged)."""
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)))
    if sample_rate == SAMPLE_RATE:
        return mono
    return torchaudio.functional.resample(mono, sample_rate, SAMPLE_RATE)


def load_audio_16k(path: str, storage_options: dict[str, Any] | None = None) -> torch.Tensor:
    """A file as 1-D float32 mono 16 kHz tensor."""
    samples, sample_rate = decode_audio(read_whole(path, storage_options))
    return to_mono_16k(samples, sample_rate)
