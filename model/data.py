"""Training data: labels mapped onto the model's frames, random crops, length-bucketed batches.

Plain torch. Where audio and labels come from (the artifact store) is the caller's business: it
hands in an `UtteranceSource` that loads one utterance's waveform and labels.

Labels of any rate train correctly because every frame's position comes from its geometry (hop and
window in samples at 16 kHz, recorded in the labels store and derived from the model config): a
model frame takes the label whose frame centre is nearest to its own. 100 Hz MFCC labels on the
50 Hz model are every other label; 50 Hz labels map one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from model.frames import SAMPLE_RATE, FrameGeometry


class LabelCountMismatch(ValueError):
    """An utterance whose stored labels do not fit its audio; names the utterances."""


def map_labels(labels: torch.Tensor, labels_geometry: FrameGeometry, model_geometry: FrameGeometry, frames: int) -> torch.Tensor:
    """Labels (label_frames,) -> (frames,) on the model's frames, by nearest frame centre."""
    if labels.dim() != 1:
        raise ValueError(f"expected labels of shape (label_frames,), got {tuple(labels.shape)}")
    centres = torch.arange(frames) * model_geometry.hop + (model_geometry.window - labels_geometry.window) / 2
    index = torch.round(centres / labels_geometry.hop).long().clamp_(0, max(labels.shape[0] - 1, 0))
    return labels[index]


def check_label_counts(
    items: Sequence[tuple[str, int, int]], labels_geometry: FrameGeometry
) -> None:
    """Every (utterance id, samples at 16 kHz, stored label frames) must agree within one frame."""
    problems = [
        f"{utterance_id}: {stored} labels, its {samples} samples give {labels_geometry.num_frames(samples)}"
        for utterance_id, samples, stored in items
        if abs(stored - labels_geometry.num_frames(samples)) > 1
    ]
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LabelCountMismatch(f"{len(problems)} utterance(s) have labels that do not fit their audio:\n  {listed}{more}")


