"""Taking a corpus in on Dask: its source listed (tasks/corpus/formats/), every file or shard probed
on the workers (tasks/corpus/probe.py), the usable utterances gathered as manifest rows and the
rejected ones with their reasons.

Shared by intake (which writes the manifest) and `hubert-pipeline units` (which applies a bundle to
any corpus), so both take and refuse the same files for the same reasons. One bad file never
stops a corpus; a problem with the storage itself raises. The driver holds the utterances as
Arrow columns, never as a Python object each.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client

from infra.parts import gather_parts
from tasks.corpus.formats import Listing, ProbeUnit, SourceSettings, check_unique, list_source
from tasks.corpus.manifest import MANIFEST_SCHEMA, Manifest, ManifestError
from tasks.corpus.probe import ProbeSettings, Rejection

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
    """A corpus source probed: its usable utterances (manifest rows) and its rejected files (with
    their reasons: a table of `Rejection`'s fields), in source order, and how it was read."""

    utterances: Manifest
    rejections: pa.Table
    format: str
    id_rule: str

    def report(self) -> dict[str, Any]:
        """The intake report: the source's format and id rule, the count of rejected files by
        reason, and the first REPORT_LISTS_AT_MOST of them with their reasons (`rejections_parquet`
        holds every one)."""
        counts = pc.value_counts(self.rejections.column("reason")).to_pylist() if len(self.rejections) else []
        return {
            "format": self.format,
            "id_rule": self.id_rule,
            "rejected": self.rejections.slice(0, REPORT_LISTS_AT_MOST).to_pylist(),
            "rejected_count": len(self.rejections),
            "rejected_by_reason": {row["values"]: row["counts"] for row in counts},
        }

    def rejections_parquet(self) -> bytes:
        """Every rejected file with its reason, as Parquet (the intake report's columnar form)."""
        buffer = io.BytesIO()
        pq.write_table(self.rejections, buffer, compression="zstd")
        return buffer.getvalue()


def probe_listing(client: Client, listing: Listing, settings: ProbeSettings, storage_options: dict[str, Any], description: str) -> TakenIn:
    """Every probe task of a listing on Dask; results put back in source order."""
    names = [f"probe-{index}" for index in range(len(listing.units))]
    results: dict[int, tuple[pa.Table, pa.Table]] = {}

    def keep(result: tuple[str, pa.Table, pa.Table]) -> None:
        name, accepted, rejected = result
        results[int(name.rsplit("-", 1)[1])] = accepted, rejected

    gather_parts(
        client, probe_unit, listing.units, names, description, on_result=keep, settings=settings, storage_options=storage_options
    )
    ordered = [results.pop(index) for index in range(len(listing.units))]
    table = pa.concat_tables([accepted for accepted, _ in ordered]) if ordered else MANIFEST_SCHEMA.empty_table()
    rejections = pa.concat_tables([rejected for _, rejected in ordered]) if ordered else REJECTION_SCHEMA.empty_table()
    return TakenIn(Manifest(table), rejections, listing.format, listing.id_rule)


def take_in(client: Client, corpus: CorpusSettings, storage_options: dict[str, Any], description: str) -> TakenIn:
    """List a corpus source, refuse clashing ids, probe every file on Dask; rejections are logged.

    ManifestError when the source lists no audio (every file rejected is the caller's to judge,
    after it has written the report)."""
    listing = list_source(corpus, storage_options)
    if not listing.units or listing.candidates == 0:
        raise ManifestError(f"no audio files (wav, flac, mp3, ogg, opus) in corpus source {corpus.source}")
    what = f"{listing.candidates} files" if listing.candidates is not None else f"{len(listing.units)} {listing.format} shards"
    log.info("%s: probing %s on %d Dask worker(s) (ids: %s)", description, what, len(client.scheduler_info()["workers"]), listing.id_rule)
    taken = probe_listing(client, listing, corpus, storage_options, description)
    check_unique(taken.utterances.table, f"ids: {listing.id_rule}")
    for rejection in taken.rejections.slice(0, LOGGED_AT_MOST).to_pylist():
        log.warning("%s: skipping %s (%s): %s", description, rejection["path"], rejection["reason"], rejection["detail"])
    if len(taken.rejections) > LOGGED_AT_MOST:
        log.warning("%s: ... and %d more rejected files (see the intake report)", description, len(taken.rejections) - LOGGED_AT_MOST)
    return taken
