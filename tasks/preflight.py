"""Config mistakes that need the corpus to be seen: checked right after intake, before any features.

What the config alone can tell is checked when it is loaded (tasks/config.py), and what the store
and the corpus source can tell before a cluster starts (flows/cli.py's preflight). What is left
needs the manifest: whether each iteration's k-means sample can hold k frames, estimated from the
utterances' sample counts and the frame geometry that iteration's features will have.
"""

from __future__ import annotations

from model.frames import FrameGeometry
from model.mfcc import MFCC_GEOMETRY
from model.presets import HUBERT_CONFIGS, frame_geometry
from tasks.config import ConfigError, PretrainConfig
from tasks.manifest import Utterance


def features_geometry(config: PretrainConfig, index: int) -> FrameGeometry:
    """The frame geometry of iteration `index + 1`'s features: MFCC, or the previous iteration's preset."""
    if config.iterations[index].features.kind == "mfcc":
        return MFCC_GEOMETRY
    return frame_geometry(HUBERT_CONFIGS[config.iterations[index - 1].train.model])


def kmeans_frame_problems(config: PretrainConfig, utterances: list[Utterance]) -> list[str]:
    """Each iteration whose k-means would fit fewer frames than k, with the field to change."""
    problems = []
    for index, iteration in enumerate(config.iterations):
        geometry = features_geometry(config, index)
        total = sum(geometry.num_frames(utterance.samples_16k) for utterance in utterances)
        settings = iteration.kmeans
        fitted = total * settings.sample_fraction
        if settings.max_frames is not None:
            fitted = min(fitted, settings.max_frames)
        if fitted < settings.k:
            problems.append(
                f"iterations.{index}.kmeans.k: {settings.k} exceeds the about {int(fitted)} frames k-means would fit on "
                f"({len(utterances)} utterances give {total} frames at {geometry.frame_rate:g} frames/s, "
                f"sample_fraction {settings.sample_fraction}); lower k or raise sample_fraction"
            )
    return problems


def check_kmeans_frames(config: PretrainConfig, utterances: list[Utterance]) -> None:
    """Raise ConfigError listing every iteration whose k is beyond what the corpus gives."""
    if problems := kmeans_frame_problems(config, utterances):
        raise ConfigError("invalid configuration for this corpus:\n  " + "\n  ".join(problems))
