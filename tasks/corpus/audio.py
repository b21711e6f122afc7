"""Reading audio: decode (libsndfile via soundfile), check, mix down to mono, resample to 16 kHz.

Files are read through fsspec, so a path may be local or on object storage. torchaudio 2.9+ needs
torchcodec for file I/O; the libsndfile soundfile ships (1.2) decodes wav, flac, MP3 and Ogg
(Vorbis, Opus) with no extra system package.

An utterance's audio (tasks/corpus/manifest.py `Utterance`) is a whole file, its encoded bytes at a
byte range of a shard (a tar member, an Arrow value), or a Parquet row; and of those, the whole or
a span of samples. A span of a seekable format is read by seeking (only its bytes are fetched from
a file); MP3, whose seeking libsndfile does not place to the sample, is decoded from its start.
"""

from __future__ import annotations

import io
import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pyarrow.parquet as pq
import soundfile
import torch
import torchaudio.functional

from infra.paths import read_range, read_whole
from model.frames import SAMPLE_RATE
from tasks.corpus.manifest import Utterance

EXACT_SEEK_FORMATS = ("WAV", "WAVEX", "FLAC", "OGG", "AIFF", "W64", "RF64", "CAF")
"""libsndfile's seeking lands on the exact sample in these; in MP3 it does not (by hundreds of samples)."""


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


def decode_span(source: BinaryIO, start: int, frames: int) -> tuple[np.ndarray, int]:
    """Samples [start, start + frames) of an encoded file (seekable), as float32 [frames, channels].

    Raises AudioError where the file cannot be decoded or holds fewer samples than the span needs."""
    try:
        with soundfile.SoundFile(source) as sound:
            if sound.format in EXACT_SEEK_FORMATS:
                sound.seek(start)
                samples = sound.read(frames, dtype="float32", always_2d=True)
            else:
                samples = sound.read(start + frames, dtype="float32", always_2d=True)[start:]
            sample_rate = sound.samplerate
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError("unreadable", f"not a decodable audio file ({_libsndfile_message(error)})") from error
    if samples.shape[0] < frames:
        raise AudioError("truncated", f"the span needs samples {start}..{start + frames}, the file ends at {start + samples.shape[0]}")
    return samples, int(sample_rate)


_PARQUET_GROUPS: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
_PARQUET_GROUPS_LOCK = threading.Lock()
PARQUET_GROUPS_KEPT = 4


def parquet_audio_bytes(path: str, row_group: int, row: int, column: str, storage_options: dict[str, Any] | None) -> bytes:
    """The encoded audio of one row of a Parquet shard: its row group's audio column is read once
    (one range of the file) and kept for the rows after it (a chunk's utterances are consecutive)."""
    key = (path, row_group, column)
    with _PARQUET_GROUPS_LOCK:
        cached = _PARQUET_GROUPS.get(key)
        if cached is not None:
            _PARQUET_GROUPS.move_to_end(key)
    if cached is None:
        fs, stripped = fsspec.core.url_to_fs(path, **(storage_options or {}))
        with fs.open(stripped, "rb") as handle:
            cached = pq.ParquetFile(handle).read_row_group(row_group, columns=[column]).column(0).combine_chunks()
        with _PARQUET_GROUPS_LOCK:
            _PARQUET_GROUPS[key] = cached
            while len(_PARQUET_GROUPS) > PARQUET_GROUPS_KEPT:
                _PARQUET_GROUPS.popitem(last=False)
    value = cached[row]
    if hasattr(value, "keys"):  # a Hugging Face Audio column: {bytes, path}
        value = value["bytes"]
    data = value.as_py()
    if data is None:
        raise AudioError("empty", f"row {row} of row group {row_group} has no audio bytes in column {column}")
    return data


def encoded_bytes(utterance: Utterance, storage_options: dict[str, Any] | None) -> bytes | None:
    """The encoded audio of an utterance inside a shard, or None for a file of its own."""
    if utterance.row is not None:
        return parquet_audio_bytes(utterance.path, int(utterance.row_group or 0), utterance.row, utterance.member or "audio", storage_options)
    if utterance.byte_offset is not None:
        data = read_range(utterance.path, utterance.byte_offset, utterance.byte_length or 0, storage_options)
        if len(data) != utterance.byte_length:
            raise AudioError("truncated", f"{len(data)} bytes at offset {utterance.byte_offset}, the manifest says {utterance.byte_length}")
        return data
    return None


def read_utterance(utterance: Utterance, storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, int]:
    """An utterance's samples as float32 [samples, channels] at its own rate (one channel where it
    names one), wherever they are (see the module's docstring)."""
    data = encoded_bytes(utterance, storage_options)
    if not utterance.is_span:
        samples, sample_rate = decode_audio(data if data is not None else read_whole(utterance.path, storage_options))
    elif data is not None:
        samples, sample_rate = decode_span(io.BytesIO(data), utterance.start, utterance.samples)
    else:
        fs, stripped = fsspec.core.url_to_fs(utterance.path, **(storage_options or {}))
        with fs.open(stripped, "rb") as handle:
            samples, sample_rate = decode_span(handle, utterance.start, utterance.samples)
    if utterance.channel is not None:
        if utterance.channel >= samples.shape[1]:
            raise AudioError("unreadable", f"channel {utterance.channel} asked of audio with {samples.shape[1]} channel(s)")
        samples = samples[:, utterance.channel : utterance.channel + 1]
    return samples, sample_rate


def load_utterance_16k(utterance: Utterance, storage_options: dict[str, Any] | None = None) -> torch.Tensor:
    """An utterance as a 1-D float32 mono 16 kHz tensor."""
    samples, sample_rate = read_utterance(utterance, storage_options)
    return to_mono_16k(samples, sample_rate)
