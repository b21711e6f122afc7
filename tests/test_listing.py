"""Intake's driver side at corpus scale: the folder walked in sorted order a folder at a time, the
probe results written on in source order, clashes found on hashes and confirmed on strings."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

import tasks.corpus.formats as formats
from infra.digest import digest_json
from infra.paths import find_files, fingerprint_source
from tasks.corpus.checks import REJECTION_SCHEMA, ProbeResults
from tasks.corpus.formats import Listing, any_repeated, check_unique
from tasks.corpus.manifest import MANIFEST_SCHEMA, ManifestError, ParquetRows, Utterance, conform, utterances_table
from tasks.corpus.splits import ValidSplit

AUDIO = (".wav", ".flac", ".mp3")


def tricky_tree(root: Path) -> Path:
    """Names whose full paths sort differently from a folder-by-folder walk sorted by name alone:
    `a-c/` and `a.wav` before `a/`, `a0.wav` after it; a link to a folder, listed and not followed."""
    for relative in ["a/b.wav", "a.wav", "a-c/x.wav", "a0.wav", "a/z/q.WAV", "b/ä.wav", "b/a b.flac", "c/.hidden.wav",
                     "a/b/c/d/e.mp3", "x.txt", "A/1.wav"]:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * len(relative))
    os.symlink(root / "a", root / "link-to-a")
    os.symlink(root / "a.wav", root / "link.wav")
    return root


def test_a_folder_is_listed_in_sorted_path_order_and_fingerprinted_as_its_sorted_listing(tmp_path: Path) -> None:
    root = tricky_tree(tmp_path / "corpus")
    everything = LocalFileSystem().find(str(root), detail=True)  # the whole listing at once, as a check
    audio = sorted(path for path in everything if path.lower().endswith(AUDIO))
    assert find_files(str(root), AUDIO).to_pylist() == audio
    assert str(root / "a-c" / "x.wav") in audio and str(root / "link-to-a" / "b.wav") not in audio
    listing = [[path, everything[path]["size"], str(everything[path]["mtime"])] for path in audio]
    assert fingerprint_source(str(root), AUDIO) == digest_json(listing)
    (root / "a0.wav").write_bytes(b"changed")
    assert fingerprint_source(str(root), AUDIO) != digest_json(listing)


def test_a_manifest_written_in_pieces_is_the_parquet_of_the_whole_table() -> None:
    count = 1000
    table = conform(pa.table({
        "id": [f"u{index}" for index in range(count)], "path": [f"/x/{index % 7}.wav" for index in range(count)],
        "samples": np.arange(count), "sample_rate": [16_000] * count, "channels": [1] * count,
    }))
    for rows_per_group in (64, 1000, 5000):
        whole = io.BytesIO()
        pq.write_table(table, whole, row_group_size=rows_per_group, compression="zstd")
        pieces = ParquetRows(MANIFEST_SCHEMA, rows_per_group)
        start = 0
        for size in (3, 61, 200, 1, 500, 235):
            pieces.add(table.slice(start, size))
            start += size
        assert pieces.finish() == whole.getvalue()


def batch(*names: str, folder: str = "/corpus") -> pa.Table:
    return utterances_table([Utterance(id=name, path=f"{folder}/{name}.wav", samples=16_000, sample_rate=16_000, channels=1) for name in names])


def no_rejections() -> pa.Table:
    return REJECTION_SCHEMA.empty_table()


class EveryOther:
    """A validation rule: `valid` is a fraction (of 0.5, seed 0), as `corpus.valid: 0.5` is."""

    valid = 0.5
    valid_seed = 0


def test_probe_results_arriving_out_of_order_are_written_in_source_order_with_their_split() -> None:
    names = [f"u{index:03d}" for index in range(60)]
    results = ProbeResults(ValidSplit(EveryOther(), {}))
    for index in (2, 0, 3, 1):  # as Dask hands them back
        results.add(index, batch(*names[15 * index : 15 * index + 15]), no_rejections())
    taken = results.finish(Listing("files", [], "stem"))
    manifest = pq.read_table(io.BytesIO(taken.manifest))
    assert manifest.column("id").to_pylist() == names
    valid = manifest.column("split").to_pylist().count("valid")
    assert 0 < valid < 60 and taken.counts["valid_utterances"] == valid
    assert taken.counts["utterances"] == 60 and taken.counts["hours"] == round(60 / 3600, 4)


def test_one_id_from_two_probe_tasks_stops_intake_naming_both() -> None:
    results = ProbeResults(None)
    results.add(0, batch("a", "b", folder="/one"), no_rejections())
    results.add(1, batch("c", "a", folder="/two"), no_rejections())
    with pytest.raises(ManifestError, match="duplicate utterance ids") as caught:
        results.finish(Listing("files", [], "stem"))
    assert "/one/a.wav" in str(caught.value) and "/two/a.wav" in str(caught.value)


def test_strings_sharing_a_hash_are_not_called_a_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "hashes64", lambda values: np.zeros(len(values.drop_null()), np.uint64))
    table = batch("a", "b", "c")
    assert not any_repeated(table.column("id"))
    check_unique(table, "ids: stem")  # every hash the same, no id twice: no error
    assert any_repeated(pa.array(["a", "b", "a"]))
