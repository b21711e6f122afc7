"""The manifest: the typed utterance record, and the columnar table of every utterance intake accepted.

An utterance is audio a stage can load by itself: a whole file, a span of a recording (`recording`,
`start`, `samples`), or audio inside a shard (a tar member or an Arrow value at a byte range, a
Parquet row). Intake writes the manifest as Parquet (`manifest.parquet`), one row per utterance in
manifest order; stages read the columns they need (`Manifest`), and the tasks on the workers read
their own rows (`ManifestRows`), so the driver never holds one Python object per utterance. Stores
made before the columnar manifest hold `manifest.jsonl`, which reads into the same table.

Where a corpus source comes from (a folder, a fairseq .tsv, a NeMo .jsonl, Hugging Face Parquet or
Arrow shards, WebDataset tars, a Lhotse manifest) is tasks/corpus/formats/'s; they all list
`Candidate`s or probe shards into `Utterance`s.
"""

from __future__ import annotations

import io
import logging
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from infra.store import ArtifactStore
from model.frames import SAMPLE_RATE

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
MANIFEST_ROW_GROUP = 65_536
"""Rows of a manifest's Parquet row group: what a worker reads to find its chunk's utterances."""


class ManifestError(ValueError):
    """A source manifest that cannot be read as a whole (as opposed to one bad audio file)."""

    retryable = False  # a retry reads the same source


