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

from tasks.corpus.manifest import ManifestError, Utterance, read_fairseq_tsv, read_lines, read_nemo_jsonl

log = logging.getLogger(__name__)


class SplitSettings(Protocol):
    """The corpus section's validation split (tasks/run/config.py `CorpusConfig` is one)."""

    valid: float | str | None
    valid_seed: int


def hash_fraction(utterance_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, id) alone: sha256 of `seed:id`, first 8 bytes."""
    digest = hashlib.sha256(f"{seed}:{utterance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_id_listing(path: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """The validation ids a listing names: a fairseq .tsv or NeMo .jsonl's utterances, or one id per line."""
    lowered = path.lower()
    if lowered.endswith(".tsv"):
        return {candidate.id for candidate in read_fairseq_tsv(path, storage_options)}
    if lowered.endswith((".jsonl", ".json")):
        return {candidate.id for candidate in read_nemo_jsonl(path, storage_options)}
    return {line.strip() for line in read_lines(path, storage_options) if line.strip()}


def assign_splits(utterances: list[Utterance], corpus: SplitSettings, storage_options: dict[str, Any]) -> list[Utterance]:
    """The utterances with their split set from `corpus.valid`; unchanged when there is none.

    Raises ManifestError when the split would leave no validation or no training utterance.
    """
    if corpus.valid is None:
        return utterances
    if isinstance(corpus.valid, float):
        valid = {u.id for u in utterances if hash_fraction(u.id, corpus.valid_seed) < corpus.valid}
        where = f"corpus.valid: a fraction of {corpus.valid} (valid_seed {corpus.valid_seed})"
    else:
        listed = read_id_listing(corpus.valid, storage_options)
        valid = listed & {u.id for u in utterances}
        where = f"corpus.valid: the listing {corpus.valid}"
        if missing := len(listed - valid):
            log.warning("%s names %d id(s) not among the corpus's usable utterances; ignoring them", where, missing)
    if not valid:
        raise ManifestError(f"{where} picks none of the {len(utterances)} usable utterances: there is nothing to validate on")
    if len(valid) == len(utterances):
        raise ManifestError(f"{where} picks all {len(utterances)} usable utterances: there is nothing left to train on")
    return [u.model_copy(update={"split": "valid"}) if u.id in valid else u for u in utterances]
