"""Corpus source formats, one module each, all turning a `corpus.source` into probe tasks (`Listing`).

- `files`: a folder of audio files (recursive: wav, flac, mp3, ogg, opus);
- `fairseq`: a fairseq .tsv (first line the root folder, then `relpath<TAB>num_samples`);
- `nemo`: a NeMo-style .jsonl (`audio_filepath`, optional `duration`, `speaker`);
- `lhotse`: a Lhotse RecordingSet or CutSet manifest (.jsonl or .jsonl.gz; a cut with start and
  duration is a span of its recording);
- `huggingface`: a Hugging Face dataset saved to disk (Arrow files) or its Parquet shards (audio
  bytes, optional `id`/`speaker` columns);
- `webdataset`: WebDataset .tar shards (a shard, or a folder or prefix of them).

A listed format (files, fairseq, nemo, lhotse) names its utterances before any audio is read, so
their ids are checked for clashes before probing; a sharded one (huggingface, webdataset) is probed
shard by shard, each task reading its shard (a file's byte range at a time, never unpacked to
disk) and returning where in it each utterance's audio lies.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.digest import digest_json, hashes64, repeated_hashes
from infra.paths import fingerprint_source
from tasks.corpus.manifest import AUDIO_SUFFIXES, Candidate, ManifestError
from tasks.corpus.probe import CandidateBatch, Probed, ProbeSettings

SourceFormat = Literal["auto", "files", "fairseq", "nemo", "lhotse", "huggingface", "webdataset"]
IdRule = Literal["auto", "stem", "path"]
PROBE_BATCH = 32
MAX_PROBE_BATCH = 512
SHARD_SUFFIXES = {"huggingface": (".parquet", ".arrow"), "webdataset": (".tar",)}


class ProbeUnit(Protocol):
    """One probe task: a batch of listed files, or a shard. Must pickle (sent to a worker)."""

    name: str

    def probe(self, settings: ProbeSettings, storage_options: dict[str, Any]) -> Probed: ...


@dataclass(frozen=True)
class Listing:
    """A source as probe tasks, in source order; `candidates`: how many utterances it lists before
    probing (None for a sharded source); `id_rule`: how ids were made, for the intake report."""

    format: str
    units: Sequence[ProbeUnit]
    id_rule: str
    candidates: int | None = None


CANDIDATE_SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("path", pa.string()), ("origin", pa.string()), ("speaker", pa.string()),
        ("expected_samples", pa.int64()), ("expected_seconds", pa.float64()), ("start_seconds", pa.float64()),
        ("duration_seconds", pa.float64()), ("channel", pa.int32()), ("recording", pa.string()),
    ]
)


class CandidateTable:
    """Rows of candidates gathered into Arrow a batch at a time (a listing of millions keeps no
    Python object per file)."""

    BATCH = 65_536

    def __init__(self) -> None:
        self.batches: list[pa.RecordBatch] = []
        self.pending: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.batches.append(pa.RecordBatch.from_pylist(self.pending, schema=CANDIDATE_SCHEMA))
            self.pending = []

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=CANDIDATE_SCHEMA)


class CandidateBatches(Sequence[CandidateBatch]):
    """The probe tasks of a listed source, made from its candidate table as they are submitted."""

    def __init__(self, table: pa.Table, root: str, allowed_roots: tuple[str, ...] = ()) -> None:
        self.table = table
        self.root = root
        self.allowed_roots = allowed_roots
        self.size = max(PROBE_BATCH, min(MAX_PROBE_BATCH, table.num_rows // 2048))

    def __len__(self) -> int:
        return -(-self.table.num_rows // self.size)

    def __getitem__(self, index: int) -> CandidateBatch:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self.table.slice(index * self.size, self.size).to_pylist()
        candidates = tuple(
            Candidate.model_validate({**row, "origin": row.get("origin") or row["path"], "root": self.root}) for row in rows
        )
        return CandidateBatch(f"probe-{index}", candidates, self.allowed_roots)

    def __iter__(self) -> Iterator[CandidateBatch]:
        return (self[index] for index in range(len(self)))


def _without_extension(paths: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(paths, r"\.[^./]*$", "")


def _stems(paths: pa.Array) -> pa.Array:
    return _without_extension(pc.replace_substring_regex(paths, r"^.*/", ""))


def _relative(paths: pa.Array, root: str) -> pa.Array:
    prefix = root.rstrip("/") + "/"
    under = pc.starts_with(paths, prefix)
    relative = pc.if_else(under, pc.utf8_slice_codeunits(paths, len(prefix)), pc.replace_substring_regex(paths, r"^[a-z0-9]+://|^/", ""))
    return _without_extension(relative)


def _by_chunk(rule: Callable[[pa.Array], pa.Array], values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """`rule` applied a listing chunk at a time: the regex steps' intermediates are a chunk's, not a corpus'."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return pa.chunked_array([rule(chunk) for chunk in chunks], pa.string())