class Candidate(BaseModel):
    """Audio a source lists, before it has been probed: a file, or a span of one (`start`, `duration`
    in seconds: a Lhotse cut), with what the source says of it."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: str
    origin: str
    root: str  # the folder (or URL prefix) the source's own entries lie under (tasks/corpus/places.py)
    speaker: str | None = None
    expected_samples: int | None = None
    expected_seconds: float | None = None
    start_seconds: float | None = None
    duration_seconds: float | None = None
    channel: int | None = None
    recording: str | None = None


class Utterance(BaseModel):
    """One usable piece of audio, as probed at intake.

    `samples` and `start` count samples at `sample_rate`. Where the audio lives: the file `path`
    whole (`recording` None), or its samples [start, start + samples) (`recording`: the id of the
    recording the span was cut from); inside a shard at `path`, its encoded bytes at [byte_offset,
    byte_offset + byte_length) (a tar member or an Arrow value, `member` naming it), or row `row` of
    Parquet row group `row_group` (`member`: the audio column)."""

    model_config = ConfigDict(frozen=True)

    id: str
    path: str
    samples: int
    sample_rate: int
    channels: int
    speaker: str | None = None
    split: Literal["train", "valid"] = "train"
    start: int = 0
    recording: str | None = None
    channel: int | None = None
    member: str | None = None
    byte_offset: int | None = None
    byte_length: int | None = None
    row_group: int | None = None
    row: int | None = None

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate

    @property
    def samples_16k(self) -> int:
        """Length after resampling to the 16 kHz every model and feature here works at."""
        return int(resampled_lengths(np.array([self.samples]), np.array([self.sample_rate]))[0])

    @property
    def is_span(self) -> bool:
        return self.recording is not None

    @property
    def where(self) -> str:
        """How messages name where the audio is: the path, a shard member, a Parquet row, a span."""
        place = self.path
        if self.member is not None and self.row is not None:
            place = f"{self.path} (row group {self.row_group}, row {self.row}, column {self.member})"
        elif self.member is not None:
            place = f"{self.path}[{self.member}]"
        if self.is_span:
            place += f" samples {self.start}..{self.start + self.samples} at {self.sample_rate} Hz"
        return place


MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("samples", pa.int64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("speaker", pa.string()),
        ("split", pa.string()),
        ("start", pa.int64()),
        ("recording", pa.string()),
        ("channel", pa.int32()),
        ("member", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_length", pa.int64()),
        ("row_group", pa.int32()),
        ("row", pa.int32()),
    ]
)
LEGACY_FIELDS = ("id", "path", "samples", "sample_rate", "channels", "speaker", "split")
"""What a `manifest.jsonl` of a store made before the columnar manifest holds."""


def resampled_lengths(samples: np.ndarray, sample_rates: np.ndarray, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Samples after torchaudio.functional.resample, element-wise: ceil(samples * target / source),
    the rates reduced by their gcd (tasks/corpus/audio.py `resampled_length` for one)."""
    samples, rates = np.asarray(samples, dtype=np.int64), np.asarray(sample_rates, dtype=np.int64)
    divisor = np.gcd(rates, target_rate)
    return -(-samples * (target_rate // divisor) // (rates // divisor))


def utterances_table(utterances: Sequence[Utterance]) -> pa.Table:
    """Utterance records as manifest rows (a probed batch; a test's few)."""
    return pa.Table.from_pylist([utterance.model_dump() for utterance in utterances], schema=MANIFEST_SCHEMA)


def table_utterances(table: pa.Table) -> list[Utterance]:
    """Manifest rows as Utterance records: for a task's few rows, never a corpus."""
    return [Utterance.model_validate(row) for row in conform(table).to_pylist()]


def conform(table: pa.Table) -> pa.Table:
    """A table with every column of the manifest schema, in its order and types: a legacy
    manifest's missing columns become nulls (`split`: "train", `start`: 0)."""
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            column = table.column(field.name).cast(field.type)
        else:
            column = pa.nulls(table.num_rows, field.type)
        if field.name == "split":
            column = column.fill_null("train")
        elif field.name == "start":
            column = column.fill_null(0)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)


class ParquetRows:
    """Tables appended in order, written as Parquet bytes in row groups of `rows_per_group` (zstd):
    a manifest of millions of rows is written as its pieces arrive, holding one row group, not the
    table. The bytes are those `pq.write_table` gives the whole table."""

    def __init__(self, schema: pa.Schema, rows_per_group: int = MANIFEST_ROW_GROUP) -> None:
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.buffer = io.BytesIO()
        self.writer = pq.ParquetWriter(self.buffer, schema, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.rows_per_group:
            self._write(whole_groups_only=True)

    def _write(self, whole_groups_only: bool) -> None:
        table = pa.concat_tables(self.pending)
        cut = table.num_rows - table.num_rows % self.rows_per_group if whole_groups_only else table.num_rows
        if cut:
            self.writer.write_table(table.slice(0, cut), row_group_size=self.rows_per_group)
        self.pending = [table.slice(cut)] if cut < table.num_rows else []
        self.pending_rows = table.num_rows - cut

    def finish(self) -> bytes:
        """The Parquet file's bytes (an empty table's, where nothing was added)."""
        if self.pending:
            self._write(whole_groups_only=False)
        if self.rows == 0:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        return self.buffer.getvalue()


def manifest_from_jsonl(text: str | bytes) -> pa.Table:
    """A legacy `manifest.jsonl` (one JSON object per line) as a manifest table, read columnar."""
    data = text.encode() if isinstance(text, str) else text
    if not data.strip():
        return conform(pa.table({name: pa.array([], MANIFEST_SCHEMA.field(name).type) for name in LEGACY_FIELDS}))
    legacy = pa.schema([MANIFEST_SCHEMA.field(name) for name in LEGACY_FIELDS])
    options = pa_json.ParseOptions(explicit_schema=legacy, unexpected_field_behavior="ignore")
    return conform(pa_json.read_json(io.BytesIO(data), parse_options=options))


class Manifest:
    """The manifest's rows, columnar (a pyarrow Table with the manifest schema's columns, or some of
    them): what the driver works from. Iterating yields Utterance records: for tests and small
    tables only; stages use the columns."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @classmethod
    def of(cls, utterances: Manifest | Sequence[Utterance]) -> Manifest:
        """A Manifest as it is, or one made from Utterance records."""
        return utterances if isinstance(utterances, Manifest) else cls(utterances_table(list(utterances)))

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[Utterance]:
        for batch in self.table.to_batches(max_chunksize=4096):
            yield from table_utterances(pa.Table.from_batches([batch]))

    def __getitem__(self, index: int | slice) -> Utterance | list[Utterance]:
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return table_utterances(self.table.slice(index, 1))[0]

    def read(self, indices: np.ndarray | Sequence[int]) -> list[Utterance]:
        """The utterances at these indices as records (as `ManifestRows.read` reads them from a store)."""
        return table_utterances(self.table.take(pa.array(np.asarray(indices, dtype=np.int64))))

    def take(self, indices: np.ndarray | Sequence[int]) -> Manifest:
        return Manifest(self.table.take(pa.array(np.asarray(indices, dtype=np.int64))))

    def column(self, name: str) -> np.ndarray:
        """A numeric column as a numpy array."""
        return self.table.column(name).to_numpy()

    def ids(self) -> pa.ChunkedArray:
        return self.table.column("id")

    def samples_16k(self) -> np.ndarray:
        """[utterances] int64: each utterance's length at 16 kHz."""
        return resampled_lengths(self.column("samples"), self.column("sample_rate"))

    def seconds(self) -> np.ndarray:
        return self.column("samples") / self.column("sample_rate")

    def is_valid(self) -> np.ndarray:
        """[utterances] bool: which utterances are in the validation split."""
        if "split" not in self.table.column_names:
            return np.zeros(len(self), dtype=bool)
        return pc.fill_null(pc.equal(self.table.column("split"), "valid"), False).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class ManifestRows:
    """A run's manifest as a task on a worker reads it: its rows by manifest index, from the store.

    Picklable and small (it is sent with every task); a worker process keeps the few Parquet row
    groups it read last, keyed by the manifest's digest, so the tasks of one stage read each row
    group about once per worker."""

    store: ArtifactStore
    relpath: str
    digest: str

    def read(self, indices: np.ndarray | Sequence[int]) -> list[Utterance]:
        """The utterances at these manifest indices, in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return []
        if self.relpath.endswith(".jsonl"):
            table = _cached(self, -1, lambda: manifest_from_jsonl(self.store.read_bytes(self.relpath)))
            return table_utterances(table.take(pa.array(indices)))
        starts = _cached(self, -2, self._row_group_starts)
        groups = np.searchsorted(starts, indices, side="right") - 1
        pieces = []
        for group in np.unique(groups):
            table = _cached(self, int(group), lambda group=group: self._read_row_group(int(group)))
            pieces.append((np.flatnonzero(groups == group), table.take(pa.array(indices[groups == group] - starts[group]))))
        order = np.concatenate([positions for positions, _ in pieces])
        rows = pa.concat_tables([table for _, table in pieces]).take(pa.array(np.argsort(order, kind="stable")))
        return table_utterances(rows)

    def _open(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.store.fs.open(self.store.path(self.relpath), "rb"))

    def _row_group_starts(self) -> np.ndarray:
        metadata = self._open().metadata
        sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _read_row_group(self, group: int) -> pa.Table:
        return self._open().read_row_group(group)


_ROW_GROUPS: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
_ROW_GROUPS_KEPT = 6
_ROW_GROUPS_LOCK = threading.Lock()


def _cached(rows: ManifestRows, group: int, read: Any) -> Any:
    key = (rows.store.url(rows.relpath), rows.digest, group)
    with _ROW_GROUPS_LOCK:
        if key in _ROW_GROUPS:
            _ROW_GROUPS.move_to_end(key)
            return _ROW_GROUPS[key]
    value = read()
    with _ROW_GROUPS_LOCK:
        _ROW_GROUPS[key] = value
        while len(_ROW_GROUPS) > _ROW_GROUPS_KEPT:
            _ROW_GROUPS.popitem(last=False)
    return value


def utterance_id(path: str) -> str:
    """The file name without its extension."""
    return posixpath.splitext(posixpath.basename(path.rstrip("/")))[0]
