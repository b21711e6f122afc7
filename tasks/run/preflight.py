"""Config mistakes that the config alone cannot show, found before the expensive work they would stop.

What the config alone can tell is checked when it is loaded (tasks/run/config.py). Before a
cluster starts, in seconds, `input_problems` probes what the run reads and writes: the corpus
source, alignments and validation listing, and the store. Right after intake, before any
features, `check_kmeans_frames` checks what needs the manifest: whether each iteration's
k-means sample can hold k frames, estimated from the utterances' sample counts and the frame
geometry that iteration's features will have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fsspec

from infra.paths import count_by_suffix, unreadable_because
from infra.store import ArtifactStore
from model.frames import FrameGeometry
from model.mfcc import MFCC_GEOMETRY
from model.presets import HUBERT_CONFIGS, frame_geometry
from tasks.corpus.formats import detect_format
from tasks.corpus.manifest import AUDIO_SUFFIXES, Manifest, ManifestError, Utterance
from tasks.run.config import ConfigError, PretrainConfig


def features_geometry(config: PretrainConfig, index: int) -> FrameGeometry:
    """The frame geometry of iteration `index + 1`'s features: MFCC, or the previous iteration's preset."""
    if config.iterations[index].features.kind == "mfcc":
        return MFCC_GEOMETRY
    return frame_geometry(HUBERT_CONFIGS[config.iterations[index - 1].train.model])


def kmeans_frame_problems(config: PretrainConfig, utterances: Manifest | Sequence[Utterance]) -> list[str]:
    """Each iteration whose k-means would fit fewer frames than k, with the field to change."""
    problems = []
    samples_16k = Manifest.of(utterances).samples_16k()
    for index, iteration in enumerate(config.iterations):
        geometry = features_geometry(config, index)
        total = int(geometry.num_frames(samples_16k).sum())
        settings = iteration.kmeans
        fitted = total * settings.sample_fraction
        if settings.max_frames is not None:
            fitted = min(fitted, settings.max_frames)
        if fitted < settings.k:
            problems.append(
                f"iterations.{index + 1}.kmeans.k: {settings.k} exceeds the about {int(fitted)} frames k-means would fit on "
                f"({len(utterances)} utterances give {total} frames at {geometry.frame_rate:g} frames/s, "
                f"sample_fraction {settings.sample_fraction}); lower k or raise sample_fraction"
            )
    return problems


def check_kmeans_frames(config: PretrainConfig, utterances: Manifest | Sequence[Utterance]) -> None:
    """Raise ConfigError listing every iteration whose k is beyond what the corpus gives."""
    if problems := kmeans_frame_problems(config, utterances):
        raise ConfigError("invalid configuration for this corpus:\n  " + "\n  ".join(problems))


def _holds_audio(fs: Any, root: str) -> bool:
    """Whether any file below `root` is audio intake reads; stops at the first one found."""
    for _, _, names in fs.walk(root):
        if any(name.lower().endswith(AUDIO_SUFFIXES) for name in names):
            return True
    return False


def no_audio_because(source: str, source_format: str, storage_options: dict[str, Any]) -> str | None:
    """Why a folder of audio files holds nothing intake reads, naming what it found instead; None
    where it holds some, or the source is a manifest file or a sharded dataset. Reads the listing
    only until the first audio file."""
    if source_format not in ("auto", "files"):
        return None
    try:
        if detect_format(source, storage_options) != "files":
            return None
    except ManifestError:
        return None  # an absent source is named by unreadable_because
    fs, root = fsspec.core.url_to_fs(source, **storage_options)
    if not fs.isdir(root) or _holds_audio(fs, root):
        return None
    counts = count_by_suffix(source, storage_options) or {}
    found = ", ".join(f"{count} {suffix or 'extensionless'} file{'s' if count > 1 else ''}"
                      for suffix, count in sorted(counts.items(), key=lambda item: -item[1])[:5])
    readable = ", ".join(AUDIO_SUFFIXES)
    return (
        f"no audio file ({readable}) under {source} (found {found or 'no file at all'}); intake reads those, "
        "Hugging Face Parquet/Arrow shards, WebDataset .tar shards and Lhotse manifests (corpus.format)"
    )


def input_problems(config: PretrainConfig) -> list[str]:
    """Problems that would only surface mid-run, found in seconds before anything starts: a corpus
    source, alignments folder or validation listing that is absent or refuses our credentials, a
    source folder with no audio intake reads, and
    a store that cannot be written (probed without leaving anything: `ArtifactStore.check_writable`)."""
    problems = []
    inputs = (
        ("corpus.source", config.corpus.source),
        ("corpus.alignments", config.corpus.alignments),
        ("corpus.valid", config.corpus.valid if isinstance(config.corpus.valid, str) else None),
    )
    for field, path in inputs:
        if path is not None and (why := unreadable_because(path, config.fsspec_options)):
            what = "the listing of validation ids " if field == "corpus.valid" else ""
            problems.append(f"{field}: {what}{why}")
    if not problems and (why := no_audio_because(config.corpus.source, config.corpus.format, config.fsspec_options)):
        problems.append(f"corpus.source: {why}")
    try:
        ArtifactStore(config.store, config.fsspec_options).check_writable()
    except Exception as error:  # noqa: BLE001 - whatever the probe hits is the finding
        problems.append(f"store: {config.store} cannot be written: {type(error).__name__}: {error}")
    return problems
