"""A small ctypes binding to espeak-ng (the C library shipped by the `espeakng-loader` wheel).

Only what the demo corpus needs: synthesize a sentence with a voice, a speaking rate and a pitch,
and get back the waveform together with the phone segments espeak-ng itself reports (phoneme
events carry the output sample at which each phoneme starts).

espeak-ng keeps all of its state in C globals, so:

* the library is initialised once per process and every synthesis holds a process-wide lock
  (`EspeakSynthesizer` instances share both);
* the audio of one call depends on what the library synthesized before it in the same process
  (pitch flutter phase, gain control and roughness counters are static variables that no API call
  resets). Replaying the same sequence of calls in a fresh process gives byte-identical audio.
  `EspeakWorker` provides that fresh process when exact reproducibility matters.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import pickle
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, TypeVar

import espeakng_loader
import numpy as np

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_PHONEME_EVENTS = 0x0001
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # without it, a failed initialisation calls exit(1)
ESPEAK_EVENT_LIST_TERMINATED = 0
ESPEAK_EVENT_PHONEME = 7
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
ESPEAK_RATE = 1
ESPEAK_PITCH = 3
EE_OK = 0
EE_NOT_FOUND = 2

MIN_RATE_WPM, MAX_RATE_WPM = 80, 450
MIN_PITCH, MAX_PITCH = 0, 100

# Milliseconds of audio per callback. espeak-ng sizes its event list from it and silently drops
# events once that list is full, so it must comfortably hold every phoneme of one buffer.
_BUFFER_MS = 200
# Fixed seed for the breath-noise generators, re-applied before every synthesis.
_NOISE_SEED = 0
# Stress marks espeak-ng prefixes to a phoneme mnemonic ("'aU", ",oU"); not part of the phone.
_STRESS_MARKS = "',"


class _Event(ctypes.Structure):
    """espeak_EVENT; `id` is the union's `char string[8]` member (the phoneme mnemonic)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class PhoneSegment(NamedTuple):
    """A phone from `start` (inclusive) to `end` (exclusive), in samples of the synthesized audio."""

    start: int
    end: int
    phone: str


@dataclass(frozen=True)
class SynthesizedUtterance:
    waveform: np.ndarray  # float32, mono, in [-1, 1)
    sample_rate: int
    phones: tuple[PhoneSegment, ...]

    @property
    def seconds(self) -> float:
        return len(self.waveform) / self.sample_rate


class _Library:
    """The loaded, initialised library; exactly one per process (see `_library`)."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._declare_signatures()
        data_path = espeakng_loader.get_data_path().encode()
        options = ESPEAK_INITIALIZE_PHONEME_EVENTS | ESPEAK_INITIALIZE_DONT_EXIT
        rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, options)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}, data path {data_path.decode()})")
        self.sample_rate: int = rate
        self.samples: list[np.ndarray] = []
        self.events: list[tuple[int, str]] = []
        self._callback = _SynthCallback(self._on_synth)  # kept referenced: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.libc_srand = _find_libc_srand()

    def _declare_signatures(self) -> None:
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        if hasattr(lib, "espeak_ng_SetRandSeed"):
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = ctypes.c_int

    def _on_synth(self, wav: ctypes._Pointer, count: int, events: ctypes._Pointer) -> int:
        """Collects audio and phoneme events; must not raise (it runs inside C)."""
        if count > 0 and wav:
            self.samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        index = 0
        while events[index].type != ESPEAK_EVENT_LIST_TERMINATED:
            event = events[index]
            if event.type == ESPEAK_EVENT_PHONEME:
                self.events.append((event.sample, event.id.decode("latin-1")))
            index += 1
        return 0

    def reseed_noise(self) -> None:
        """Breath noise uses espeak-ng's own generator and libc rand(); fix both per call.

        libc's generator is shared by the whole process: synthesis resets it as a side effect."""
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(_NOISE_SEED)
        if self.libc_srand is not None:
            self.libc_srand(_NOISE_SEED)


def _find_libc_srand() -> ctypes._CFuncPtr | None:
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError):
        return None
    srand.argtypes = [ctypes.c_uint]
    srand.restype = None
    return srand


_library_lock = threading.Lock()
_library_instance: _Library | None = None


def _library() -> _Library:
    global _library_instance
    with _library_lock:
        if _library_instance is None:
            _library_instance = _Library()
        return _library_instance


def _check(call: str, code: int, voice: str) -> None:
    if code != EE_OK:
        reason = "voice not found" if code == EE_NOT_FOUND else f"error code {code}"
        raise RuntimeError(f"{call} failed for voice {voice!r}: {reason}")


def phone_segments(events: list[tuple[int, str]], total_samples: int) -> tuple[PhoneSegment, ...]:
    """Turn phoneme events (sample, mnemonic) into labelled segments.

    A phone runs from its event to the next phoneme event (or the end of the audio). Pauses
    (`_`, `_:`, `_!`, ...) and empty mnemonics end the previous phone but are not labelled
    themselves; stress marks are stripped; zero-length segments are dropped.
    """
    segments: list[PhoneSegment] = []
    ordered = sorted(events, key=lambda event: event[0])
    for index, (start, mnemonic) in enumerate(ordered):
        end = ordered[index + 1][0] if index + 1 < len(ordered) else total_samples
        start, end = max(0, start), min(end, total_samples)
        phone = mnemonic.lstrip(_STRESS_MARKS).strip()
        if not phone or phone.startswith("_") or end <= start:
            continue
        segments.append(PhoneSegment(start, end, phone))
    return tuple(segments)


