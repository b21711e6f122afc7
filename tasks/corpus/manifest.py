"""Corpus manifests: the typed utterance record, the three source formats we read, and our own file.

Sources:
- a folder: every .wav/.flac below it, in sorted path order;
- a fairseq .tsv: first line the root folder, then `relpath<TAB>num_samples` per line;
- a NeMo-style .jsonl: one object per line with `audio_filepath`, optional `duration`, `speaker`.
Relative paths in a manifest are resolved against its root line (tsv) or its folder.
The utterance id is always the file name without its extension.

Each candidate carries the root it must lie under (the folder, the manifest's folder, or a tsv's
root line where that is in the same place as the manifest): `misplaced` says why an entry
lies outside it and any allowed root, so that intake rejects it without fetching it (a manifest
line must not make a worker request an arbitrary URL, a cloud metadata endpoint, another bucket).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from infra.paths import find_files, is_remote_url, join_path, lies_under, parent_of
from model.frames import SAMPLE_RATE
from tasks.corpus.audio import resampled_length

AUDIO_SUFFIXES = (".wav", ".flac")


class ManifestError(ValueError):
    """A source manifest that cannot be read as a whole (as opposed to one bad audio file)."""

    retryable = False  # a retry reads the same source


class Candidate(BaseModel):
    """An audio file a source lists, before it has been probed."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: str
    origin: str
    root: str = Field(description="The folder (or URL prefix) the source's own entries lie under.")
    speaker: str | None = None
    expected_samples: int | None = None
    expected_seconds: float | None = None


class Utterance(BaseModel):
    """One usable audio file, as probed at intake."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: str
    samples: int
    sample_rate: int
    channels: int
    speaker: str | None = None
    split: Literal["train", "valid"] = "train"

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    @property
    def samples_16k(self) -> int:
        """Length after resampling to the 16 kHz every model and feature here works at."""
        return resampled_length(self.samples, self.sample_rate, SAMPLE_RATE)


def utterance_id(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path.rstrip("/")))[0]


def read_lines(path: str, storage_options: dict[str, Any] | None) -> list[str]:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as handle:
            return handle.read().splitlines()
    except FileNotFoundError as error:
        raise ManifestError(f"corpus manifest not found: {path}") from error


def tsv_own_root(path: str, root: str) -> str:
    """Where a fairseq .tsv's entries lie by default: its root line (resolved, `root`) where that
    is the same kind of place as the .tsv (both local, or both in the same bucket), else the
    .tsv's folder, so that entries under a root line elsewhere must be allowed by `corpus.allowed_roots`."""
    folder = parent_of(path)
    if is_remote_url(root) != is_remote_url(folder):
        return folder
    if is_remote_url(root) and not lies_under(root, _bucket_of(folder)):
        return folder
    return root


def _bucket_of(url: str) -> str:
    """`s3://bucket` of `s3://bucket/any/prefix` (the protocol and the first path component)."""
    protocol, _, rest = url.partition("://")
    return f"{protocol}://{rest.split('/', 1)[0]}"


NAME_BREAKERS = {"\t": "a tab", "\n": "a line break", "\r": "a carriage return"}


def misplaced(candidate: Candidate, allowed_roots: list[str]) -> tuple[str, str] | None:
    """(reason, detail) when intake must reject an entry without reading it: a path outside its
    source's root and every allowed root, or one that fairseq's .tsv and our label files cannot
    hold (a tab or a line break); None when it may be read."""
    for character, name in NAME_BREAKERS.items():
        if character in candidate.path:
            return "bad file name", f"the path holds {name}, which a fairseq .tsv line cannot hold"
    roots = [candidate.root, *allowed_roots]
    if not any(lies_under(candidate.path, root) for root in roots):
        allowed = f" nor any of corpus.allowed_roots {allowed_roots}" if allowed_roots else ""
        return "outside the source", (
            f"resolves to {candidate.path}, under neither the source's root {candidate.root}{allowed}: not fetched "
            "(name its folder or URL prefix in corpus.allowed_roots to allow it)"
        )
    return None


def read_fairseq_tsv(path: str, storage_options: dict[str, Any] | None = None) -> list[Candidate]:
    lines = read_lines(path, storage_options)
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: line 1 must be the audio root folder")
    root = join_path(parent_of(path), lines[0].strip())
    own_root = tsv_own_root(path, root)
    candidates = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            raise ManifestError(f"{path} line {number}: expected 'relpath<TAB>num_samples', got {line!r}")
        candidates.append(
            Candidate(
                id=utterance_id(fields[0]),
                path=join_path(root, fields[0]),
                origin=f"{path}:{number}",
                root=own_root,
                expected_samples=int(fields[1]),
            )
        )
    return candidates


def read_nemo_jsonl(path: str, storage_options: dict[str, Any] | None = None) -> list[Candidate]:
    folder = parent_of(path)
    candidates = []
    for number, line in enumerate(read_lines(path, storage_options), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path} line {number}: not JSON ({error.msg})") from error
        if not isinstance(entry, dict) or not isinstance(entry.get("audio_filepath"), str):
            raise ManifestError(f"{path} line {number}: needs a string 'audio_filepath'")
        duration = entry.get("duration")
        speaker = entry.get("speaker")
        candidates.append(
            Candidate(
                id=utterance_id(entry["audio_filepath"]),
                path=join_path(folder, entry["audio_filepath"]),
                origin=f"{path}:{number}",
                root=folder,
                speaker=None if speaker is None else str(speaker),
                expected_seconds=None if duration is None else float(duration),
            )
        )
    return candidates


def list_candidates(source: str, storage_options: dict[str, Any] | None = None) -> list[Candidate]:
    """Every audio file a corpus source names, in source order."""
    lowered = source.lower()
    if lowered.endswith(".tsv"):
        return read_fairseq_tsv(source, storage_options)
    if lowered.endswith((".jsonl", ".json")):
        return read_nemo_jsonl(source, storage_options)
    try:
        paths = find_files(source, AUDIO_SUFFIXES, storage_options)
    except FileNotFoundError as error:
        raise ManifestError(str(error)) from error
    return [Candidate(id=utterance_id(path), path=path, origin=path, root=source) for path in paths]


def check_unique_ids(candidates: list[Candidate]) -> None:
    """Two files with the same id would share labels and features: refuse, naming both."""
    seen: dict[str, Candidate] = {}
    clashes = []
    for candidate in candidates:
        first = seen.setdefault(candidate.id, candidate)
        if first is not candidate:
            clashes.append(f"'{candidate.id}': {first.path} and {candidate.path}")
    if clashes:
        listed = "\n  ".join(clashes[:10])
        more = f"\n  ... and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        raise ManifestError(f"duplicate utterance ids (the id is the file name without extension):\n  {listed}{more}")


def manifest_to_jsonl(utterances: list[Utterance]) -> str:
    """One JSON object per line; `split` only where it is "valid", so manifests without a split read as before."""
    return "".join(
        utterance.model_dump_json(exclude={"split"} if utterance.split == "train" else None) + "\n"
        for utterance in utterances
    )


def manifest_from_jsonl(text: str) -> list[Utterance]:
    return [Utterance.model_validate_json(line) for line in text.splitlines() if line.strip()]
