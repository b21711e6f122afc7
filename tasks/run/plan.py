"""The run order: which stages a config runs, in which order, and where a run stops.

`plan(config, stop)` is the one answer: intake once, then each iteration's stages. The Prefect
flow (flows/pretrain.py) walks it, and so does `run_plan` (tasks/stages/catalog.py), which tests
and benchmarks use, so they run the order the CLI runs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from tasks.run.config import PretrainConfig
from tasks.run.layout import ITERATION_STAGES, StageName, stage_iteration

PlannedStage = tuple[StageName, int | None]
"""(stage, iteration); the iteration is None for intake, which runs once per run."""

MAX_LISTED_ITERATION = 9
PlanStop = Literal[tuple(["intake", *(f"{stage}@{n}" for n in range(1, MAX_LISTED_ITERATION + 1) for stage in ITERATION_STAGES)])]
"""A stage of a plan as a choice (`intake`, `features@1` ... `profile@9`): how a run form offers
`until` and `force` (a list the UI shows as a menu); `StopPoint.parse` reads it, and the CLI
accepts any iteration."""


class PlanError(ValueError):
    """A stop or start point that is not a stage of the config's plan."""

    retryable = False


def _stop_fields(text: str) -> dict[str, Any]:
    """The fields of `STAGE` or `STAGE@ITER`; PlanError where the text cannot name a stage of a plan."""
    stage, _, iteration = text.partition("@")
    if stage == "intake" and iteration:
        raise PlanError(f"{text}: intake runs once per run, not per iteration")
    if iteration and not iteration.isdigit():
        raise PlanError(f"{text}: the iteration after @ must be a number, counted from 1")
    return {"stage": stage, "iteration": int(iteration) if iteration else None}


class StopPoint(BaseModel):
    """A stage of the plan: `stage` of iteration `iteration` (intake has none)."""

    stage: StageName = Field(description="A stage: intake, features, kmeans, labels, train, profile.")
    iteration: int | None = Field(default=None, ge=1, description="Its iteration (empty: the first; intake has none).")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        """`labels@2` as the CLI writes it, as well as {stage: labels, iteration: 2}."""
        return _stop_fields(value) if isinstance(value, str) else value

    @classmethod
    def parse(cls, text: str) -> StopPoint:
        """`STAGE` (of iteration 1; intake has no iteration) or `STAGE@ITER`."""
        return cls(**_stop_fields(text))

    def planned(self) -> PlannedStage:
        return self.stage, stage_iteration(self.stage, self.iteration or 1)

    def label(self) -> str:
        stage, iteration = self.planned()
        return stage if iteration is None else f"{stage}@{iteration}"


def iteration_stages(config: PretrainConfig, iteration: int) -> tuple[StageName, ...]:
    """The stages an iteration runs, in order: features, kmeans and labels always; from iteration 2
    on with phone alignments, the equal-k reference its labels are judged against; train where
    the config has a train section (the last iteration may leave it out, to end a run with its
    previous model's units); profile and probe after a training, unless switched off (the probe
    also needs alignments and a validation split)."""
    settings = config.iterations[iteration - 1]
    wanted = {"features", "kmeans", "labels"}
    if iteration > 1 and config.corpus.alignments is not None:
        wanted.add("reference")
    if settings.train is not None:
        wanted.add("train")
        if settings.profile.enabled:
            wanted.add("profile")
        if settings.probe.enabled and config.corpus.alignments is not None and config.corpus.has_valid_split:
            wanted.add("probe")
    return tuple(stage for stage in ITERATION_STAGES if stage in wanted)


def full_plan(config: PretrainConfig) -> list[PlannedStage]:
    """Every stage the config runs, in order."""
    return [("intake", None)] + [
        (stage, number) for number in range(1, len(config.iterations) + 1) for stage in iteration_stages(config, number)
    ]


def _position(steps: list[PlannedStage], point: StopPoint, config: PretrainConfig) -> int:
    """Where `point` sits in the plan; PlanError naming what the plan holds when it is not there."""
    stage, iteration = point.planned()
    if (stage, iteration) in steps:
        return steps.index((stage, iteration))
    if iteration is not None and iteration > len(config.iterations):
        raise PlanError(f"{point.label()}: the config has {len(config.iterations)} iteration(s), counted from 1")
    held = ", ".join(iteration_stages(config, iteration)) if iteration is not None else "intake"
    raise PlanError(f"{point.label()} is not a stage of this run: iteration {iteration} runs {held}")


def plan(config: PretrainConfig, stop: StopPoint | None = None) -> list[PlannedStage]:
    """The stages to run, in order, up to and including `stop` (None: every stage)."""
    steps = full_plan(config)
    if stop is None:
        return steps
    return steps[: _position(steps, stop, config) + 1]


def stages_from(config: PretrainConfig, start: StopPoint) -> list[PlannedStage]:
    """`start` and every stage after it in the plan: what `--force` runs again."""
    steps = full_plan(config)
    return steps[_position(steps, start, config) :]