class UtteranceSource(Protocol):
    """Loads utterance `index` of the training set."""

    def __len__(self) -> int: ...

    def samples(self, index: int) -> int:
        """Length at 16 kHz, known without loading."""
        ...

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(waveform (samples,) float32 at 16 kHz, labels (label_frames,) int64)."""
        ...


@dataclass(frozen=True)
class Batch:
    waveforms: torch.Tensor  # (batch, samples), zero-padded
    lengths: torch.Tensor  # (batch,) valid samples
    labels: torch.Tensor  # (batch, frames) on the model's frames, 0 where padded

    @property
    def audio_seconds(self) -> float:
        return float(self.lengths.sum()) / SAMPLE_RATE


class BucketBatches:
    """Batches of similar-length utterances holding at most `max_batch_samples` of (cropped) audio.

    The order is a pure function of (seed, epoch): utterances are sorted by length with a seeded
    tie-break, packed into batches, and the batches shuffled. Resuming needs only (epoch, index).
    """

    def __init__(self, lengths: Sequence[int], max_batch_samples: int, max_sample_size: int, seed: int) -> None:
        if max_batch_samples < max_sample_size:
            raise ValueError(f"max_batch_samples ({max_batch_samples}) must hold one max-size crop ({max_sample_size})")
        self.lengths = [min(length, max_sample_size) for length in lengths]
        self.max_batch_samples = max_batch_samples
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        jitter = torch.rand(len(self.lengths), generator=generator)
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], float(jitter[i])))
        batches = pack(order, self.lengths, self.max_batch_samples)
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]


def pack(order: Sequence[int], lengths: Sequence[int], max_batch_samples: int) -> list[list[int]]:
    """Consecutive runs of `order` whose longest length times their size fits `max_batch_samples`."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max([lengths[i] for i in current] + [lengths[index]])
        if current and longest * (len(current) + 1) > max_batch_samples:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def labelled_waveform(
    source: UtteranceSource,
    index: int,
    labels_geometry: FrameGeometry,
    model_geometry: FrameGeometry,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterance `index` as the model is fed it, with its labels on the model's frames."""
    waveform, labels = source.load(index)
    if prepare is not None:
        waveform = prepare(waveform)
    frames = model_geometry.num_frames(waveform.shape[0])
    return waveform, map_labels(labels, labels_geometry, model_geometry, frames)


def crop(
    waveform: torch.Tensor, labels: torch.Tensor, max_samples: int, model_geometry: FrameGeometry, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window of at most max_samples, starting on a model frame so labels stay aligned."""
    if waveform.shape[0] <= max_samples:
        return waveform, labels
    latest_start_frame = (waveform.shape[0] - max_samples) // model_geometry.hop
    start_frame = int(torch.randint(latest_start_frame + 1, (1,), generator=generator))
    start = start_frame * model_geometry.hop
    piece = waveform[start : start + max_samples]
    frames = model_geometry.num_frames(piece.shape[0])
    return piece, labels[start_frame : start_frame + frames]


def collate(pieces: list[tuple[torch.Tensor, torch.Tensor]], model_geometry: FrameGeometry) -> Batch:
    lengths = torch.tensor([waveform.shape[0] for waveform, _ in pieces])
    longest = int(lengths.max())
    frames = model_geometry.num_frames(longest)
    waveforms = torch.zeros((len(pieces), longest))
    labels = torch.zeros((len(pieces), frames), dtype=torch.long)
    for row, (waveform, utterance_labels) in enumerate(pieces):
        waveforms[row, : waveform.shape[0]] = waveform
        labels[row, : utterance_labels.shape[0]] = utterance_labels
    return Batch(waveforms=waveforms, lengths=lengths, labels=labels)


class BatchStream:
    """Endless batches for one rank, resumable from (epoch, position) in the global batch order.

    With several ranks, rank r takes global batches r, r + world_size, ...; `position` counts global
    batches, so every rank resumes at the same point.
    """

    def __init__(
        self,
        source: UtteranceSource,
        labels_geometry: FrameGeometry,
        model_geometry: FrameGeometry,
        max_batch_samples: int,
        max_sample_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`prepare` is applied to each whole waveform before cropping (e.g. the model's normalisation)."""
        self.source = source
        self.prepare = prepare
        self.labels_geometry = labels_geometry
        self.model_geometry = model_geometry
        self.max_sample_size = max_sample_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buckets = BucketBatches(
            [source.samples(i) for i in range(len(source))], max_batch_samples, max_sample_size, seed
        )
        self.epoch = 0
        self.position = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def _piece(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        waveform, mapped = labelled_waveform(self.source, index, self.labels_geometry, self.model_geometry, self.prepare)
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index) % 2**63)
        return crop(waveform, mapped, self.max_sample_size, self.model_geometry, generator)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batches = self.buckets.epoch(self.epoch)
            usable = len(batches) - len(batches) % self.world_size
            if usable == 0:
                raise ValueError(f"{len(batches)} batch(es) per epoch cannot feed {self.world_size} ranks")
            while self.position < usable:
                mine = batches[self.position + self.rank]
                self.position += self.world_size
                yield collate([self._piece(index) for index in mine], self.model_geometry)
            self.epoch += 1
            self.position = 0


class FixedBatches:
    """The batches of a held-out set, the same on every pass: for validation numbers that compare
    across steps.

    Utterances are sorted by length (ties by index) and packed like training batches, never
    shuffled; each is cut to its first `max_sample_size` samples instead of a random crop. With
    several ranks, rank r takes batches r, r + world_size, ... (a rank may get none).
    """

    def __init__(
        self,
        source: UtteranceSource,
        labels_geometry: FrameGeometry,
        model_geometry: FrameGeometry,
        max_batch_samples: int,
        max_sample_size: int,
        rank: int = 0,
        world_size: int = 1,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.source = source
        self.labels_geometry = labels_geometry
        self.model_geometry = model_geometry
        self.max_sample_size = max_sample_size
        self.prepare = prepare
        lengths = [min(source.samples(i), max_sample_size) for i in range(len(source))]
        order = sorted(range(len(source)), key=lambda i: (lengths[i], i))
        self.batches = pack(order, lengths, max_batch_samples)[rank::world_size]

    def _piece(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        waveform, labels = labelled_waveform(self.source, index, self.labels_geometry, self.model_geometry, self.prepare)
        piece = waveform[: self.max_sample_size]
        return piece, labels[: self.model_geometry.num_frames(piece.shape[0])]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            yield collate([self._piece(index) for index in batch], self.model_geometry)
