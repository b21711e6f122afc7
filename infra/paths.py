"""Paths that may be local or URLs: the one place that tells them apart (besides the store itself)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

LISTING_BATCH = 65_536


def is_remote_url(path: str) -> bool:
    """True for URLs with a protocol other than file:// (s3://, gs://, memory://, ...)."""
    return fsspec.utils.get_protocol(path) not in ("file", "local")


def join_path(base: str, relative: str) -> str:
    """`relative` resolved against folder `base`; absolute paths and URLs are returned as they are."""
    if is_remote_url(relative) or Path(relative).is_absolute():
        return relative
    if is_remote_url(base):
        protocol, _, rest = base.partition("://")
        return f"{protocol}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return str((Path(base) / relative).resolve())


def lies_under(path: str, root: str) -> bool:
    """Whether `path` is `root` or inside it, judged on the names alone (nothing is fetched): the
    same kind of place (a local path, or a URL of the same protocol and bucket or host), and the
    root's path a whole-component prefix of the path's once `..` and `.` are resolved."""
    if is_remote_url(path) != is_remote_url(root):
        return False
    if is_remote_url(path):
        path_protocol, _, path_rest = path.partition("://")
        root_protocol, _, root_rest = root.partition("://")
        if path_protocol.lower() != root_protocol.lower():
            return False
        inside, folder = posixpath.normpath("/" + path_rest), posixpath.normpath("/" + root_rest.rstrip("/"))
    else:
        inside, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return inside == folder or inside.startswith(folder.rstrip("/") + "/")


def parent_of(path: str) -> str:
    """The folder holding a file, as a local path or URL like the input."""
    if is_remote_url(path):
        protocol, _, rest = path.partition("://")
        return f"{protocol}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(path).resolve().parent)


def whole_read_options(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """Options for `fs.cat_file` (and an fsspec Zarr store's) that read an object in one request.

    s3fs otherwise asks an object's size first (a HEAD), to split a big one into concurrent
    ranges; the files read whole here (audio, JSON, Zarr chunks) are rarely big enough for that
    to pay, and the HEAD was one request in two."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return {"max_concurrency": 1} if protocol in ("s3", "s3a") else {}


def read_whole(path: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A whole file, local or remote, in one request on object storage."""
    fs, stripped = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.cat_file(stripped, **whole_read_options(fs))


def read_range(path: str, offset: int, length: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Bytes [offset, offset + length) of a file, local or remote (one ranged GET on object storage)."""
    fs, stripped = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.cat_file(stripped, start=offset, end=offset + length)


def _sorted_entries(fs: LocalFileSystem, folder: str) -> list[dict[str, Any]]:
    """The entries of one local folder (as `fs.info` gives them: a link is listed, not followed
    into), in the order their full paths sort: a folder by its name and a slash, since every path
    below it starts so."""
    with os.scandir(folder) as entries:
        infos = [fs.info(entry) for entry in entries]
    return sorted(infos, key=lambda info: info["name"] + "/" if info["type"] == "directory" else info["name"])


def _local_files(fs: LocalFileSystem, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, info) of every file below a local folder, in sorted path order, one folder at a
    time: memory bounded by the largest folder, not by the corpus."""
    pending = [iter(_sorted_entries(fs, root))]
    while pending:
        info = next(pending[-1], None)
        if info is None:
            pending.pop()
        elif info["type"] == "directory":
            pending.append(iter(_sorted_entries(fs, info["name"])))
        else:
            yield info["name"], info


def walk_files(folder: str, storage_options: dict[str, Any] | None = None) -> tuple[Iterator[tuple[str, dict[str, Any]]], Any]:
    """(path, info) of every file below `folder`, in sorted path order, and its filesystem.

    A local folder is read one folder at a time; object storage is listed at once (s3fs's `find`,
    one paginated request for the whole prefix) and sorted."""
    fs, root = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError(f"corpus folder not found: {folder}")
    if isinstance(fs, LocalFileSystem):
        return _local_files(fs, root), fs
    return iter(sorted(fs.find(root, detail=True).items())), fs


def _batched(rows: Iterator[Any], size: int = LISTING_BATCH) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def find_files(folder: str, suffixes: tuple[str, ...], storage_options: dict[str, Any] | None = None) -> pa.ChunkedArray:
    """Files under `folder` (recursively) whose names end with one of `suffixes` (any case), sorted,
    as an Arrow column in chunks of LISTING_BATCH (a corpus of millions of files is listed without a
    Python string per file, and never copied whole).

    Local results are plain paths, remote ones full URLs, so either can be opened with fsspec.
    """
    found, fs = walk_files(folder, storage_options)
    local = isinstance(fs, LocalFileSystem)
    matching = (path if local else fs.unstrip_protocol(path) for path, _ in found if path.lower().endswith(suffixes))
    return pa.chunked_array([pa.array(batch, pa.string()) for batch in _batched(matching)], pa.string())


def count_by_suffix(folder: str, storage_options: dict[str, Any] | None = None) -> dict[str, int] | None:
    """How many files under `folder` (recursively) end with each suffix (lowercased; '' for none),
    or None when `folder` is not a folder (a manifest file). One listing (`walk_files`)."""
    try:
        found, _ = walk_files(folder, storage_options)
    except FileNotFoundError:
        return None
    counts: dict[str, int] = {}
    for path, _ in found:
        suffix = posixpath.splitext(path)[1].lower()
        counts[suffix] = counts.get(suffix, 0) + 1
    return counts


def unreadable_because(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why `path` cannot be read (absent, or the credentials or endpoint refuse), or None if it can.

    One request (a HEAD, or a listing for a prefix): a probe made before anything starts."""
    try:
        fs, stripped = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.info(stripped)
    except FileNotFoundError:
        return f"{path} does not exist"
    except Exception as error:  # noqa: BLE001 - whatever the probe hits is the finding
        return f"{path} cannot be read: {type(error).__name__}: {error}"
    return None


def fingerprint_source(source: str, suffixes: tuple[str, ...], storage_options: dict[str, Any] | None = None) -> str:
    """A cheap digest that changes when a corpus source changes.

    A folder: one listing of its audio files with sizes and modification times. A manifest file:
    its content (a file edited behind an unchanged manifest is not noticed; force the stage then).
    """
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if fs.isdir(root):
        found, _ = walk_files(source, storage_options)
        rows = (
            [path, info.get("size"), str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")]
            for path, info in found
            if path.lower().endswith(suffixes)
        )
        # digest_json of the sorted [path, size, stamp] list, streamed in the walk's (sorted) order.
        digest = hashlib.sha256(b"[")
        for index, batch in enumerate(_batched(rows)):
            text = ",".join(json.dumps(row, separators=(",", ":")) for row in batch)
            digest.update(((("," if index else "") + text)).encode())
        digest.update(b"]")
        return digest.hexdigest()
    digest = hashlib.sha256()
    with fs.open(root, "rb") as handle:
        while block := handle.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()
