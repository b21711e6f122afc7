"""The artifact store: one root (a local folder or an s3:// prefix) holding every run's artifacts.

Where a run's artifacts sit is the pipeline's business (tasks/layout.py); what this module fixes
is the commit protocol inside a stage's folder:

    <folder>/<stage>.commit.json          the stage's record, written last
    <folder>/_progress/<stage>/           per-part markers of a stage still running

Everything goes through fsspec, so the same code serves a laptop folder and object storage. This is
the only module that tells local paths from URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import itertools
import json
import logging
import os
import posixpath
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
import fsspec.asyn
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore, StorePath
from pydantic import BaseModel, Field

from infra.digest import digest_bytes, digest_json
from infra.paths import parent_of, whole_read_options
from infra.version import code_version

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class VersionMismatch(RuntimeError):
    """A conditional write or delete found the object changed since it was read (or gone)."""


# Every chunk of an array is written, even one equal to the fill value (zarr's default skips
# those): a chunk that is absent is then always a lost one, never a legitimately empty one, and
# output checks can name it instead of reading fill values. Set on import, so in every process.
zarr.config.set({"array.write_empty_chunks": True})

LISTED_NAMES_AT_MOST = 64


class OutputObjects(BaseModel):
    """What one output of a stage held at commit: enough to tell later that something went missing."""

    count: int = Field(description="Objects (files) under the output.")
    bytes: int
    names: list[str] | None = Field(
        default=None, description=f"The objects' paths relative to the stage's folder, for outputs of at most {LISTED_NAMES_AT_MOST}."
    )


class StageRecord(BaseModel):
    """What a stage committed. Written last, read first: its presence means the stage is done."""

    stage: str
    scope: str = Field(description="The name of the stage's folder in its run ('corpus', 'iter-1', ...).")
    key: str = Field(description="Digest of everything the outputs depend on (config, inputs, stage version).")
    config: dict[str, Any]
    config_digest: str
    inputs: dict[str, str] = Field(description="Upstream artifact name -> its output digest.")
    outputs: list[str] = Field(description="Paths relative to the run folder.")
    output_digest: str
    counts: dict[str, int | float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    sizes: dict[str, int] = Field(default_factory=dict, description="Output bytes, by output path.")
    objects: dict[str, OutputObjects] = Field(
        default_factory=dict, description="Each output's objects at commit (records from before it have none)."
    )
    started_at: datetime
    finished_at: datetime
    seconds: float
    code_version: str
    host: str
    user: str


class ArtifactStore:
    """A root folder or prefix, reached through fsspec. Paths given to methods are relative to it."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, path = fsspec.core.url_to_fs(root, **self.storage_options)
        self.root = path.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root_url = self.root if self.is_local else f"{_protocol(self.fs)}://{self.root}"
        self._whole_read_options = whole_read_options(self.fs)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of a relative path."""
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """The full URL of a relative path, for libraries that open URLs themselves."""
        return posixpath.join(self.root_url, *parts)

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def read_json(self, relpath: str) -> Any | None:
        """The parsed JSON at relpath, or None if there is no such file."""
        try:
            return json.loads(self.fs.cat_file(self.path(relpath), **self._whole_read_options))
        except FileNotFoundError:
            return None

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it.

        A local file is written under a temporary name and renamed; an object store PUT is atomic.
        No fsync: this guards against a killed process, not a lost machine (whose page cache
        would take the unsynced data files with it anyway).
        """
        target = self.path(relpath)
        if not self.is_local:
            # No makedirs: object stores have no folders, and s3fs would create a mistyped bucket.
            self.fs.pipe_file(target, data)
            return
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)

    def write_json(self, relpath: str, value: Any) -> None:
        self.write_bytes(relpath, json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n")

    def write_text(self, relpath: str, text: str) -> None:
        self.write_bytes(relpath, text.encode())

    def read_bytes(self, relpath: str) -> bytes:
        """A whole file, in one request on object storage (infra/paths.py's `whole_read_options`)."""
        return self.fs.cat_file(self.path(relpath), **self._whole_read_options)

    def read_text(self, relpath: str) -> str:
        return self.read_bytes(relpath).decode()

    # -- conditional writes: what a lease needs (infra/lease.py) -----------------------------------
    #
    # A version is what tells one state of an object from the next: on object storage its ETag, in
    # a local folder the digest of its content. Local compare-and-swap holds an exclusive flock on
    # the object's folder (atomic between processes of one machine, and on NFSv4 between machines);
    # on S3 the server decides, with If-None-Match / If-Match on the request.

    def read_versioned(self, relpath: str) -> tuple[bytes, str] | None:
        """The object's bytes and version, read in one request; None if there is none."""
        target = self.path(relpath)
        if self.is_local:
            try:
                with open(target, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                return None
            return data, digest_bytes(data)
        try:
            return fsspec.asyn.sync(self.fs.loop, self._s3_get_with_etag, target)
        except FileNotFoundError:
            return None

    async def _s3_get_with_etag(self, target: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(target)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            data = await body.read()
        return data, response["ETag"]

    def create_exclusive(self, relpath: str, data: bytes) -> str:
        """Write a new object; FileExistsError if one is there already. Returns its version.

        Local: written under a temporary name, then hard-linked to its name (link refuses an
        existing name, atomically). S3: a PUT with `If-None-Match: *`; a server that ignores the
        header overwrites instead, which the lease's read-back detects (see infra/lease.py).
        """
        target = self.path(relpath)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(temporary, "wb") as handle:
                handle.write(data)
            try:
                os.link(temporary, target)
            finally:
                os.unlink(temporary)
            return digest_bytes(data)
        try:
            response = self.fs.call_s3("put_object", **self._s3_location(target), Body=data, IfNoneMatch="*")
        except OSError as error:
            if _precondition_failed(error):
                raise FileExistsError(f"{self.url(relpath)} exists") from error
            raise
        return response["ETag"]

    def _require_version(self, relpath: str, version: str) -> None:
        """VersionMismatch unless the local object still has `version` (call under its folder's lock)."""
        current = self.read_versioned(relpath)
        if current is None or current[1] != version:
            raise VersionMismatch(f"{self.url(relpath)} changed since it was read")

    def replace_if(self, relpath: str, data: bytes, version: str) -> str:
        """Overwrite the object only if it still has `version`; returns the new version.

        Raises VersionMismatch when it changed or is gone."""
        target = self.path(relpath)
        if self.is_local:
            with _folder_lock(posixpath.dirname(target)):
                self._require_version(relpath, version)
                self.write_bytes(relpath, data)
            return digest_bytes(data)
        try:
            response = self.fs.call_s3("put_object", **self._s3_location(target), Body=data, IfMatch=version)
        except (OSError, FileNotFoundError) as error:
            if isinstance(error, FileNotFoundError) or _precondition_failed(error):
                raise VersionMismatch(f"{self.url(relpath)} changed since it was read") from error
            raise
        return response["ETag"]

    def remove_if(self, relpath: str, version: str) -> None:
        """Delete the object only if it still has `version` (VersionMismatch otherwise)."""
        target = self.path(relpath)
        if self.is_local:
            with _folder_lock(posixpath.dirname(target)):
                self._require_version(relpath, version)
                os.unlink(target)
            return
        try:
            self.fs.call_s3("delete_object", **self._s3_location(target), IfMatch=version)
        except OSError as error:
            if isinstance(error, FileNotFoundError) or _precondition_failed(error):
                raise VersionMismatch(f"{self.url(relpath)} changed since it was read") from error
            raise
        finally:
            self.fs.invalidate_cache()

    def _s3_location(self, target: str) -> dict[str, str]:
        bucket, key, _ = self.fs.split_path(target)
        return {"Bucket": bucket, "Key": key}

    def check_writable(self) -> None:
        """Raise OSError (or a credentials error) saying why the store cannot be written, leaving
        nothing behind: an object store gets a small probe object written and deleted; a local
        root must be, or be creatable inside, a folder this process may write."""
        if self.is_local:
            existing = self.root
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise NotADirectoryError(f"{existing} is not a folder")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(f"{existing} is not writable by this process")
            return
        probe = f"_write-probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"probe\n")
        self.fs.rm(self.path(probe))
        self.fs.invalidate_cache()

    def remove(self, relpath: str) -> None:
        """Remove a file or a folder tree; a missing one is not an error.

        On S3 one listing finds what there is (`_found_under`; s3fs's exists-then-rm asked four
        times for a folder), and one request per thousand objects deletes it."""
        target = self.path(relpath)
        if isinstance(self.fs, S3FileSystem):
            if doomed := list(self._found_under(target)):
                self.fs.rm(doomed)
        elif self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.invalidate_cache()

    def remove_empty_folder(self, relpath: str) -> None:
        """Remove a folder with nothing in it; object stores have no empty folders to remove."""
        if self.is_local and not self.list_names(relpath):
            self.remove(relpath)

    def _found_under(self, target: str) -> dict[str, dict[str, Any]]:
        """The file at `target` or the files under it, with fsspec's info on each, fresh from the store.

        On S3 one listing of the keys that start with the path answers both (fsspec's `find` lists
        the folder, then asks for the file with a HEAD and, when there is none, lists again)."""
        self.fs.invalidate_cache()
        if isinstance(self.fs, S3FileSystem):
            parent, name = posixpath.split(target)
            listed = self.fs.find(parent, prefix=name, withdirs=False, detail=True)
            return {path: info for path, info in listed.items() if path == target or path.startswith(target + "/")}
        try:
            return self.fs.find(target, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}

    def list_names(self, relpath: str) -> list[str]:
        """Names directly under a folder; empty if it does not exist."""
        target = self.path(relpath)
        try:
            entries = self.fs.ls(target, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(entry.rstrip("/")) for entry in entries)

    def list_objects(self, relpath: str) -> dict[str, int]:
        """Objects at or under relpath (a file or a folder tree), by path relative to the store root, with their bytes.

        Fresh from the store (no listing cache); a local write in flight (`.tmp-`) is not an object."""
        return {
            posixpath.relpath(path, self.root): int(info.get("size") or 0)
            for path, info in self._found_under(self.path(relpath)).items()
            if info.get("type") != "directory" and ".tmp-" not in posixpath.basename(path)
        }

    def size(self, relpath: str) -> int:
        """Bytes under a file or folder."""
        target = self.path(relpath)
        if not self.fs.exists(target):
            return 0
        return int(self.fs.du(target, total=True))

    def open_zarr(self, relpath: str, mode: str, attributes: dict[str, Any] | None = None) -> zarr.Group:
        """A Zarr group at relpath (mode as zarr.open_group: 'r', 'r+', 'a', 'w'; `attributes` for a new one)."""
        # zarr_format=3: without it every open also probes for Zarr 2 metadata (three more
        # requests per task on object storage).
        if self.is_local:
            return zarr.open_group(self.path(relpath), mode=mode, zarr_format=3, attributes=attributes)
        return zarr.open_group(
            self.url(relpath), mode=mode, storage_options={**self._whole_read_options, **self.storage_options},
            zarr_format=3, attributes=attributes,
        )


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


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive flock on a local folder, held for the block (serialises compare-and-swap)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _precondition_failed(error: BaseException) -> bool:
    """Whether s3fs's error is the server refusing a conditional request (HTTP 412)."""
    if isinstance(error, FileExistsError):  # s3fs's translation when the server names If-None-Match
        return True
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed" or (
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


class Stage:
    """The commit protocol of one stage in one folder of a run.

    - `committed()` answers "is this work already done?": a record exists and its key matches.
    - `prepare(outputs)` clears whatever a different key left behind (the record first, so nothing
      looks finished while it is being removed) and keeps the finished parts of an interrupted run
      with the same key; `fresh` says which it did.
    - Workers call `mark_part` after each part (e.g. a Zarr chunk) is fully written; `done_parts`
      lists them on resume.
    - `commit(record)` writes the record last, then drops the part markers.
    """

    def __init__(
        self,
        store: ArtifactStore,
        folder: str,
        name: str,
        *,
        version: int,
        config: dict[str, Any],
        inputs: dict[str, str],
    ) -> None:
        """`version` is the stage's output-format version: bump it when a code change alters outputs.

        The key digests the stage, its version, its config section and its inputs' digests. The
        package version is recorded in every record but left out of the key, so that an unrelated
        release does not throw away days of finished work.
        """
        self.store = store
        self.folder = folder
        self.name = name
        self.config = config
        self.inputs = inputs
        self.key = digest_json({"stage": name, "version": version, "config": config, "inputs": inputs})
        self._record_seen: bool | None = None
        self.fresh = False
        """Whether `prepare` cleared the stage: no outputs, no finished parts are left from an earlier attempt."""

    def rel(self, *parts: str) -> str:
        """Path relative to the store root of something in this stage's folder."""
        return posixpath.join(self.folder, *parts)

    @property
    def record_path(self) -> str:
        return record_path(self.folder, self.name)

    @property
    def progress_path(self) -> str:
        return progress_path(self.folder, self.name)

    def read_record(self) -> StageRecord | None:
        return read_record(self.store, self.folder, self.name)

    def committed(self) -> StageRecord | None:
        """The record of this exact work with its outputs all there, or None if it has to run.

        A record whose outputs lost objects since (a deleted Zarr chunk would read back as fill
        values) does not count: the problems are logged and the stage runs again."""
        record = self.read_record()
        self._record_seen = record is not None
        if record is None or record.key != self.key:
            return None
        if problems := output_problems(self.store, self.folder, record):
            log.warning(
                "%s: committed, but its outputs changed since: %s; running it again",
                self.rel(self.name), "; ".join(problems[:5]),
            )
            return None
        return record

    def prepare(self, outputs: Iterable[str]) -> None:
        """Make the scope ready for (re)running this stage with this key.

        After `committed()` (which read the record, if any) the record is not looked for again."""
        progress_key = self.store.read_json(posixpath.join(self.progress_path, "key.json"))
        stale_record = self.store.exists(self.record_path) if self._record_seen is None else self._record_seen
        self._record_seen = None
        self.fresh = stale_record or progress_key is None or progress_key.get("key") != self.key
        if self.fresh:
            if stale_record:
                self.store.remove(self.record_path)
            self.store.remove(self.progress_path)
            self._remove_outputs(list(outputs))
            self.store.write_json(posixpath.join(self.progress_path, "key.json"), {"key": self.key})

    def _remove_outputs(self, outputs: list[str]) -> None:
        for output in outputs:
            self.store.remove(self.rel(output))

    def mark_part(self, part: str, info: dict[str, Any]) -> None:
        self.store.write_json(posixpath.join(self.progress_path, f"{part}.json"), info)

    def done_parts(self) -> dict[str, dict[str, Any]]:
        """Markers of the parts an earlier attempt finished, by part name (none, not looked for,
        where `prepare` cleared the stage)."""
        if self.fresh:
            return {}
        parts = {}
        for name in part_markers(self.store.list_names(self.progress_path)):
            info = self.store.read_json(posixpath.join(self.progress_path, name))
            if info is not None:
                parts[name.removesuffix(".json")] = info
        return parts

    def commit(
        self,
        *,
        outputs: list[str],
        output_digest: str,
        started_at: datetime,
        counts: dict[str, float] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> StageRecord:
        finished_at = utc_now()
        objects = {output: describe_objects(self.store, self.folder, output) for output in outputs}
        record = StageRecord(
            stage=self.name,
            scope=posixpath.basename(self.folder),
            key=self.key,
            config=self.config,
            config_digest=digest_json(self.config),
            inputs=self.inputs,
            outputs=outputs,
            output_digest=output_digest,
            counts=counts or {},
            metrics=metrics or {},
            sizes={output: contents.bytes for output, contents in objects.items()},
            objects=objects,
            started_at=started_at,
            finished_at=finished_at,
            seconds=round((finished_at - started_at).total_seconds(), 3),
            code_version=code_version(),
            host=socket.gethostname(),
            user=current_user(),
        )
        self.store.write_json(self.record_path, record.model_dump(mode="json"))
        self.store.remove(self.progress_path)
        self.store.remove_empty_folder(self.rel(PROGRESS))
        return record


def current_user() -> str:
    """The login name, or "unknown" where there is none (containers with an unnamed uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


PROGRESS = "_progress"


def record_path(folder: str, name: str) -> str:
    """Where a stage's record lives, relative to the store root."""
    return posixpath.join(folder, f"{name}.commit.json")


def progress_path(folder: str, name: str) -> str:
    """The folder of a running stage's part markers."""
    return posixpath.join(folder, PROGRESS, name)


def read_record(store: ArtifactStore, folder: str, name: str) -> StageRecord | None:
    """A stage's record whatever its key, or None if it has none."""
    raw = store.read_json(record_path(folder, name))
    return None if raw is None else StageRecord.model_validate(raw)


def parts_in_progress(store: ArtifactStore, folder: str, name: str) -> int:
    """How many parts of an uncommitted stage have finished (0 when none has started)."""
    return len(part_markers(store.list_names(progress_path(folder, name))))


def part_markers(names: list[str]) -> list[str]:
    """The finished parts' marker files among a progress folder's names (not its key, nor a write in flight)."""
    return [name for name in names if name.endswith(".json") and name != "key.json" and ".tmp-" not in name]


def _objects_of(store: ArtifactStore, folder: str, output: str) -> dict[str, int]:
    """An output's objects by path relative to the stage's folder."""
    return {posixpath.relpath(name, folder): size for name, size in store.list_objects(posixpath.join(folder, output)).items()}


def describe_objects(store: ArtifactStore, folder: str, output: str) -> OutputObjects:
    found = _objects_of(store, folder, output)
    names = sorted(found) if len(found) <= LISTED_NAMES_AT_MOST else None
    return OutputObjects(count=len(found), bytes=sum(found.values()), names=names)


def expected_zarr_objects(store: ArtifactStore, relpath: str) -> list[str]:
    """Every object a Zarr group's metadata promises (its arrays' metadata and chunks), relative to relpath."""
    group = store.open_zarr(relpath, mode="r")
    names = ["zarr.json"]
    for name, array in group.arrays():
        names.append(posixpath.join(name, "zarr.json"))
        for coords in itertools.product(*(range(count) for count in array.cdata_shape)):
            names.append(posixpath.join(name, array.metadata.encode_chunk_key(coords)))
    return names


def output_problems(store: ArtifactStore, folder: str, record: StageRecord, strict: bool = False) -> list[str]:
    """What no longer matches the record among a stage's outputs: missing objects (named where
    the record lists them or a Zarr group's metadata promises them) and changed byte totals.

    `strict` also reports objects added since the commit. Cheap: one listing per output, and for
    a Zarr output its group's metadata."""
    problems = []
    for output in record.outputs:
        found = _objects_of(store, folder, output)
        if not found:
            problems.append(f"{output}: missing")
            continue
        recorded = record.objects.get(output)
        expected = set(recorded.names or []) if recorded else set()
        if posixpath.join(output, "zarr.json") in found:
            expected |= {posixpath.join(output, name) for name in expected_zarr_objects(store, posixpath.join(folder, output))}
        missing = sorted(expected - set(found))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"{output}: {len(missing)} object(s) missing: {', '.join(missing[:5])}{more}")
        elif recorded is not None and len(found) < recorded.count:
            problems.append(f"{output}: {recorded.count - len(found)} of {recorded.count} objects missing")
        elif recorded is not None and sum(found.values()) != recorded.bytes and (strict or len(found) == recorded.count):
            problems.append(f"{output}: holds {sum(found.values())} bytes, the record says {recorded.bytes}")
        elif strict and recorded is not None and len(found) > recorded.count:
            problems.append(f"{output}: {len(found) - recorded.count} object(s) added since the commit")
    return problems


def open_run(run_path: str, storage_options: dict[str, Any] | None = None) -> tuple[ArtifactStore, str]:
    """`<store root>/<run name>` (a folder or URL) -> the store and the run's name."""
    trimmed = run_path.rstrip("/")
    return ArtifactStore(parent_of(trimmed), storage_options), posixpath.basename(trimmed)


def forget_stage(store: ArtifactStore, folder: str, name: str) -> bool:
    """Remove a stage's record and progress so that it runs afresh; True if there was a record."""
    record = record_path(folder, name)
    existed = store.exists(record)
    store.remove(record)
    store.remove(progress_path(folder, name))
    return existed
