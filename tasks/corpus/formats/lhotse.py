"""A Lhotse manifest (the k2/icefall ecosystem's): a RecordingSet or a CutSet, as .jsonl or .jsonl.gz.

A recording is an utterance (its one file source, `type` "file" or "url"; `num_samples` checked
against the file); a cut is the span [start, start + duration) of its recording's file (the
channel it names, where the recording has several), with the speaker of its first supervision.
The cut's id is the utterance id. Relative source paths resolve against the manifest's folder.
"""

from __future__ import annotations

import json
from typing import Any

from infra.paths import join_path, parent_of
from tasks.corpus.formats import CandidateTable, IdRule, Listing, candidate_listing
from tasks.corpus.manifest import ManifestError
from tasks.corpus.text import json_lines, read_lines


def _first_entry(source: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    for line in read_lines(source, storage_options):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return None
            return entry if isinstance(entry, dict) else None
    return None


def is_lhotse_manifest(source: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether a .jsonl holds Lhotse recordings (`sources`, `sampling_rate`) or cuts (`recording`)."""
    entry = _first_entry(source, storage_options)
    return entry is not None and (("sources" in entry and "sampling_rate" in entry) or isinstance(entry.get("recording"), dict))


def _audio_file(recording: dict[str, Any], folder: str, where: str) -> str:
    sources = recording.get("sources") or []
    if len(sources) != 1 or sources[0].get("type") not in ("file", "url"):
        kinds = [source.get("type") for source in sources]
        raise ManifestError(f"{where}: recording {recording.get('id')!r} has sources {kinds}; one 'file' or 'url' source is read")
    return join_path(folder, sources[0]["source"])


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    folder = parent_of(source)
    table = CandidateTable()
    for where, entry in json_lines(source, storage_options):
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: not a JSON object")
        if isinstance(entry.get("recording"), dict):
            if entry.get("type", "MonoCut") != "MonoCut" or not isinstance(entry.get("channel", 0), int):
                raise ManifestError(f"{where}: cut {entry.get('id')!r} is a {entry.get('type')}; MonoCuts are read")
            recording = entry["recording"]
            supervisions = entry.get("supervisions") or [{}]
            speaker = supervisions[0].get("speaker")
            channels = recording.get("channel_ids") or [0]
            table.add(
                id=str(entry["id"]), path=_audio_file(recording, folder, where), origin=where,
                speaker=None if speaker is None else str(speaker), start_seconds=float(entry["start"]),
                duration_seconds=float(entry["duration"]), recording=str(recording["id"]),
                channel=int(entry.get("channel", 0)) if len(channels) > 1 else None,
            )
        elif "sources" in entry:
            table.add(
                id=str(entry["id"]), path=_audio_file(entry, folder, where), origin=where,
                expected_samples=entry.get("num_samples"),
            )
        else:
            raise ManifestError(f"{where}: neither a Lhotse recording (sources) nor a cut (recording)")
    return candidate_listing("lhotse", table.table(), folder, ids, ids_given=True)
