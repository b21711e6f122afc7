"""What goes into a stage's key: the settings that change its outputs, declared where they are defined.

A stage's key digests its settings, its inputs and its version (infra/commit.py); a changed key
runs the stage again. So a setting that only changes how the work is logged, checkpointed, read
ahead or launched must stay out of the key, or changing it would throw finished work away. Each
setting says so itself, in its type:

    log_every: Annotated[int, OutputNeutral("logging")] = Field(default=100, ...)
    keep: Annotated[Literal["all", "sample"], AddedLater()] = Field(default="all", ...)

`key_settings(section)` reads those marks, once, for every stage: the neutral ones are left out,
and a setting added after runs existed is left out while it is at its default, so those runs
keep their keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class OutputNeutral:
    """The setting changes no output of its stage: it is left out of the stage's key."""

    why: str


@dataclass(frozen=True)
class AddedLater:
    """The setting was added after runs existed: it enters the key only where it is not its default
    (or, with `along_with`, where that other setting of the section is not at its default), so
    runs from before it keep their keys."""

    along_with: str | None = None


def _marks(section: type[BaseModel], name: str) -> list[object]:
    return list(section.model_fields[name].metadata)


def is_output_neutral(section: type[BaseModel], name: str) -> bool:
    return any(isinstance(mark, OutputNeutral) for mark in _marks(section, name))


def _at_default(section: BaseModel, name: str) -> bool:
    return getattr(section, name) == type(section).model_fields[name].get_default(call_default_factory=True)


def _left_out_at_default(section: BaseModel, name: str) -> bool:
    for mark in _marks(type(section), name):
        if isinstance(mark, AddedLater):
            deciding = mark.along_with or name
            return _at_default(section, deciding)
    return False


def key_settings(section: BaseModel) -> dict[str, Any]:
    """The section's settings as its stage's key takes them (nested sections alike)."""
    kept: dict[str, Any] = {}
    for name in type(section).model_fields:
        if is_output_neutral(type(section), name) or _left_out_at_default(section, name):
            continue
        value = getattr(section, name)
        kept[name] = key_settings(value) if isinstance(value, BaseModel) else section.model_dump(include={name})[name]
    return kept
