"""Content digests used as lineage: stage keys, output digests, source fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa


def digest_json(value: Any) -> str:
    """A stable sha256 of a JSON-serialisable value (keys sorted, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hashes64(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """[non-null values] uint64: an 8-byte blake2b of each string, to tell millions of values apart
    without keeping them. Two of a million collide by chance about once in 10^7 corpora; whoever
    finds values repeating on their hashes compares the strings before saying so."""
    strings = values.drop_null().to_pylist()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") for value in strings),
        dtype=np.uint64, count=len(strings),
    )


def repeated_hashes(hashes: np.ndarray) -> np.ndarray:
    """The hashes that occur more than once, each once."""
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_array(block: np.ndarray) -> str:
    """The digest of an array's values as stored (C order, its dtype): one per chunk of a chunked output."""
    return digest_bytes(np.ascontiguousarray(block).tobytes())


def digest_digests(digests: Iterable[str]) -> str:
    """Combine ordered part digests (e.g. one per Zarr chunk) into one digest of the whole."""
    combined = hashlib.sha256()
    for digest in digests:
        combined.update(digest.encode())
    return combined.hexdigest()


def digest_json_with_list(value: dict[str, Any], key: str, batches: Iterable[list[str]]) -> str:
    """`digest_json({**value, key: [every string of batches, in order]})`, streamed: the long list
    (a corpus's utterance ids) is never built."""
    marker = "\u0000list\u0000"
    text = json.dumps({**value, key: marker}, sort_keys=True, separators=(",", ":"), default=str)
    prefix, suffix = text.split(json.dumps(marker))
    digest = hashlib.sha256(prefix.encode() + b"[")
    first = True
    for batch in batches:
        if not batch:
            continue
        digest.update(((("" if first else ",") + ",".join(json.dumps(item) for item in batch))).encode())
        first = False
    digest.update(b"]" + suffix.encode())
    return digest.hexdigest()
