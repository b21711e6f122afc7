"""Content digests used as lineage: stage keys, output digests, source fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np


def digest_json(value: Any) -> str:
    """A stable sha256 of a JSON-serialisable value (keys sorted, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
