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
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.corpus.manifest import ManifestError
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


class ValidSplit:
    """`corpus.valid` as a rule applied to ids a batch at a time (intake splits each probed batch
    as it arrives), and the check that it left both splits some utterances."""

    def __init__(self, corpus: SplitSettings, storage_options: dict[str, Any]) -> None:
        self.fraction = corpus.valid if isinstance(corpus.valid, float) else None
        self.seed = corpus.valid_seed
        self.listed: pa.Array | None = None
        if isinstance(corpus.valid, str):
            self.listed = pa.array(sorted(read_id_listing(corpus.valid, storage_options)), pa.string())
            self.where = f"corpus.valid: the listing {corpus.valid}"
        else:
            self.where = f"corpus.valid: a fraction of {corpus.valid} (valid_seed {corpus.valid_seed})"

    def is_valid(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """[ids] bool: which of these ids are in the validation split."""
        if self.fraction is not None:
            return hash_fractions(ids, self.seed) < self.fraction
        return pc.is_in(ids, value_set=self.listed).to_numpy(zero_copy_only=False)

    def split_column(self, ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        return pa.array(np.where(self.is_valid(ids), "valid", "train"), pa.string())

    def check(self, usable: int, valid: int) -> None:
        """Raises ManifestError when `valid` of the `usable` (unique) utterances leave no validation
        or no training utterance; warns of listed ids that named none."""
        if self.listed is not None and (missing := len(self.listed) - valid):
            log.warning("%s names %d id(s) not among the corpus's usable utterances; ignoring them", self.where, missing)
        if valid == 0:
            raise ManifestError(f"{self.where} picks none of the {usable} usable utterances: there is nothing to validate on")
        if valid == usable:
            raise ManifestError(f"{self.where} picks all {usable} usable utterances: there is nothing left to train on")
