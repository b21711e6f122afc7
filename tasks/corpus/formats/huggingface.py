"""A Hugging Face dataset: saved to disk (`Dataset.save_to_disk`: Arrow files listed in `state.json`)
or as Parquet shards (`to_parquet`, the Hub's `data/*.parquet`): a `.parquet`/`.arrow` file or a folder.

The audio column is the one named `audio`, or else the only one that holds audio: an `Audio`
feature (a struct with `bytes`) or a binary column. The id is the `id` column where there is one,
else the stem of the audio's `path`, else `<shard>-<row>`; the speaker is the `speaker` or
`speaker_id` column where there is one. One probe task reads one shard: a Parquet shard a row
group at a time (its audio column's byte range; a stage later reads a row's audio with its row
group), an Arrow file mapped (local) or read whole, each utterance's audio then found at its exact
byte range of the file, which stages read alone.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from infra.paths import find_files, join_path, read_whole
from tasks.corpus.formats import IdRule, Listing
from tasks.corpus.manifest import ManifestError, Utterance, utterance_id
from tasks.corpus.probe import Probed, ProbeSettings, Rejection, Shard, probe_bytes

ID_COLUMN = "id"
SPEAKER_COLUMNS = ("speaker", "speaker_id")


def audio_column(schema: pa.Schema, where: str) -> str:
    """The column holding the audio: `audio`, or the only Audio-like (struct with bytes) or binary one."""
    def holds_audio(field: pa.Field) -> bool:
        if pa.types.is_struct(field.type):
            return any(child.name == "bytes" for child in field.type)
        return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)

    if "audio" in schema.names and holds_audio(schema.field("audio")):
        return "audio"
    found = [field.name for field in schema if holds_audio(field)]
    if len(found) != 1:
        raise ManifestError(f"{where}: no single audio column (an Audio feature or binary column) among {schema.names}")
    return found[0]


def _audio_values(column: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """The binary audio bytes of a column and, for an Audio feature, its paths."""
    if pa.types.is_struct(column.type):
        names = [child.name for child in column.type]
        return column.field("bytes"), column.field("path") if "path" in names else None
    return column, None


def _row_ids(table: pa.Table, paths: pa.Array | None, shard: str, first_row: int) -> list[str]:
    if ID_COLUMN in table.column_names:
        return [str(value) for value in table.column(ID_COLUMN).to_pylist()]
    if paths is not None and paths.null_count == 0:
        return [utterance_id(path) for path in paths.to_pylist()]
    stem = utterance_id(shard)
    return [f"{stem}-{first_row + row:08d}" for row in range(table.num_rows)]


def _speakers(table: pa.Table) -> list[str | None]:
    for name in SPEAKER_COLUMNS:
        if name in table.column_names:
            return [None if value is None else str(value) for value in table.column(name).to_pylist()]
    return [None] * table.num_rows


def _probe_rows(table: pa.Table, column: str, shard: str, first_row: int, settings: ProbeSettings, place: Any) -> Probed:
    """Probe a shard's rows; `place(row)` says where row `row`'s audio lies in the shard."""
    values, paths = _audio_values(table.column(column).combine_chunks())
    found = Probed()
    for row, (id_, speaker) in enumerate(zip(_row_ids(table, paths, shard, first_row), _speakers(table))):
        base = Utterance(id=id_, path=shard, samples=0, sample_rate=1, channels=0, speaker=speaker, member=column, **place(row))
        data, origin = values[row].as_py(), f"{shard} row {first_row + row}"
        if data is None:
            named = "" if paths is None or paths[row].as_py() is None else f" (it names a file, {paths[row].as_py()}, instead)"
            found.rejections.append(
                Rejection(id=id_, path=base.where, origin=origin, reason="no audio bytes",
                          detail=f"the row holds no audio{named}: embed the audio in the dataset")
            )
            continue
        found.add(probe_bytes(base, data, origin, settings))
    return found


class ParquetShard(Shard):
    """A probe task: every row group of one Parquet shard, one after another."""

    def probe(self, settings: ProbeSettings, storage_options: dict[str, Any]) -> Probed:
        fs, stripped = fsspec.core.url_to_fs(self.path, **storage_options)
        found = Probed()
        with fs.open(stripped, "rb") as handle:
            shard = pq.ParquetFile(handle)
            column = audio_column(shard.schema_arrow, self.path)
            wanted = [column, *(name for name in (ID_COLUMN, *SPEAKER_COLUMNS) if name in shard.schema_arrow.names)]
            first_row = 0
            for group in range(shard.metadata.num_row_groups):
                table = shard.read_row_group(group, columns=wanted)
                found.add(
                    _probe_rows(table, column, self.path, first_row, settings, lambda row, group=group: {"row_group": group, "row": row})
                )
                first_row += table.num_rows
        return found


class ArrowShard(Shard):
    """A probe task: one Arrow file of a dataset saved to disk (an IPC stream of record batches)."""

    def probe(self, settings: ProbeSettings, storage_options: dict[str, Any]) -> Probed:
        fs, stripped = fsspec.core.url_to_fs(self.path, **storage_options)
        whole = pa.memory_map(stripped).read_buffer() if isinstance(fs, LocalFileSystem) else pa.py_buffer(read_whole(self.path, storage_options))
        reader = pa.ipc.open_stream(whole)
        column = audio_column(reader.schema, self.path)
        found = Probed()
        first_row = 0
        for batch in reader:
            values, _ = _audio_values(batch.column(column))
            validity, offsets_buffer, data = values.buffers()
            offsets = np.frombuffer(offsets_buffer, dtype=np.int32 if pa.types.is_binary(values.type) else np.int64)
            offsets = offsets[values.offset : values.offset + len(values) + 1]
            base = data.address - whole.address if data is not None else 0

            def place(row: int, offsets: np.ndarray = offsets, base: int = base) -> dict[str, int]:
                return {"byte_offset": int(base + offsets[row]), "byte_length": int(offsets[row + 1] - offsets[row])}

            found.add(_probe_rows(pa.Table.from_batches([batch]), column, self.path, first_row, settings, place))
            first_row += batch.num_rows
        return found


def _saved_dataset_files(folder: str, storage_options: dict[str, Any]) -> list[str] | None:
    """The Arrow files of a dataset saved to disk (from its `state.json`), or None if it is not one."""
    fs, root = fsspec.core.url_to_fs(folder, **storage_options)
    state = posixpath.join(root, "state.json")
    if not fs.exists(state):
        return None
    with fs.open(state, "rt") as handle:
        files = [entry["filename"] for entry in json.load(handle).get("_data_files", [])]
    return [join_path(folder, name) for name in files]


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    lowered = source.lower()
    if lowered.endswith(".parquet"):
        shards: list[Any] = [ParquetShard("probe-0", source)]
    elif lowered.endswith(".arrow"):
        shards = [ArrowShard("probe-0", source)]
    elif (saved := _saved_dataset_files(source, storage_options)) is not None:
        shards = [ArrowShard(f"probe-{index}", path) for index, path in enumerate(saved)]
    else:
        try:
            paths = find_files(source, (".parquet",), storage_options).to_pylist()
        except FileNotFoundError as error:
            raise ManifestError(str(error)) from error
        shards = [ParquetShard(f"probe-{index}", path) for index, path in enumerate(paths)]
    if not shards:
        raise ManifestError(f"no Parquet or Arrow shards in corpus source {source}")
    return Listing("huggingface", shards, "the dataset's id column, or its audio file names")
