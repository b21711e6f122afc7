"""Taking a corpus in on Dask: its source listed (tasks/corpus/formats/), every file or shard probed
on the workers (tasks/corpus/probe.py), the usable utterances gathered as manifest rows and the
rejected ones with their reasons.

Shared by intake (which writes the manifest) and `hubert-pipeline units` (which applies a bundle to
any corpus), so both take and refuse the same files for the same reasons. One bad file never
stops a corpus; a problem with the storage itself raises. The driver never holds the utterances:
the probe tasks' results are written on as manifest Parquet in source order as they arrive.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client

from infra.cluster import release_memory
from infra.digest import hashes64, repeated_hashes
from infra.parts import gather_parts
from tasks.corpus.formats import Listing, ProbeUnit, SourceSettings, check_unique, list_source
from tasks.corpus.manifest import MANIFEST_SCHEMA, ManifestError, ParquetRows, conform
from tasks.corpus.probe import ProbeSettings, Rejection
from tasks.corpus.splits import ValidSplit

log = logging.getLogger(__name__)

REJECTION_SCHEMA = pa.schema([(name, pa.string()) for name in Rejection.model_fields])
REPORT_LISTS_AT_MOST = 1000
"""Rejections the JSON report lists (the Parquet one holds every one)."""
LOGGED_AT_MOST = 20


class CorpusSettings(SourceSettings, ProbeSettings, Protocol):
    """The corpus section as intake reads it (tasks/run/config.py `CorpusConfig` is one)."""


def probe_unit(unit: ProbeUnit, settings: ProbeSettings, storage_options: dict[str, Any]) -> tuple[str, pa.Table, pa.Table]:
    """One Dask task: probe a batch of files or a shard; its utterances and rejections as tables."""
    probed = unit.probe(settings, storage_options)
    rejected = pa.Table.from_pylist([rejection.model_dump() for rejection in probed.rejections], schema=REJECTION_SCHEMA)
    return unit.name, probed.table, rejected


@dataclass(frozen=True)
class TakenIn:
    """A corpus source probed: its usable utterances as manifest Parquet (source order, split set
    where a rule was given), every rejected file with its reason as Parquet, the counts, and how the
    source was read."""

    manifest: bytes
    rejections: bytes
    counts: dict[str, Any]
    rejected_by_reason: dict[str, int]
    first_rejections: list[dict[str, str]]
    format: str
    id_rule: str

    def report(self) -> dict[str, Any]:
        """The intake report: the source's format and id rule, the count of rejected files by
        reason, and the first REPORT_LISTS_AT_MOST of them with their reasons (`rejections` holds
        every one)."""
        return {
            "format": self.format,
            "id_rule": self.id_rule,
            "rejected": self.first_rejections,
            "rejected_count": self.counts["rejected"],
            "rejected_by_reason": self.rejected_by_reason,
        }


class ProbeResults:
    """Probe tasks' results folded in source order as they arrive: accepted rows written on as
    manifest Parquet (their split set by `split`), rejections as theirs. The driver keeps an 8-byte
    hash of each utterance's id (for the clash check) and the counts, never the rows."""

    def __init__(self, split: ValidSplit | None) -> None:
        self.split = split
        self.manifest = ParquetRows(MANIFEST_SCHEMA)
        self.rejections = ParquetRows(REJECTION_SCHEMA)
        self.first_rejections: list[dict[str, str]] = []
        self.by_reason: Counter[str] = Counter()
        self.ids: list[np.ndarray] = []
        self.speakers: list[np.ndarray] = []
        self.recordings: list[np.ndarray] = []
        self.valid = 0
        self.seconds = 0.0
        self.arrived: dict[int, tuple[pa.Table, pa.Table]] = {}
        self.next_index = 0

    def add(self, index: int, accepted: pa.Table, rejected: pa.Table) -> None:
        """A task's result: folded once every task before it in source order has been."""
        self.arrived[index] = accepted, rejected
        while self.next_index in self.arrived:
            self._fold(*self.arrived.pop(self.next_index))
            self.next_index += 1

    def _fold(self, accepted: pa.Table, rejected: pa.Table) -> None:
        table = conform(accepted)
        if self.split is not None:
            split = self.split.split_column(table.column("id"))
            table = table.set_column(table.column_names.index("split"), "split", split)
            self.valid += int(pc.sum(pc.equal(split, "valid")).as_py() or 0)
        self.manifest.add(table)
        self.ids.append(hashes64(table.column("id")))
        self.speakers.append(hashes64(pc.unique(table.column("speaker"))))
        self.recordings.append(hashes64(pc.unique(table.column("recording"))))
        self.seconds += float(pc.sum(pc.divide(pc.cast(table.column("samples"), pa.float64()), table.column("sample_rate"))).as_py() or 0.0)
        self.rejections.add(rejected)
        self.by_reason.update(rejected.column("reason").to_pylist())
        if len(self.first_rejections) < REPORT_LISTS_AT_MOST:
            self.first_rejections += rejected.slice(0, REPORT_LISTS_AT_MOST - len(self.first_rejections)).to_pylist()

    def finish(self, listing: Listing) -> TakenIn:
        """Everything folded, its ids checked for clashes (ManifestError naming them)."""
        if self.arrived:
            raise RuntimeError(f"probe results never folded: tasks {sorted(self.arrived)[:5]} arrived, {self.next_index} missing")
        manifest = self.manifest.finish()
        _check_unique_ids(manifest, np.concatenate(self.ids) if self.ids else np.empty(0, np.uint64), listing.id_rule)
        counts = {
            "utterances": self.manifest.rows,
            "valid_utterances": self.valid,
            "rejected": self.rejections.rows,
            "hours": round(self.seconds / 3600, 4),
            "speakers": _distinct(self.speakers),
            "recordings_cut": _distinct(self.recordings),
        }
        return TakenIn(
            manifest, self.rejections.finish(), counts, dict(self.by_reason), self.first_rejections, listing.format, listing.id_rule
        )


