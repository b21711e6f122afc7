"""Outputs verified before use, and `hubert-pipeline verify [--deep]`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tasks.audit.verification import verify_run
from tests.support import demo_config, run_chain, run_cli


def findings(run_path: Path, deep: bool = False) -> dict[str, list[str]]:
    """verify's problems by stage label (an empty list: that stage is fine)."""
    return {check.stage: check.problems for check in verify_run(str(run_path), deep=deep)}


def test_a_lost_chunk_is_named_redone_and_gives_the_clean_labels_and_verify_finds_both_kinds_of_damage(
    tmp_path: Path, demo_corpus: Path, client, caplog: pytest.LogCaptureFixture
) -> None:
    config = demo_config(tmp_path, demo_corpus)
    clean = run_chain(config, client, "labels")
    labels_before = clean.store.open_zarr(clean.layout.labels_store(1), mode="r")["labels"][:]
    assert clean.records["labels"].objects["labels.zarr"].count >= 4

    run_path = tmp_path / "runs" / "t"
    assert findings(run_path, deep=True) == {"intake": [], "features@1": [], "kmeans@1": [], "labels@1": []}

    root = Path(clean.store.root)
    lost_features = f"{clean.layout.features_store(1)}/features/c/2/0"
    lost_labels = f"{clean.layout.labels_store(1)}/labels/c/1"
    os.remove(root / lost_features)
    os.remove(root / lost_labels)

    assert findings(run_path) == {
        "intake": [],
        "features@1": ["features.zarr: 1 object(s) missing: features.zarr/features/c/2/0"],
        "kmeans@1": [],
        "labels@1": ["labels.zarr: 1 object(s) missing: labels.zarr/labels/c/1"],
    }

    with caplog.at_level(logging.WARNING, logger="infra.store"):
        again = run_chain(config, client, "labels")
    warnings = "\n".join(caplog.messages)
    assert "features: committed, but its outputs changed since: features.zarr: 1 object(s) missing: features.zarr/features/c/2/0" in warnings
    assert "labels.zarr/labels/c/1" in warnings
    assert "kmeans: committed" not in warnings
    assert again.records["features"].finished_at > clean.records["features"].finished_at
    assert again.records["kmeans"].finished_at == clean.records["kmeans"].finished_at  # same features digest: kept
    assert again.records["labels"].output_digest == clean.records["labels"].output_digest
    labels_after = again.store.open_zarr(again.layout.labels_store(1), mode="r")["labels"][:]
    np.testing.assert_array_equal(labels_after, labels_before)
    assert all(problems == [] for problems in findings(run_path, deep=True).values())

    # Altered in place, same size (features are stored uncompressed): only the deep check can tell.
    chunk = root / f"{clean.layout.features_store(1)}/features/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert all(problems == [] for problems in findings(run_path).values())
    deep = run_cli(tmp_path, "verify", str(run_path), "--deep", check=False)
    assert deep.returncode == 1, deep.stdout
    assert "features@1: output digest" in deep.stdout and "altered after the commit" in deep.stdout
    assert "labels@1: ok (outputs and digest)" in deep.stdout
