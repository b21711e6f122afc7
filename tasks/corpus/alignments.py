"""Phone alignments of a corpus: one `<utt_id>.tsv` per utterance (header, then start_sec end_sec phone)."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec

from model.quality import PhoneSegments, parse_alignment

ALIGNMENT_SUFFIXES = (".tsv",)


def alignment_path(folder: str, utterance_id: str) -> str:
    return posixpath.join(folder.rstrip("/"), f"{utterance_id}.tsv")


def read_alignment(path: str, storage_options: dict[str, Any] | None = None) -> PhoneSegments | None:
    """The utterance's phone segments; None if it has no alignment file."""
    try:
        with fsspec.open(path, "rt", **(storage_options or {})) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    return parse_alignment(lines, path)
