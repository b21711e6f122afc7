"""Zarr I/O of the artifact store: creating a stage's group in one go, reading small arrays whole,
and the raw (memory-mapped where local) read path of row chunks."""

from __future__ import annotations

import asyncio
import itertools
import os
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore, StorePath

from infra.store import ArtifactStore


@dataclass(frozen=True)
class EmptyArray:
    """An array a stage's tasks fill chunk by chunk."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    compressors: Any = "auto"


def create_zarr_group(
    store: ArtifactStore,
    relpath: str,
    attributes: dict[str, Any],
    empty: dict[str, EmptyArray],
    whole: dict[str, np.ndarray],
    replace: bool = True,
) -> None:
    """A new group at relpath (replacing any, unless `replace` is False: the caller knows there is
    none): its attributes, empty arrays, and small arrays written whole (one chunk each; strings
    as variable-length UTF-8).

    The group is built in memory and its objects written concurrently: created in place on object
    storage, zarr checked for existing nodes before each write, 25 requests one after another for
    the label store, most of a small stage's fixed cost.
    """
    objects: dict[str, Any] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=3, attributes=attributes)
    for name, spec in empty.items():
        group.create_array(name, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, compressors=spec.compressors)
    for name, data in whole.items():
        dtype = str if data.dtype.kind in "UOT" else data.dtype
        group.create_array(name, shape=data.shape, chunks=data.shape, dtype=dtype)[:] = data
    if replace:
        store.remove(relpath)

    def write(item: tuple[str, Any]) -> None:
        key, buffer = item
        store.write_bytes(posixpath.join(relpath, key), buffer.to_bytes())

    with ThreadPoolExecutor(max_workers=min(16, len(objects))) as pool:
        list(pool.map(write, objects.items()))


def read_whole_arrays(group: zarr.Group, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Small arrays of a group, each read whole, concurrently: on object storage each is two
    requests (its metadata, its one chunk), and one after another they were a stage's fixed cost."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        return dict(zip(names, pool.map(lambda name: group[name][:], names)))


def read_row_chunks(array: zarr.Array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D array chunked along its rows only; `start` on a chunk edge.

    Where the chunks are stored raw (the bytes codec alone, in this machine's byte order: as the
    feature stage writes them), a single chunk is returned as a read-only view of its bytes: zarr's
    read path copies every chunk once more into its output, a tenth of a 768-dim label task's time.
    On a local folder the view maps the chunk's file (read from the page cache as the rows are
    used, not copied into a fresh 48 MiB first; a file cut short while mapped kills the worker
    with SIGBUS, and the next read names it); elsewhere the chunks' bytes are fetched,
    concurrently. A missing chunk raises FileNotFoundError and a chunk of the wrong size
    ValueError, where zarr would read fill values or fail without a name. Other encodings take
    zarr's read path.
    """
    rows_per_chunk, width = array.chunks
    codecs = array.metadata.codecs
    raw = (
        array.ndim == 2 and width == array.shape[1] and start % rows_per_chunk == 0
        and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
        and (array.dtype.itemsize == 1 or codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
    )
    if not raw:
        return array[start:stop]
    first, last = start // rows_per_chunk, -(-stop // rows_per_chunk)
    keys = [array.metadata.encode_chunk_key((index, 0)) for index in range(first, last)]
    shape = (rows_per_chunk, width)
    chunk_bytes = rows_per_chunk * width * array.dtype.itemsize

    def checked(key: str, size: int | None) -> None:
        where = f"{array.store_path}/{key}"
        if size is None:
            raise FileNotFoundError(f"{where}: a chunk of rows {start}-{stop} of {array.shape[0]} is missing")
        if size != chunk_bytes:
            raise ValueError(f"{where}: {size} bytes, a chunk of this array holds {chunk_bytes}")

    store = array.store_path.store
    if isinstance(store, LocalStore):
        pieces = []
        for key in keys:
            path = os.path.join(str(store.root), array.store_path.path, key)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = None
            checked(key, size)
            pieces.append(np.memmap(path, dtype=array.dtype, mode="r", shape=shape))
    else:
        buffers = zarr_sync(_get_all([array.store_path / key for key in keys]))
        for key, buffer in zip(keys, buffers):
            checked(key, None if buffer is None else len(buffer))
        pieces = [buffer.as_numpy_array().view(array.dtype).reshape(shape) for buffer in buffers]
    if len(pieces) == 1:
        return pieces[0][: stop - start]
    return np.concatenate(pieces)[: stop - start]


async def _get_all(paths: list[StorePath]) -> list[Any]:
    return await asyncio.gather(*(path.get(prototype=default_buffer_prototype()) for path in paths))



def expected_zarr_objects(store: ArtifactStore, relpath: str) -> list[str]:
    """Every object a Zarr group's metadata promises (its arrays' metadata and chunks), relative to relpath."""
    group = store.open_zarr(relpath, mode="r")
    names = ["zarr.json"]
    for name, array in group.arrays():
        names.append(posixpath.join(name, "zarr.json"))
        for coords in itertools.product(*(range(count) for count in array.cdata_shape)):
            names.append(posixpath.join(name, array.metadata.encode_chunk_key(coords)))
    return names

