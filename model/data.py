"""Training data: labels mapped onto the model's frames, random crops, length-bucketed batches.

Plain torch. Where audio and labels come from (the artifact store) is the caller's business: it
hands in an `UtteranceSource` that loads one utterance's waveform and labels. Batches are read and
cropped ahead of the step on background threads (`BatchLoader`), so a step does not wait for
object storage; what each batch holds depends only on the batch plan and the seeds.

Labels of any rate train correctly because every frame's position comes from its geometry (hop and
window in samples at 16 kHz, recorded in the labels store and derived from the model config): a
model frame takes the label whose frame centre is nearest to its own. 100 Hz MFCC labels on the
50 Hz model are every other label; 50 Hz labels map one to one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from model.frames import SAMPLE_RATE, FrameGeometry


class LabelCountMismatch(ValueError):
    """An utterance whose stored labels do not fit its audio; names the utterances."""


class UtteranceLoadError(RuntimeError):
    """Reading or preparing one utterance for a batch failed; names it (the cause is chained)."""


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
        """(waveform (samples,) float32 at 16 kHz, labels (label_frames,) int64); called from
        several threads at once."""
        ...

    def name(self, index: int) -> str:
        """How errors name the utterance (its id and where its audio lives)."""
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
    waveform: torch.Tensor,
    labels: torch.Tensor,
    max_samples: int,
    model_geometry: FrameGeometry,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A window of at most max_samples starting on a model frame, so labels stay aligned: at a
    random frame drawn from `generator`, or the first max_samples without one."""
    if waveform.shape[0] <= max_samples:
        return waveform, labels
    start_frame = 0
    if generator is not None:
        latest_start_frame = (waveform.shape[0] - max_samples) // model_geometry.hop
        start_frame = int(torch.randint(latest_start_frame + 1, (1,), generator=generator))
    start = start_frame * model_geometry.hop
    piece = waveform[start : start + max_samples].clone()  # a view would keep the whole utterance in memory
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


@dataclass(frozen=True)
class BatchShape:
    """How batches are cut: label and model geometries, the audio per batch and per utterance,
    and `prepare`, applied to each whole waveform before cropping (e.g. the model's normalisation)."""

    labels_geometry: FrameGeometry
    model_geometry: FrameGeometry
    max_batch_samples: int
    max_sample_size: int
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None


PREFETCH_BATCHES = 2
"""Batches read and cropped ahead of the one being trained on (0: each batch is read when asked for)."""

LOADER_THREADS = 4
"""Threads reading the prefetched batches' utterances. Reading (object storage, files) and decoding
release the GIL, so a few threads overlap both the reads' latency and the step's compute. Each runs
torch on one intra-op thread (a per-thread setting): an op going parallel there (a resample, a copy)
would start an OpenMP team of its own that fights the step's for the cores; measured on 2 cores,
that cost the step a quarter of its speed."""

Piece = tuple[int, int | None]
"""(utterance index, crop seed or None for the utterance's head): one utterance of a batch."""

Tag = TypeVar("Tag")


