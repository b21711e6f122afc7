"""A NeMo-style .jsonl: one object per line with `audio_filepath`, optional `duration` and `speaker`.

Relative paths resolve against the manifest's folder."""

from __future__ import annotations

from typing import Any

from infra.paths import join_path, parent_of
from tasks.corpus.formats import CandidateTable, IdRule, Listing, candidate_listing
from tasks.corpus.manifest import ManifestError
from tasks.corpus.text import json_lines


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    folder = parent_of(source)
    table = CandidateTable()
    for where, entry in json_lines(source, storage_options):
        if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str):
            raise ManifestError(f"{where}: needs a string 'audio_filepath'")
        duration, speaker = entry.get("duration"), entry.get("speaker")
        table.add(
            path=join_path(folder, entry["audio_filepath"]), origin=where,
            speaker=None if speaker is None else str(speaker), expected_seconds=None if duration is None else float(duration),
        )
    return candidate_listing("nemo", table.table(), folder, ids)
