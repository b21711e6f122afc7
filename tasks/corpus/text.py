"""Reading a source's text files (manifests, listings) line by line, local or remote, gzip or not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec

from tasks.corpus.manifest import ManifestError


def read_lines(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """The lines of a text file, streamed (a `.gz` one decompressed), without their line ends."""
    compression = "gzip" if path.lower().endswith(".gz") else None
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression=compression, **(storage_options or {})) as handle:
            for line in handle:
                yield line.rstrip("\r\n")
    except FileNotFoundError as error:
        raise ManifestError(f"corpus manifest not found: {path}") from error


def json_lines(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
    """(`path:line`, the parsed value) of each non-empty line of a JSON-lines file, streamed;
    ManifestError naming the line where one is not JSON."""
    import json

    for number, line in enumerate(read_lines(path, storage_options), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{where}: not JSON ({error.msg})") from error