def _distinct(hash_batches: list[np.ndarray]) -> int:
    return len(np.unique(np.concatenate(hash_batches))) if hash_batches else 0


def _check_unique_ids(manifest: bytes, id_hashes: np.ndarray, id_rule: str) -> None:
    """Two utterances with one id would share labels and features: refuse, naming both. The rows
    whose ids' hashes repeat are read back from the manifest and compared (`check_unique`)."""
    repeated = repeated_hashes(id_hashes)
    if not len(repeated):
        return
    parquet = pq.ParquetFile(io.BytesIO(manifest))
    suspects = []
    for group in range(parquet.num_row_groups):
        rows = parquet.read_row_group(group, columns=["id", "path", "member"])
        suspects.append(rows.filter(pa.array(np.isin(hashes64(rows.column("id")), repeated))))
    check_unique(pa.concat_tables(suspects), f"ids: {id_rule}")


def probe_listing(
    client: Client, listing: Listing, settings: ProbeSettings, storage_options: dict[str, Any], description: str,
    split: ValidSplit | None = None,
) -> TakenIn:
    """Every probe task of a listing on Dask, its results folded in source order as they arrive."""
    names = [f"probe-{index}" for index in range(len(listing.units))]
    results = ProbeResults(split)

    def keep(result: tuple[str, pa.Table, pa.Table]) -> None:
        name, accepted, rejected = result
        results.add(int(name.rsplit("-", 1)[1]), accepted, rejected)

    gather_parts(
        client, probe_unit, listing.units, names, description, on_result=keep, settings=settings, storage_options=storage_options
    )
    return results.finish(listing)


def take_in(
    client: Client, corpus: CorpusSettings, storage_options: dict[str, Any], description: str, split: ValidSplit | None = None
) -> TakenIn:
    """List a corpus source, refuse clashing ids, probe every file on Dask; rejections are logged.
    With `split`, each utterance's split is set by it.

    ManifestError when the source lists no audio (every file rejected is the caller's to judge,
    after it has written the report)."""
    listing = list_source(corpus, storage_options)
    release_memory()  # what listing a million files built and dropped, before probing them
    if not listing.units or listing.candidates == 0:
        raise ManifestError(f"no audio files (wav, flac, mp3, ogg, opus) in corpus source {corpus.source}")
    what = f"{listing.candidates} files" if listing.candidates is not None else f"{len(listing.units)} {listing.format} shards"
    log.info("%s: probing %s on %d Dask worker(s) (ids: %s)", description, what, len(client.scheduler_info()["workers"]), listing.id_rule)
    taken = probe_listing(client, listing, corpus, storage_options, description, split)
    for rejection in taken.first_rejections[:LOGGED_AT_MOST]:
        log.warning("%s: skipping %s (%s): %s", description, rejection["path"], rejection["reason"], rejection["detail"])
    if taken.counts["rejected"] > LOGGED_AT_MOST:
        log.warning("%s: ... and %d more rejected files (see the intake report)", description, taken.counts["rejected"] - LOGGED_AT_MOST)
    return taken
