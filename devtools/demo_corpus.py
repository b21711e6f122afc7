"""A deterministic synthetic speech corpus with phone alignments, for demos and tests.

English sentences are assembled from a small built-in vocabulary and grammatical templates,
spoken by several espeak-ng voices, resampled to 16 kHz and written as:

    out_dir/wav/<utt_id>.wav      16 kHz mono PCM_16
    out_dir/align/<utt_id>.tsv    start_sec, end_sec, phone (espeak-ng's own phone timing)
    out_dir/manifest.jsonl        NeMo-style, one utterance a line, paths relative to out_dir

The same seed and length give byte-identical files: text and speaker choices come from
`numpy.random.default_rng(seed)`, and synthesis runs in a fresh espeak-ng process
(`EspeakWorker`) because the library's output depends on what it synthesized before.
The manifest is written last, so a folder without one is an interrupted run.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.transforms
from pydantic import BaseModel, ConfigDict

from devtools.espeak import EspeakWorker, PhoneSegment, SynthesisRequest, SynthesizedUtterance
from model.frames import SAMPLE_RATE

MIN_WORDS, MAX_WORDS = 4, 14
# Utterances queued ahead in the synthesis process while this one resamples and writes.
_LOOKAHEAD = 4


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str
    rate_wpm: int
    pitch: int


# espeak-ng voice variants, with rate and pitch offsets so that they sound distinct.
SPEAKERS: tuple[Speaker, ...] = (
    Speaker("m3", "en-us+m3", 165, 42),
    Speaker("f2", "en+f2", 172, 58),
    Speaker("f3", "en-us+f3", 158, 54),
    Speaker("m1", "en+m1", 150, 36),
    Speaker("m7", "en-us+m7", 182, 48),
    Speaker("f4", "en+f4", 168, 64),
    Speaker("m4", "en+m4", 176, 52),
    Speaker("f1", "en-us+f1", 160, 46),
)
RATE_JITTER_WPM = 10
PITCH_JITTER = 5

DETERMINERS = "the a this that every one my your his her our their some another".split()
ADJECTIVES = """
big small old young new long short tall warm cold hot quiet loud bright dark happy sad tired
busy clever gentle brave kind calm angry heavy light soft hard green red blue yellow white black
brown golden silver wooden empty full clean dirty strange simple famous careful early late rich
poor lucky funny serious quick slow sharp round flat narrow wide deep fresh sweet bitter lonely
friendly noisy sleepy hungry thirsty curious polite proud shy
""".split()
NOUNS = """
dog cat bird horse fish farmer teacher doctor child student driver baker painter sailor singer
neighbor friend brother sister mother father king queen soldier pilot writer table chair window
door house garden kitchen river mountain forest road bridge city village market station school
library office car train boat ship bicycle letter book paper picture song story lamp clock key
bottle cup plate basket box bag coat hat shoe ball apple bread cake cheese orange lemon flower tree
stone island beach field castle tower museum hotel camera phone computer radio piano guitar
blanket pillow candle mirror wall roof fence gate hill lake ocean cloud storm
""".split()
TRANSITIVE_VERBS = """
found saw carried opened closed painted cleaned bought sold watched followed visited helped
called pushed pulled dropped lifted moved washed fixed built broke borrowed returned
noticed remembered forgot wanted needed liked loved hated kept brought chose caught held
packed filled emptied checked counted cooked baked drew wrote read
""".split()
INTRANSITIVE_VERBS = """
slept waited smiled laughed sang danced walked ran jumped arrived left stayed worked played
listened rested stopped turned waved shouted whispered cried swam climbed wandered
""".split()
ADVERBS = """
quickly slowly quietly loudly happily sadly carefully gently suddenly finally easily rarely
often softly bravely calmly politely proudly eagerly patiently
""".split()
PREPOSITIONS = "in on under behind near beside above below into across through over past around".split()
NAMES = """
Anna Peter Maria David Sarah Thomas Laura Daniel Emma James Lucy Robert Alice Henry Clara Martin
Nora Simon Julia Oliver
""".split()
OPENERS = ["yesterday", "today", "this morning", "last night", "after lunch", "on Sunday", "later", "at noon"]
CONJUNCTIONS = ["and", "but", "while", "because", "so"]


class DemoCorpusSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    utterances: int
    speakers: int
    seconds: float
    out_dir: Path


@dataclass(frozen=True)
class _Plan:
    utt_id: str
    speaker: Speaker
    text: str
    rate_wpm: int
    pitch: int


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> list[str]:
    """Determiner, zero to two adjectives, noun; or a name."""
    if rng.random() < 0.2:
        return [_pick(rng, NAMES)]
    adjectives = [_pick(rng, ADJECTIVES) for _ in range(int(rng.choice(3, p=[0.3, 0.5, 0.2])))]
    words = adjectives + [_pick(rng, NOUNS)]
    determiner = _pick(rng, DETERMINERS)
    if determiner == "a" and words[0][0] in "aeiou":
        determiner = "an"
    return [determiner, *words]


def _clause(rng: np.random.Generator) -> list[str]:
    subject = _noun_phrase(rng)
    shape = int(rng.integers(4))
    if shape == 0:
        return subject + [_pick(rng, TRANSITIVE_VERBS)] + _noun_phrase(rng)
    if shape == 1:
        return subject + [_pick(rng, INTRANSITIVE_VERBS), _pick(rng, ADVERBS)]
    if shape == 2:
        return subject + [_pick(rng, INTRANSITIVE_VERBS), _pick(rng, PREPOSITIONS)] + _noun_phrase(rng)
    return subject + [_pick(rng, TRANSITIVE_VERBS)] + _noun_phrase(rng) + [_pick(rng, PREPOSITIONS)] + _noun_phrase(rng)


def _sentence_words(rng: np.random.Generator) -> list[str]:
    words = _clause(rng)
    roll = rng.random()
    if roll < 0.25:
        words = [*_pick(rng, OPENERS).split(), ","] + words
    elif roll < 0.45:
        words = words + [",", _pick(rng, CONJUNCTIONS)] + _clause(rng)
    return words


def make_sentence(rng: np.random.Generator) -> str:
    """A simple English sentence of MIN_WORDS to MAX_WORDS words, drawn from `rng`."""
    while True:
        words = _sentence_words(rng)
        if MIN_WORDS <= sum(word != "," for word in words) <= MAX_WORDS:
            break
    text = " ".join(words).replace(" ,", ",")
    return text[0].upper() + text[1:] + "."


def _plans(rng: np.random.Generator) -> Iterator[_Plan]:
    """Endless utterance plans: speakers round-robin in a seed-dependent order."""
    order = [SPEAKERS[int(i)] for i in rng.permutation(len(SPEAKERS))]
    index = 0
    while True:
        speaker = order[index % len(order)]
        rate = speaker.rate_wpm + int(rng.integers(-RATE_JITTER_WPM, RATE_JITTER_WPM + 1))
        pitch = speaker.pitch + int(rng.integers(-PITCH_JITTER, PITCH_JITTER + 1))
        yield _Plan(f"{speaker.name}_{index:05d}", speaker, make_sentence(rng), rate, pitch)
        index += 1


@functools.lru_cache(maxsize=4)
def _resampler(sample_rate: int) -> torchaudio.transforms.Resample:
    """Same output as torchaudio.functional.resample on float32, but builds the sinc kernel once
    (rebuilding it per utterance took most of the corpus time)."""
    return torchaudio.transforms.Resample(sample_rate, SAMPLE_RATE, dtype=torch.float32)


def _to_pcm16(utterance: SynthesizedUtterance) -> np.ndarray:
    with torch.inference_mode():
        resampled = _resampler(utterance.sample_rate)(torch.from_numpy(utterance.waveform)).numpy()
    return np.clip(np.rint(resampled * 32768.0), -32768, 32767).astype(np.int16)


def _wav_bytes(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _alignment_tsv(phones: tuple[PhoneSegment, ...], sample_rate: int) -> str:
    rows = ["start_sec\tend_sec\tphone"]
    rows += [f"{seg.start / sample_rate:.6f}\t{seg.end / sample_rate:.6f}\t{seg.phone}" for seg in phones]
    return "\n".join(rows) + "\n"


def _request(plan: _Plan) -> SynthesisRequest:
    return SynthesisRequest(plan.text, plan.speaker.voice, plan.rate_wpm, plan.pitch)


def _manifest_line(plan: _Plan, samples: int) -> str:
    return json.dumps({
        "audio_filepath": f"wav/{plan.utt_id}.wav",
        "duration": samples / SAMPLE_RATE,
        "speaker": plan.speaker.name,
        "text": plan.text,
    })


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: no half-written file at `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"demo corpus folder {out_dir} is not empty; choose a new or empty folder")
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    (out_dir / "align").mkdir(exist_ok=True)


def synthesize_demo_corpus(out_dir: Path, minutes: float, seed: int) -> DemoCorpusSummary:
    """Write a corpus of about `minutes` of speech (stopping at the first utterance that reaches
    it) into `out_dir`, which must not exist yet or be empty."""
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    target_samples = minutes * 60 * SAMPLE_RATE
    plans = _plans(np.random.default_rng(seed))
    manifest: list[str] = []
    speakers: set[str] = set()
    total_samples = 0
    with EspeakWorker() as worker:
        for plan, utterance in worker.imap(plans, _request, lookahead=_LOOKAHEAD):
            pcm = _to_pcm16(utterance)
            _write_atomically(out_dir / "wav" / f"{plan.utt_id}.wav", _wav_bytes(pcm))
            tsv = _alignment_tsv(utterance.phones, utterance.sample_rate)
            _write_atomically(out_dir / "align" / f"{plan.utt_id}.tsv", tsv.encode("utf-8"))
            manifest.append(_manifest_line(plan, len(pcm)))
            speakers.add(plan.speaker.name)
            total_samples += len(pcm)
            if total_samples >= target_samples:
                break
    _write_atomically(out_dir / "manifest.jsonl", ("\n".join(manifest) + "\n").encode("utf-8"))
    return DemoCorpusSummary(
        utterances=len(manifest),
        speakers=len(speakers),
        seconds=total_samples / SAMPLE_RATE,
        out_dir=out_dir,
    )


def cached_demo_corpus(root: Path, minutes: float, seed: int = 0) -> Path:
    """`root/corpus-<minutes>min` (synthesized once, reused after) for benchmarks; returns its wav folder.

    A folder without its manifest is an interrupted synthesis and is made again.
    """
    folder = root / f"corpus-{minutes:g}min" if seed == 0 else root / f"corpus-{minutes:g}min-seed{seed}"
    if not (folder / "manifest.jsonl").exists():
        shutil.rmtree(folder, ignore_errors=True)
        synthesize_demo_corpus(folder, minutes=minutes, seed=seed)
    return folder / "wav"
