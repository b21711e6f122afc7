"""A folder of audio files: every wav, flac, mp3, ogg and opus file below it, in sorted path order."""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from infra.paths import find_files
from tasks.corpus.formats import IdRule, Listing, candidate_listing
from tasks.corpus.manifest import AUDIO_SUFFIXES, ManifestError


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    try:
        paths = find_files(source, AUDIO_SUFFIXES, storage_options)
    except FileNotFoundError as error:
        raise ManifestError(str(error)) from error
    fs, root = fsspec.core.url_to_fs(source, **storage_options)
    root = root if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(root)
    return candidate_listing("files", pa.table({"path": paths}), root, ids)
