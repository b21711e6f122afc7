"""Is an iteration's labels better than the last? The verdict the report, `inspect` and the gate share.

HuBERT's premise is that each iteration's targets carry more phonetic information than the last.
A comparison is only valid at equal k, equal frame rate and on the same frames: PNMI rises with k
by itself (the paper's MFCC: 0.251 at k=100, 0.283 at k=500). So iteration N's labels are judged
against the reference stage's measure (reference@N): iteration N-1's features clustered at
iteration N's k, mapped onto iteration N's frames, on the same frames. The raw change against
iteration N-1's own labels (another k, another rate) is kept as a second, labelled figure, never
the verdict. The NMI between the two label sets says how far the targets moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from infra.commit import StageRecord

Word = Literal["better", "worse", "unchanged", "unmeasured", "first iteration"]
SAME_WITHIN = 0.005
"""A PNMI change at equal k no larger than this is "unchanged": k-means from another seed moves
both label sets' PNMI by about 0.002 (iteration 2 of the demo at k=500, seeds 0-3: changes of
+0.002, 0.000, -0.001, -0.001), so a smaller gain is not a measured improvement."""


@dataclass(frozen=True)
class Verdict:
    iteration: int
    pnmi: float | None  # iteration N's labels, on the reference's frames
    reference_pnmi: float | None  # iteration N-1's features at iteration N's k, same frames and rate
    reference: dict[str, Any] | None  # which features, k and label rate the reference is
    raw_pnmi: float | None  # iteration N's labels as their own stage measured them
    previous_pnmi: float | None  # iteration N-1's labels (their own k and rate)
    previous_k: int | None
    k: int | None
    nmi_with_previous: float | None
    probe: dict[str, Any] | None = None  # probe@N-1: the PER of the model these labels came from, and MFCC's

    @property
    def equal_k_change(self) -> float | None:
        if self.pnmi is None or self.reference_pnmi is None:
            return None
        return self.pnmi - self.reference_pnmi

    @property
    def raw_change(self) -> float | None:
        if self.raw_pnmi is None or self.previous_pnmi is None:
            return None
        return self.raw_pnmi - self.previous_pnmi

    @property
    def word(self) -> Word:
        if self.iteration == 1:
            return "first iteration"
        change = self.equal_k_change
        if change is None:
            return "unmeasured"
        if abs(change) <= SAME_WITHIN:
            return "unchanged"
        return "better" if change > 0 else "worse"

    def reference_name(self) -> str:
        if self.reference is None:
            return f"iteration {self.iteration - 1}'s features"
        return (
            f"iteration {self.iteration - 1}'s {self.reference['features']} clustered at "
            f"k={self.reference['k']}, on iteration {self.iteration}'s {self.reference['label_rate']:g} Hz frames"
        )

    def sentence(self) -> str:
        """One line for people: the equal-k figures, then the raw change, labelled as such."""
        if self.iteration == 1:
            return "iteration 1: nothing to compare with" + ("" if self.raw_pnmi is None else f" (PNMI {self.raw_pnmi:.3f})")
        parts = []
        if self.equal_k_change is not None:
            parts.append(
                f"PNMI {self.pnmi:.3f} against {self.reference_pnmi:.3f} for {self.reference_name()} "
                f"({self.equal_k_change:+.3f}"
                + (f", within the {SAME_WITHIN} a k-means seed can move it)" if self.word == "unchanged" else ")")
            )
        elif self.raw_pnmi is None:
            parts.append("PNMI not measured (no phone alignments)")
        else:
            parts.append("not measured at equal k yet (the reference stage has not run)")
        if self.raw_change is not None:
            k_note = "" if self.k == self.previous_k else ", not comparable: k differs"
            parts.append(
                f"raw: PNMI {self.previous_pnmi:.3f} (k={self.previous_k}) -> {self.raw_pnmi:.3f} (k={self.k}){k_note}"
            )
        if self.nmi_with_previous is not None:
            parts.append(f"NMI with iteration {self.iteration - 1}'s labels {self.nmi_with_previous:.3f}")
        if self.probe is not None:
            parts.append(
                f"downstream: iteration {self.iteration - 1}'s model PER {self.probe['model']['per']:.3f} against "
                f"MFCC's {self.probe['mfcc']['per']:.3f} (probe@{self.iteration - 1})"
            )
        return f"iteration {self.iteration} vs {self.iteration - 1} at equal k: {self.word}: " + "; ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.word,
            "pnmi": self.pnmi,
            "reference_pnmi": self.reference_pnmi,
            "equal_k_change": self.equal_k_change,
            "reference": self.reference,
            "raw": {
                "pnmi": self.raw_pnmi, "k": self.k, "previous_pnmi": self.previous_pnmi,
                "previous_k": self.previous_k, "change": self.raw_change,
            },
            "nmi_with_previous": self.nmi_with_previous,
            "probe": None if self.probe is None else {
                "iteration": self.iteration - 1, "per": self.probe["model"]["per"], "mfcc_per": self.probe["mfcc"]["per"],
            },
        }


def _pnmi(labels: StageRecord | None) -> float | None:
    quality = None if labels is None else labels.metrics.get("quality")
    return None if not quality else float(quality["pnmi"])


def _k(labels: StageRecord | None) -> int | None:
    return None if labels is None else int(labels.counts["k"])


def iteration_verdict(
    iteration: int, labels: StageRecord | None, previous_labels: StageRecord | None, reference: StageRecord | None = None,
    probe: StageRecord | None = None,
) -> Verdict | None:
    """The verdict on iteration `iteration`'s labels; None until they are committed. `probe` is
    probe@N-1 (the model the labels came from), shown beside the equal-k figures."""
    if labels is None:
        return None
    agreement = labels.metrics.get("agreement") or {}
    measured = reference.metrics if reference is not None else {}
    return Verdict(
        iteration=iteration,
        pnmi=measured.get("labels", {}).get("pnmi"),
        reference_pnmi=measured.get("reference", {}).get("pnmi"),
        reference=measured.get("describes"),
        raw_pnmi=_pnmi(labels),
        previous_pnmi=_pnmi(previous_labels) if iteration > 1 else None,
        previous_k=_k(previous_labels) if iteration > 1 else None,
        k=_k(labels),
        nmi_with_previous=agreement.get("nmi"),
        probe=None if probe is None or "model" not in probe.metrics else probe.metrics,
    )


class QualityGateFailed(RuntimeError):
    """Labels fell short of `quality_gate.min_pnmi_gain` at equal k: the run stops before training on them."""

    retryable = False  # a retry measures the same labels


def enforce_quality_gate(verdict: Verdict, min_pnmi_gain: float) -> None:
    """Raise QualityGateFailed, naming both equal-k figures, when the gain at equal k falls short."""
    if verdict.iteration == 1:
        return
    if verdict.equal_k_change is None:
        raise QualityGateFailed(f"quality gate: iteration {verdict.iteration}'s labels cannot be compared: {verdict.sentence()}")
    if verdict.equal_k_change < min_pnmi_gain:
        raise QualityGateFailed(
            f"quality gate: iteration {verdict.iteration}'s labels have PNMI {verdict.pnmi:.4f}, and "
            f"{verdict.reference_name()} {verdict.reference_pnmi:.4f}: a gain of {verdict.equal_k_change:+.4f} at equal k "
            f"is below quality_gate.min_pnmi_gain {min_pnmi_gain:+.4f}; not training on them "
            f"(raw, at different k: {verdict.previous_pnmi} -> {verdict.raw_pnmi})"
        )
