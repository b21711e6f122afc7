"""The artifact store: one root (a local folder or an s3:// prefix) holding every run's artifacts.

Where a run's artifacts sit is the pipeline's business (tasks/run/layout.py); the commit protocol
inside a stage's folder is infra/commit.py's, Zarr I/O infra/zarr_io.py's. This module is the
files themselves: whole reads and atomic writes, listings, removal, and the conditional writes a
lease needs. Everything goes through fsspec, so the same code serves a laptop folder and object
storage. This is the only module that tells local paths from URLs.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec
import fsspec.asyn
import zarr
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from infra.digest import digest_bytes
from infra.paths import whole_read_options


def encode_json(value: Any) -> bytes:
    """How the store writes JSON: indented, keys sorted, a final newline."""
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class VersionMismatch(RuntimeError):
    """A conditional write or delete found the object changed since it was read (or gone)."""


# Every chunk of an array is written, even one equal to the fill value (zarr's default skips
# those): a chunk that is absent is then always a lost one, never a legitimately empty one, and
# output checks can name it instead of reading fill values. Set on import, so in every process.
zarr.config.set({"array.write_empty_chunks": True})


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

    def write_bytes(self, relpath: str, data: bytes, durable: bool = False) -> None:
        """Write a whole file so that readers see either nothing or all of it.

        A local file is written under a temporary name and renamed; an object store PUT is atomic.
        A failed local write (a full disk) removes its temporary file. No fsync unless `durable`
        (the lease): this guards against a killed process, not a lost machine (whose page cache
        would take the unsynced data files with it anyway).
        """
        target = self.path(relpath)
        if not self.is_local:
            # No makedirs: object stores have no folders, and s3fs would create a mistyped bucket.
            self.fs.pipe_file(target, data)
            return
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        temporary = _write_temporary(target, data, durable)
        try:
            os.replace(temporary, target)
        except BaseException:
            _remove_quietly(temporary)
            raise
        if durable:
            _sync_folder(posixpath.dirname(target))

    def write_json(self, relpath: str, value: Any) -> None:
        self.write_bytes(relpath, encode_json(value))

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
        existing name, atomically), and synced to disk: a lease must survive a lost machine. S3: a
        PUT with `If-None-Match: *`; a server that ignores the header overwrites instead, which the
        lease's read-back detects (see infra/lease.py).
        """
        target = self.path(relpath)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            temporary = _write_temporary(target, data, durable=True)
            try:
                os.link(temporary, target)
            finally:
                os.unlink(temporary)
            _sync_folder(posixpath.dirname(target))
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
                self.write_bytes(relpath, data, durable=True)
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

    def move(self, source: str, target: str) -> bool:
        """Move a file or a folder tree to `target` (replacing nothing: `target` must be free);
        False when there is nothing at `source`.

        A local move is a rename (atomic for a file or a folder on one file system). On object
        storage each object is copied, then deleted: a crash in between leaves copies at both
        places, never at neither."""
        if self.is_local:
            if not os.path.lexists(self.path(source)):
                return False
            self.fs.makedirs(posixpath.dirname(self.path(target)), exist_ok=True)
            os.rename(self.path(source), self.path(target))
            return True
        found = self._found_under(self.path(source))
        if not found:
            return False
        prefix = self.path(source)
        for path in found:
            self.fs.copy(path, self.path(target) + path[len(prefix) :])
        self.fs.rm(list(found))
        self.fs.invalidate_cache()
        return True

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
            if info.get("type") != "directory" and TEMPORARY_MARK not in posixpath.basename(path)
        }

    def temporaries(self, relpath: str) -> dict[str, int]:
        """Local writes' temporary files (`.tmp-`) at or under relpath, with their bytes: a write in
        flight, or one a killed process left (object stores write whole objects and leave none)."""
        if not self.is_local:
            return {}
        return {
            posixpath.relpath(path, self.root): int(info.get("size") or 0)
            for path, info in self._found_under(self.path(relpath)).items()
            if info.get("type") != "directory" and TEMPORARY_MARK in posixpath.basename(path)
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



TEMPORARY_MARK = ".tmp-"
"""What names a local write's temporary file (`<name>.tmp-<uuid>`) until it is renamed into place."""


def _write_temporary(target: str, data: bytes, durable: bool) -> str:
    """`data` in a new temporary file beside `target` (synced to disk if `durable`); its path. A
    write that fails (a full disk) removes the file, so no partial copy is left behind."""
    temporary = f"{target}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        _remove_quietly(temporary)
        raise
    return temporary


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sync_folder(folder: str) -> None:
    """fsync a local folder, so that a rename or link in it survives a lost machine."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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



def current_user() -> str:
    """The login name, or "unknown" where there is none (containers with an unnamed uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