class EspeakSynthesizer:
    """Text to speech with espeak-ng, with the phone segmentation espeak-ng reports.

    The C library is process-global: the first instance initialises it for the whole process and
    all instances serialise synthesis on one lock. Output depends on the calls made before it in
    the same process (see the module docstring); use `EspeakWorker` for reproducible sequences.
    """

    def __init__(self) -> None:
        self._lib = _library()

    @property
    def sample_rate(self) -> int:
        return self._lib.sample_rate

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int) -> SynthesizedUtterance:
        """Speak `text` with espeak-ng voice `voice` (e.g. "en-us+m3") at `rate_wpm` words per
        minute and `pitch` (0-100, espeak-ng's default 50)."""
        if not MIN_RATE_WPM <= rate_wpm <= MAX_RATE_WPM:
            raise ValueError(f"rate_wpm {rate_wpm} outside [{MIN_RATE_WPM}, {MAX_RATE_WPM}]")
        if not MIN_PITCH <= pitch <= MAX_PITCH:
            raise ValueError(f"pitch {pitch} outside [{MIN_PITCH}, {MAX_PITCH}]")
        encoded = text.encode("utf-8") + b"\0"
        lib = self._lib
        with _library_lock:
            _check("espeak_SetVoiceByName", lib.lib.espeak_SetVoiceByName(voice.encode("utf-8")), voice)
            _check("espeak_SetParameter(rate)", lib.lib.espeak_SetParameter(ESPEAK_RATE, rate_wpm, 0), voice)
            _check("espeak_SetParameter(pitch)", lib.lib.espeak_SetParameter(ESPEAK_PITCH, pitch, 0), voice)
            lib.reseed_noise()
            lib.samples, lib.events = [], []
            buffer = ctypes.create_string_buffer(encoded, len(encoded))
            code = lib.lib.espeak_Synth(buffer, len(encoded), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
            _check("espeak_Synth", code, voice)
            _check("espeak_Synchronize", lib.lib.espeak_Synchronize(), voice)
            samples, events = lib.samples, lib.events
            lib.samples, lib.events = [], []
        pcm = np.concatenate(samples) if samples else np.zeros(0, dtype=np.int16)
        if pcm.size == 0:
            raise RuntimeError(f"espeak_Synth produced no audio for voice {voice!r} and text {text!r}")
        waveform = pcm.astype(np.float32) / np.float32(32768.0)
        return SynthesizedUtterance(waveform, lib.sample_rate, phone_segments(events, len(pcm)))


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str
    rate_wpm: int
    pitch: int


T = TypeVar("T")


class EspeakWorker:
    """Synthesis in a fresh child interpreter, requests answered in order.

    A fresh process starts espeak-ng from its initial state, so the same sequence of requests
    yields byte-identical audio whatever the calling process did before, and the caller can
    resample and write files while the next utterances are synthesized. The child is a plain
    `python -c` process speaking pickle over its stdin/stdout (not multiprocessing), so it does
    not re-import the caller's `__main__`. Starting it costs a fraction of a second.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._in_flight = 0

    def __enter__(self) -> EspeakWorker:
        paths = [path or os.getcwd() for path in sys.path]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        command = [sys.executable, "-c", f"import {__name__} as espeak; espeak._serve()"]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def imap(
        self, items: Iterable[T], request: Callable[[T], SynthesisRequest], lookahead: int = 4
    ) -> Iterator[tuple[T, SynthesizedUtterance]]:
        """Synthesize `request(item)` for each item, keeping up to `lookahead` requests queued in
        the child. `items` may be endless: it is consumed only as results are taken."""
        queued: deque[T] = deque()
        iterator = iter(items)
        while True:
            for item in itertools.islice(iterator, lookahead - len(queued)):
                self._send(request(item))
                queued.append(item)
            if not queued:
                return
            yield queued.popleft(), self._receive()

    def _send(self, request: SynthesisRequest) -> None:
        if self._process is None or self._process.stdin is None:
            raise RuntimeError("EspeakWorker is not running: use it as a context manager")
        pickle.dump(request, self._process.stdin)
        self._process.stdin.flush()
        self._in_flight += 1

    def _receive(self) -> SynthesizedUtterance:
        assert self._process is not None and self._process.stdout is not None
        try:
            ok, value = pickle.load(self._process.stdout)
        except EOFError:
            raise RuntimeError(f"espeak worker process exited (code {self._process.poll()})") from None
        self._in_flight -= 1
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child; unanswered requests are abandoned."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.stdin is not None:
            process.stdin.close()
        if self._in_flight:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self._in_flight = 0


def _serve() -> None:
    """Child side of `EspeakWorker`: answer pickled requests from stdin until it closes.

    The protocol uses a private copy of stdout; anything else writing to stdout goes to stderr.
    """
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    synthesizer = EspeakSynthesizer()
    while True:
        try:
            request: SynthesisRequest = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = (True, synthesizer.synthesize(request.text, request.voice, request.rate_wpm, request.pitch))
        except (RuntimeError, ValueError) as error:
            reply = (False, error)
        pickle.dump(reply, replies)
        replies.flush()
