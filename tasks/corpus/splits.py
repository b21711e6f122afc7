"""The validation split: which utterances are held out of k-means fitting and training.

`corpus.valid` is either a fraction, picked by a seeded hash of each utterance id (so an
utterance's split does not depend on the corpus order or size: adding files never moves one),
or a listing of validation ids (one id per line, or a fairseq .tsv / NeMo .jsonl whose file
names give the ids). Intake records each utterance's split in the manifest; the stages after it
read the split from there, never from the config.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.corpus.manifest import Manifest, ManifestError, Utterance
from tasks.corpus.text import read_lines

log = logging.getLogger(__name__)


class SplitSettings(Protocol):
    """The corpus section's validation split (tasks/run/config.py `CorpusConfig` is one)."""

    valid: float | str | None
    valid_seed: int


def hash_fraction(utterance_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, id) alone: sha256 of `seed:id`, first 8 bytes."""
    digest = hashlib.sha256(f"{seed}:{utterance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_fractions(ids: pa.Array, seed: int, batch: int = 65_536) -> np.ndarray:
    """`hash_fraction` of every id, a batch at a time (no Python string per id kept)."""
    out = np.empty(len(ids), dtype=np.float64)
    for start in range(0, len(ids), batch):
        out[start : start + batch] = [hash_fraction(name, seed) for name in ids.slice(start, batch).to_pylist()]
    return out


def read_id_listing(path: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The validation ids a listing names: a fairseq .tsv or NeMo .jsonl's utterances (their ids as
    intake makes them, `corpus.ids: auto`), or one id per line."""
    lowered = path.lower()
    if lowered.endswith((".tsv", ".jsonl", ".json")):
        from tasks.corpus.formats import fairseq, nemo

        reader = fairseq if lowered.endswith(".tsv") else nemo
        batches = reader.listing(path, "auto", storage_options or {}).units
        return {candidate.id for batch in batches for candidate in batch.candidates}
    return {line.strip() for line in read_lines(path, storage_options) if line.strip()}


def assign_splits(
    utterances: Manifest | Sequence[Utterance], corpus: SplitSettings, storage_options: dict[str, Any]
) -> Manifest:
    """The utterances with their split set from `corpus.valid` (column `split`); unchanged when there is none.

    Raises ManifestError when the split would leave no validation or no training utterance.
    """
    manifest = Manifest.of(utterances)
    if corpus.valid is None:
        return manifest
    ids = manifest.ids()
    if isinstance(corpus.valid, float):
        valid = hash_fractions(ids, corpus.valid_seed) < corpus.valid
        where = f"corpus.valid: a fraction of {corpus.valid} (valid_seed {corpus.valid_seed})"
    else:
        listed = read_id_listing(corpus.valid, storage_options)
        valid = pc.is_in(ids, value_set=pa.array(sorted(listed), pa.string())).to_numpy(zero_copy_only=False)
        where = f"corpus.valid: the listing {corpus.valid}"
        if missing := len(listed) - int(valid.sum()):
            log.warning("%s names %d id(s) not among the corpus's usable utterances; ignoring them", where, missing)
    count = int(valid.sum())
    if count == 0:
        raise ManifestError(f"{where} picks none of the {len(manifest)} usable utterances: there is nothing to validate on")
    if count == len(manifest):
        raise ManifestError(f"{where} picks all {len(manifest)} usable utterances: there is nothing left to train on")
    split = pa.array(np.where(valid, "valid", "train"), pa.string())
    table = manifest.table
    return Manifest(table.set_column(table.column_names.index("split"), "split", split))
