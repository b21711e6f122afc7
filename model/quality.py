"""How good are the labels: the HuBERT paper's measures against frame-level phone alignments.

For the joint distribution p(phone y, label z) over aligned frames:
- phone purity   = sum_z max_y p(y, z)   (how pure each cluster is in phones),
- cluster purity = sum_y max_z p(y, z)   (how concentrated each phone is in one cluster),
- PNMI           = I(y; z) / H(y)        (share of phone information the labels carry).
Plus, from the labels alone: entropy (bits), clusters used, and mean segment length (frames per run
of one label within an utterance). Frames outside every phone segment are left out of the joint.

Between two label sets of the same frames (iteration N's labels and iteration N-1's, mapped onto
N's frames), the agreement is their normalised mutual information, I(a; b) / mean(H(a), H(b))
(the arithmetic normalisation, scikit-learn's default): 1 when one determines the other, 0 when
they are independent. It says how far the targets moved, whether or not phones are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class AlignmentError(ValueError):
    """An alignment file that cannot be read; names the file and line."""


@dataclass(frozen=True)
class PhoneSegments:
    starts: np.ndarray
    ends: np.ndarray
    phones: list[str]


def parse_alignment(lines: list[str], origin: str) -> PhoneSegments:
    """`start_sec end_sec phone` rows after a header line; `origin` names the file in errors."""
    starts, ends, phones = [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        try:
            start, end = float(fields[0]), float(fields[1])
            phone = fields[2]
        except (IndexError, ValueError) as error:
            raise AlignmentError(f"{origin} line {number}: expected 'start_sec end_sec phone', got {line!r}") from error
        starts.append(start)
        ends.append(end)
        phones.append(phone)
    order = np.argsort(starts, kind="stable")
    return PhoneSegments(np.asarray(starts)[order], np.asarray(ends)[order], [phones[i] for i in order])


def frame_segments(segments: PhoneSegments, frame_times: np.ndarray) -> np.ndarray:
    """Index of the segment covering each frame time (frame centres), -1 where none does."""
    index = np.searchsorted(segments.starts, frame_times, side="right") - 1
    inside = (index >= 0) & (frame_times < segments.ends[np.maximum(index, 0)])
    return np.where(inside, index, -1)


@dataclass
class LabelTally:
    """Counts that add up across chunks, from which every measure follows."""

    k: int
    previous_k: int | None = None  # with an earlier label set to compare against
    label_counts: np.ndarray = field(init=False)
    joint: dict[str, np.ndarray] = field(default_factory=dict)
    agreement: np.ndarray | None = field(init=False)  # (k, previous_k) frame counts
    runs: int = 0
    aligned_utterances: int = 0

    def __post_init__(self) -> None:
        self.label_counts = np.zeros(self.k, dtype=np.int64)
        self.agreement = None if self.previous_k is None else np.zeros((self.k, self.previous_k), dtype=np.int64)

    def add_previous(self, labels: np.ndarray, previous: np.ndarray) -> None:
        """Count (label, earlier label) pairs of the same frames."""
        pairs = np.bincount(labels.astype(np.int64) * self.previous_k + previous, minlength=self.k * self.previous_k)
        self.agreement += pairs.reshape(self.k, self.previous_k)

    def add_aligned(self, segments: PhoneSegments, segment_index: np.ndarray, labels: np.ndarray) -> None:
        """Count (phone, label) pairs of frames whose segment index is not -1."""
        covered = segment_index >= 0
        if not covered.any():
            return
        phones, inverse = np.unique(np.asarray(segments.phones)[segment_index[covered]], return_inverse=True)
        pairs = np.bincount(inverse * self.k + labels[covered], minlength=len(phones) * self.k)
        for phone, row in zip(phones.tolist(), pairs.reshape(len(phones), self.k)):
            if phone in self.joint:
                self.joint[phone] += row
            else:
                self.joint[phone] = row.astype(np.int64)

    def merge(self, other: LabelTally) -> None:
        self.label_counts += other.label_counts
        for phone, row in other.joint.items():
            if phone in self.joint:
                self.joint[phone] += row
            else:
                self.joint[phone] = row.copy()
        if other.agreement is not None:
            self.agreement += other.agreement
        self.runs += other.runs
        self.aligned_utterances += other.aligned_utterances


def label_measures(tally: LabelTally) -> dict[str, float | int]:
    counts = tally.label_counts
    total = int(counts.sum())
    probabilities = counts[counts > 0] / max(total, 1)
    return {
        "frames": total,
        "used_clusters": int((counts > 0).sum()),
        "label_entropy_bits": float(-(probabilities * np.log2(probabilities)).sum()),
        "mean_segment_frames": total / tally.runs if tally.runs else 0.0,
    }


def phone_measures(tally: LabelTally) -> dict[str, float | int] | None:
    """Purities and PNMI over aligned frames; None if no frame was aligned."""
    if not tally.joint:
        return None
    joint = np.stack([tally.joint[phone] for phone in sorted(tally.joint)]).astype(np.float64)
    aligned = joint.sum()
    if aligned == 0:
        return None
    p = joint / aligned
    p_phone = p.sum(axis=1, keepdims=True)
    p_label = p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    mutual_information = float((p[nonzero] * np.log(p[nonzero] / (p_phone @ p_label)[nonzero])).sum())
    phone_entropy = float(-(p_phone[p_phone > 0] * np.log(p_phone[p_phone > 0])).sum())
    return {
        "phone_purity": float(p.max(axis=0).sum()),
        "cluster_purity": float(p.max(axis=1).sum()),
        "pnmi": mutual_information / phone_entropy if phone_entropy > 0 else 0.0,
        "aligned_frames": int(aligned),
        "phones": len(tally.joint),
        "aligned_utterances": tally.aligned_utterances,
    }


def label_agreement(tally: LabelTally) -> dict[str, float | int] | None:
    """NMI between the labels and the earlier labels of the same frames; None without them."""
    if tally.agreement is None or tally.agreement.sum() == 0:
        return None
    p = tally.agreement.astype(np.float64) / tally.agreement.sum()
    p_labels, p_previous = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nonzero = p > 0
    mutual_information = float((p[nonzero] * np.log(p[nonzero] / (p_labels @ p_previous)[nonzero])).sum())
    entropies = [float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (p_labels, p_previous)]
    mean_entropy = sum(entropies) / 2
    return {"nmi": mutual_information / mean_entropy if mean_entropy > 0 else 1.0, "frames": int(tally.agreement.sum())}