class BatchLoader:
    """Loads planned batches, up to `prefetch` of them ahead of the one handed out, on a few
    threads; yields them in plan order.

    What a batch holds is decided by the plan alone (its utterances and their crop seeds), never
    by when a thread gets to it, so prefetching changes no number. Memory: at most `prefetch`
    batches of cropped pieces wait, plus one whole utterance per thread being read. An error
    loading an utterance is raised, as `UtteranceLoadError` naming it, when its batch is due,
    in the thread that iterates; the pieces still queued are then dropped.
    """

    def __init__(self, source: UtteranceSource, shape: BatchShape, prefetch: int = PREFETCH_BATCHES,
                 threads: int = LOADER_THREADS) -> None:
        if prefetch < 0 or threads < 1:
            raise ValueError(f"expected prefetch >= 0 and threads >= 1, got prefetch {prefetch}, threads {threads}")
        self.source = source
        self.shape = shape
        self.prefetch = prefetch
        self.threads = threads

    def piece(self, piece: Piece) -> tuple[torch.Tensor, torch.Tensor]:
        """One utterance as cropped for its batch, with its labels on the model's frames."""
        index, crop_seed = piece
        shape = self.shape
        try:
            waveform, labels = labelled_waveform(self.source, index, shape.labels_geometry, shape.model_geometry, shape.prepare)
        except Exception as error:
            raise UtteranceLoadError(f"loading utterance {self.source.name(index)}: {type(error).__name__}: {error}") from error
        generator = None if crop_seed is None else torch.Generator().manual_seed(crop_seed)
        return crop(waveform, labels, shape.max_sample_size, shape.model_geometry, generator)

    def batches(self, plan: Iterable[tuple[Tag, list[Piece]]]) -> Iterator[tuple[Tag, Batch]]:
        """(tag, batch) for every (tag, pieces) of `plan`, in order; close it to stop the threads early."""
        if self.prefetch == 0:
            for tag, pieces in plan:
                yield tag, collate([self.piece(piece) for piece in pieces], self.shape.model_geometry)
            return
        planned = iter(plan)
        pending: deque[tuple[Tag, list[Future]]] = deque()
        pool = ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="batch-loader", initializer=torch.set_num_threads, initargs=(1,)
        )
        try:
            while True:
                while len(pending) <= self.prefetch and (step := next(planned, None)) is not None:
                    tag, pieces = step
                    pending.append((tag, [pool.submit(self.piece, piece) for piece in pieces]))
                if not pending:
                    return
                tag, futures = pending.popleft()
                yield tag, collate([future.result() for future in futures], self.shape.model_geometry)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _lengths(source: UtteranceSource) -> list[int]:
    return [source.samples(i) for i in range(len(source))]


class BatchStream:
    """Endless batches for one rank, resumable from (epoch, position) in the global batch order.

    With several ranks, rank r takes global batches r, r + world_size, ...; `position` counts global
    batches, so every rank resumes at the same point. `state()` is the state after the batches
    handed out, not after those prefetched (`BatchLoader`); each crop's seed is a function of
    (seed, epoch, utterance), so a resumed stream crops as an uninterrupted one.
    """

    def __init__(self, source: UtteranceSource, shape: BatchShape, seed: int, rank: int = 0, world_size: int = 1,
                 prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader = BatchLoader(source, shape, prefetch)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buckets = BucketBatches(_lengths(source), shape.max_batch_samples, shape.max_sample_size, seed)
        self.epoch = 0
        self.position = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def _crop_seed(self, epoch: int, index: int) -> int:
        return ((self.seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63

    def _plan(self) -> Iterator[tuple[dict[str, int], list[Piece]]]:
        """From the current state on: (the state once this batch is taken, its pieces)."""
        epoch, position = self.epoch, self.position
        while True:
            batches = self.buckets.epoch(epoch)
            usable = len(batches) - len(batches) % self.world_size
            if usable == 0:
                raise ValueError(f"{len(batches)} batch(es) per epoch cannot feed {self.world_size} ranks")
            while position < usable:
                mine = batches[position + self.rank]
                position += self.world_size
                yield {"epoch": epoch, "position": position}, [(index, self._crop_seed(epoch, index)) for index in mine]
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        for state, batch in self.loader.batches(self._plan()):
            self.restore(state)
            yield batch


class FixedBatches:
    """The batches of a held-out set, the same on every pass: for validation numbers that compare
    across steps.

    Utterances are sorted by length (ties by index) and packed like training batches, never
    shuffled; each is cut to its first `max_sample_size` samples instead of a random crop. With
    several ranks, rank r takes batches r, r + world_size, ... (a rank may get none).
    """

    def __init__(self, source: UtteranceSource, shape: BatchShape, rank: int = 0, world_size: int = 1,
                 prefetch: int = PREFETCH_BATCHES) -> None:
        self.loader = BatchLoader(source, shape, prefetch)
        lengths = [min(length, shape.max_sample_size) for length in _lengths(source)]
        order = sorted(range(len(source)), key=lambda i: (lengths[i], i))
        self.batches = pack(order, lengths, shape.max_batch_samples)[rank::world_size]

    def __iter__(self) -> Iterator[Batch]:
        plan = ((None, [(index, None) for index in batch]) for batch in self.batches)
        for _, batch in self.loader.batches(plan):
            yield batch
