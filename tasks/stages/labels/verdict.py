"""Is an iteration's labels better than the last? The verdict the report, `inspect` and the gate share.

HuBERT's premise is that each iteration's labels are better than the previous one's; a later
iteration whose labels are worse is a failure to report, never a result to plot silently. Two
figures answer two questions: the change in PNMI (better? needs phone alignments) and the NMI
between the two label sets on the same frames (how far did the targets move? always known).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from infra.commit import StageRecord

Word = Literal["better", "worse", "unchanged", "unmeasured", "first iteration"]
SAME_WITHIN = 1e-4


@dataclass(frozen=True)
class Verdict:
    iteration: int
    pnmi: float | None
    previous_pnmi: float | None
    nmi_with_previous: float | None

    @property
    def pnmi_change(self) -> float | None:
        if self.pnmi is None or self.previous_pnmi is None:
            return None
        return self.pnmi - self.previous_pnmi

    @property
    def word(self) -> Word:
        if self.iteration == 1:
            return "first iteration"
        change = self.pnmi_change
        if change is None:
            return "unmeasured"
        if abs(change) <= SAME_WITHIN:
            return "unchanged"
        return "better" if change > 0 else "worse"

    def sentence(self) -> str:
        """One line for people: both figures, whatever is known."""
        if self.iteration == 1:
            return "iteration 1: nothing to compare with" + ("" if self.pnmi is None else f" (PNMI {self.pnmi:.3f})")
        parts = []
        if self.pnmi_change is not None:
            parts.append(f"PNMI {self.previous_pnmi:.3f} -> {self.pnmi:.3f} ({self.pnmi_change:+.3f})")
        else:
            parts.append("PNMI not measured (no phone alignments)")
        if self.nmi_with_previous is not None:
            parts.append(f"NMI with iteration {self.iteration - 1}'s labels {self.nmi_with_previous:.3f}")
        return f"iteration {self.iteration} vs {self.iteration - 1}: {self.word}: " + ", ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.word,
            "pnmi": self.pnmi,
            "previous_pnmi": self.previous_pnmi,
            "pnmi_change": self.pnmi_change,
            "nmi_with_previous": self.nmi_with_previous,
        }


def _pnmi(labels: StageRecord | None) -> float | None:
    quality = None if labels is None else labels.metrics.get("quality")
    return None if not quality else float(quality["pnmi"])


def iteration_verdict(iteration: int, labels: StageRecord | None, previous_labels: StageRecord | None) -> Verdict | None:
    """The verdict on iteration `iteration`'s labels; None until they are committed."""
    if labels is None:
        return None
    agreement = labels.metrics.get("agreement") or {}
    return Verdict(
        iteration=iteration,
        pnmi=_pnmi(labels),
        previous_pnmi=_pnmi(previous_labels) if iteration > 1 else None,
        nmi_with_previous=agreement.get("nmi"),
    )


class QualityGateFailed(RuntimeError):
    """Labels fell short of `quality_gate.min_pnmi_gain`: the run stops before training on them."""

    retryable = False  # a retry measures the same labels


def enforce_quality_gate(verdict: Verdict, min_pnmi_gain: float) -> None:
    """Raise QualityGateFailed, naming both figures, when the PNMI gain falls short."""
    if verdict.iteration == 1:
        return
    if verdict.pnmi_change is None:
        raise QualityGateFailed(f"quality gate: iteration {verdict.iteration}'s PNMI cannot be compared: {verdict.sentence()}")
    if verdict.pnmi_change < min_pnmi_gain:
        raise QualityGateFailed(
            f"quality gate: iteration {verdict.iteration}'s labels have PNMI {verdict.pnmi:.4f}, iteration "
            f"{verdict.iteration - 1}'s {verdict.previous_pnmi:.4f}: a gain of {verdict.pnmi_change:+.4f} is below "
            f"quality_gate.min_pnmi_gain {min_pnmi_gain:+.4f}; not training on them "
            f"(NMI between the two label sets {verdict.nmi_with_previous})"
        )
