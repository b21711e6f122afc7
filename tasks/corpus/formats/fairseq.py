"""A fairseq .tsv: first line the audio root folder, then `relpath<TAB>num_samples` per line.

Relative paths resolve against the root line, itself relative to the .tsv's folder; they may lie
under the root line only where it is in the same place as the .tsv (tasks/corpus/places.py)."""

from __future__ import annotations

from typing import Any

from infra.paths import join_path, parent_of
from tasks.corpus.formats import CandidateTable, IdRule, Listing, candidate_listing
from tasks.corpus.manifest import ManifestError
from tasks.corpus.places import tsv_own_root
from tasks.corpus.text import read_lines


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    table = CandidateTable()
    root = None
    for number, line in enumerate(read_lines(source, storage_options), start=1):
        if number == 1:
            if not line.strip():
                raise ManifestError(f"{source}: line 1 must be the audio root folder")
            root = join_path(parent_of(source), line.strip())
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            raise ManifestError(f"{source} line {number}: expected 'relpath<TAB>num_samples', got {line!r}")
        table.add(path=join_path(root, fields[0]), origin=f"{source}:{number}", expected_samples=int(fields[1]))
    if root is None:
        raise ManifestError(f"{source}: line 1 must be the audio root folder")
    return candidate_listing("fairseq", table.table(), root, ids, own_root=tsv_own_root(source, root))