def ids_from_paths(paths: pa.Array | pa.ChunkedArray, root: str, rule: IdRule) -> tuple[pa.ChunkedArray, str]:
    """Utterance ids for files: the file name without extension (`stem`), the path relative to the
    source root without extension (`path`), or (`auto`) the stem unless two files share one, then
    the relative path. Returns the ids and the rule used."""
    stems = _by_chunk(_stems, paths)
    if rule == "stem" or (rule == "auto" and not any_repeated(stems)):
        return stems, "stem"
    return _by_chunk(lambda chunk: _relative(chunk, root), paths), "path relative to the source root"


def any_repeated(values: pa.Array | pa.ChunkedArray) -> bool:
    """Whether some string occurs twice in `values` (no nulls): on their hashes, confirmed on the
    strings of the first hash that repeats (of another only where two strings share a hash)."""
    hashes = hashes64(values)
    for repeated in repeated_hashes(hashes):
        found = values.filter(pa.array(hashes == repeated)).to_pylist()
        if len(set(found)) < len(found):
            return True
    return False


def repeated_values(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The strings that occur more than once in `values` (no nulls), found on their 8-byte hashes
    and confirmed on the strings (nothing but the hashes is built for a column without repeats)."""
    hashes = hashes64(values)
    repeated = repeated_hashes(hashes)
    if not len(repeated):
        return pa.array([], pa.string())
    suspects = values.filter(pa.array(np.isin(hashes, repeated)))
    counts = pc.value_counts(suspects)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1))


def check_unique(table: pa.Table, what: str) -> None:
    """Two utterances (rows of `table`: `id`, `path`, maybe `member`) with one id would share labels
    and features: refuse, naming both (the columns are looked at whole only where ids repeat)."""
    ids = table.column("id")
    repeated = repeated_values(ids)
    if len(repeated) == 0:
        return
    clashes = table.filter(pc.is_in(ids, value_set=repeated))
    places = clashes.column("path")
    if "member" in clashes.column_names:
        places = pc.binary_join_element_wise(places, pc.fill_null(clashes.column("member"), ""), "#")
    clashing: dict[str, list[str]] = {}
    for id_, place in zip(clashes.column("id").to_pylist(), places.to_pylist()):
        clashing.setdefault(id_, []).append(place)
    lines = [f"'{id_}': {' and '.join(found[:3])}" for id_, found in list(clashing.items())[:10]]
    more = f"\n  ... and {len(clashing) - 10} more" if len(clashing) > 10 else ""
    raise ManifestError(f"duplicate utterance ids ({what}):\n  " + "\n  ".join(lines) + more)


def detect_format(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """The format of a source, from its name and, for a folder or a .jsonl, a look inside."""
    lowered = source.lower().rstrip("/")
    if lowered.endswith(".tsv"):
        return "fairseq"
    if lowered.endswith((".jsonl", ".jsonl.gz", ".json")):
        from tasks.corpus.formats.lhotse import is_lhotse_manifest

        return "lhotse" if is_lhotse_manifest(source, storage_options) else "nemo"
    if lowered.endswith((".parquet", ".arrow")):
        return "huggingface"
    if lowered.endswith(".tar"):
        return "webdataset"
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if not fs.isdir(root):
        raise ManifestError(f"corpus folder not found: {source}")
    found = set()
    for folder, _, names in fs.walk(root, maxdepth=3):  # one folder at a time, stopping at the first audio file
        lowered_names = [name.lower() for name in names]
        if any(name.endswith(AUDIO_SUFFIXES) for name in lowered_names):
            return "files"
        if "state.json" in lowered_names and "dataset_info.json" in lowered_names:
            return "huggingface"
        found.update(posixpath.splitext(name)[1] for name in lowered_names)
    if ".parquet" in found or ".arrow" in found:
        return "huggingface"
    if ".tar" in found:
        return "webdataset"
    return "files"


def source_format(source: str, wanted: str, storage_options: dict[str, Any] | None) -> str:
    return detect_format(source, storage_options) if wanted == "auto" else wanted


class SourceSettings(Protocol):
    """The corpus section's source settings (tasks/run/config.py `CorpusConfig` is one)."""

    source: str
    format: str
    ids: str
    allowed_roots: Sequence[str]


def list_source(corpus: SourceSettings, storage_options: dict[str, Any] | None = None) -> Listing:
    """The probe tasks of a corpus source, in source order."""
    from tasks.corpus.formats import fairseq, files, huggingface, lhotse, nemo, webdataset

    options = storage_options or {}
    kind = source_format(corpus.source, corpus.format, options)
    readers = {
        "files": files.listing, "fairseq": fairseq.listing, "nemo": nemo.listing, "lhotse": lhotse.listing,
        "huggingface": huggingface.listing, "webdataset": webdataset.listing,
    }
    if kind not in readers:
        raise ManifestError(f"corpus.format: unknown format {kind!r} (one of {', '.join(readers)})")
    listing = readers[kind](corpus.source, corpus.ids, options)
    if isinstance(listing.units, CandidateBatches):
        listing.units.allowed_roots = tuple(corpus.allowed_roots)
    return listing


def candidate_listing(
    kind: str, table: pa.Table, root: str, rule: IdRule, ids_given: bool = False, own_root: str | None = None
) -> Listing:
    """A listed source's probe tasks: ids made from the paths by `rule` (unless the source gives
    them), refused where two clash. `table` holds CANDIDATE_SCHEMA's columns, or some of them
    (`path` at least; the others are null). Its entries may lie under `own_root` (default `root`) and
    `corpus.allowed_roots` only (tasks/corpus/places.py)."""
    if ids_given:
        used = "the source's own ids"
    else:
        ids, used = ids_from_paths(table.column("path"), root, rule)
        table = table.set_column(0, "id", ids) if "id" in table.column_names else table.add_column(0, "id", ids)
    check_unique(table, f"ids: {used}; corpus.ids 'path' derives them from the path below the source root")
    return Listing(kind, CandidateBatches(table, own_root or root), used, table.num_rows)


def fingerprint(corpus: SourceSettings, storage_options: dict[str, Any] | None) -> str:
    """A cheap digest that changes when the source changes (intake's key input): a folder's listing
    of the files its format reads, with sizes and times; a manifest file's content; a shard's
    size and time."""
    kind = source_format(corpus.source, corpus.format, storage_options)
    fs, root = fsspec.core.url_to_fs(corpus.source, **(storage_options or {}))
    if kind in SHARD_SUFFIXES:
        if fs.isdir(root):
            return fingerprint_source(corpus.source, SHARD_SUFFIXES[kind] + (".json",), storage_options)
        info = fs.info(root)
        return digest_json([root, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")])
    return fingerprint_source(corpus.source, AUDIO_SUFFIXES, storage_options)


@dataclass(frozen=True)
class Source:
    """A corpus source alone, with its format and id rule (a `SourceSettings`)."""

    source: str
    format: str = "auto"
    ids: str = "auto"
    allowed_roots: tuple[str, ...] = ()


def list_candidates(source: str, storage_options: dict[str, Any] | None = None, ids: IdRule = "auto") -> list[Candidate]:
    """Every file a listed source (a folder, .tsv, .jsonl, Lhotse manifest) names, in source order,
    as records: for a few (tests, tools), never a corpus."""
    listing = list_source(Source(source, ids=ids), storage_options)
    if not isinstance(listing.units, CandidateBatches):
        raise ManifestError(f"{source} is a sharded {listing.format} source: its utterances are known only after probing")
    return [candidate for batch in listing.units for candidate in batch.candidates]
