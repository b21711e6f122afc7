"""The artifact store's commit protocol, the same test on a local folder and on a real S3 server."""

import builtins
import errno
import uuid
from pathlib import Path

import numpy as np
import pytest

import infra.store
from infra.commit import Stage
from infra.store import ArtifactStore, utc_now
from infra.zarr_io import read_row_chunks
from tasks.audit.verification import verify_run
from tests.support import RUNS_BUCKET, objects_under


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path))
    s3 = request.getfixturevalue("s3")
    return ArtifactStore(f"s3://{RUNS_BUCKET}/stages-{uuid.uuid4().hex[:8]}", s3.storage_options())


def make_stage(store: ArtifactStore, k: int) -> Stage:
    return Stage(store, "run/iter-1", "thing", version=1, config={"k": k}, inputs={"upstream": "abc"})


def write_output(store: ArtifactStore, stage: Stage, text: str) -> None:
    store.write_text(stage.rel("thing.txt"), text)


def test_a_committed_stage_is_found_by_its_key_and_only_by_it(store: ArtifactStore) -> None:
    stage = make_stage(store, 3)
    assert stage.committed() is None
    stage.prepare(["thing.txt"])
    write_output(store, stage, "three")
    record = stage.commit(outputs=["thing.txt"], output_digest="d3", started_at=utc_now(), counts={"n": 3})
    assert make_stage(store, 3).committed() == record
    assert record.sizes == {"thing.txt": 5} and record.scope == "iter-1"
    assert make_stage(store, 4).committed() is None
    assert objects_under(store, "run/iter-1/_progress") == []
    assert {"thing.commit.json", "thing.txt"} <= set(store.list_names(stage.rel("")))


def test_changing_the_key_removes_the_old_record_and_outputs(store: ArtifactStore) -> None:
    old = make_stage(store, 3)
    old.prepare(["thing.txt"])
    write_output(store, old, "three")
    old.commit(outputs=["thing.txt"], output_digest="d3", started_at=utc_now())
    new = make_stage(store, 4)
    new.prepare(["thing.txt"])
    assert not store.exists(new.record_path)
    assert not store.exists(new.rel("thing.txt"))
    assert new.done_parts() == {}


def test_an_interrupted_stage_keeps_its_finished_parts_for_the_same_key_only(store: ArtifactStore) -> None:
    stage = make_stage(store, 3)
    stage.prepare(["thing.txt"])
    write_output(store, stage, "partial")
    stage.mark_part("chunk-000000", {"digest": "a"})
    stage.mark_part("chunk-000001", {"digest": "b"})

    resumed = make_stage(store, 3)
    assert resumed.committed() is None
    resumed.prepare(["thing.txt"])
    assert set(resumed.done_parts()) == {"chunk-000000", "chunk-000001"}
    assert store.exists(resumed.rel("thing.txt"))

    changed = make_stage(store, 5)
    changed.prepare(["thing.txt"])
    assert changed.fresh and not resumed.fresh
    assert changed.done_parts() == {}
    assert not store.exists(changed.rel("thing.txt"))
    assert [path.rsplit("/", 1)[-1] for path in objects_under(store, changed.progress_path)] == ["key.json"]


def test_writes_are_whole_or_absent(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    store.write_json("a/b.json", {"x": 1})
    assert store.read_json("a/b.json") == {"x": 1}
    assert store.read_json("a/missing.json") is None
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


class FullDisk:
    """A file opened for writing on a disk that has just filled up."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_midway_leaves_no_temporary_file_and_verify_reports_any_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (the write raises after the temporary file exists): nothing is left, the old
    content stays. A temporary file a killed process left is what `verify` reports."""
    store = ArtifactStore(str(tmp_path))
    store.write_json("r/corpus/a.json", {"x": 1})

    monkeypatch.setattr(infra.store, "open", lambda path, mode: FullDisk(builtins.open(path, mode)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        store.write_json("r/corpus/a.json", {"x": 2})
    monkeypatch.undo()
    assert sorted(path.name for path in (tmp_path / "r" / "corpus").iterdir()) == ["a.json"]
    assert store.read_json("r/corpus/a.json") == {"x": 1}

    (tmp_path / "r" / "corpus" / "b.json.tmp-0123").write_bytes(b"half")
    checks = verify_run(str(tmp_path / "r"))
    assert [(check.stage, check.problems) for check in checks] == [
        ("temporary files", ["1 left by failed writes (4 bytes; or in flight, if a run is writing): r/corpus/b.json.tmp-0123"])
    ]


def test_remove_takes_a_file_or_a_folder_tree_and_nothing_that_only_shares_its_prefix(store: ArtifactStore) -> None:
    for relpath in ("run/labels.zarr/zarr.json", "run/labels.zarr/labels/c/0", "run/labels.zarr.old", "run/labels.zarr2/x", "run/a.json"):
        store.write_text(relpath, "x")
    store.remove("run/labels.zarr")
    store.remove("run/a.json")
    store.remove("run/never-written")
    assert sorted(store.list_objects("run")) == ["run/labels.zarr.old", "run/labels.zarr2/x"]


def test_removing_a_folder_on_s3_is_one_listing_and_one_delete(s3, tmp_path: Path) -> None:
    store = ArtifactStore(f"s3://{RUNS_BUCKET}/remove-{uuid.uuid4().hex[:8]}", s3.storage_options())
    for index in range(3):
        store.write_text(f"tree/{index}", "x")
    sent: list[str] = []
    store.fs.s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
    store.remove("tree")
    assert sent == ["GET", "POST"] and store.list_objects("tree") == {}
    sent.clear()
    store.remove("tree")
    assert sent == ["GET"]


def row_chunked(store: ArtifactStore, dtype: str, compressors: object = None) -> tuple[object, np.ndarray]:
    """A 2-D array of 100 rows in chunks of 32, and the values written to it."""
    values = np.random.default_rng(0).standard_normal((100, 6)).astype(dtype)
    group = store.open_zarr("rows.zarr", mode="w")
    array = group.create_array("rows", shape=values.shape, chunks=(32, 6), dtype=dtype, compressors=compressors)
    array[:] = values
    return store.open_zarr("rows.zarr", mode="r")["rows"], values


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_raw_chunks_read_as_zarr_reads_them(store: ArtifactStore, dtype: str) -> None:
    array, values = row_chunked(store, dtype)
    for start, stop in [(0, 32), (32, 96), (64, 100), (96, 100), (0, 100)]:
        rows = read_row_chunks(array, start, stop)
        assert rows.dtype == values.dtype and np.array_equal(rows, values[start:stop]), (start, stop)
    compressed, values = row_chunked(store, dtype, compressors="auto")
    assert np.array_equal(read_row_chunks(compressed, 32, 100), values[32:])


def test_a_missing_or_cut_raw_chunk_is_named_not_read_as_zeros(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    array, _ = row_chunked(store, "float32")
    chunk = tmp_path / "rows.zarr" / "rows" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"rows/c/1/0: 764 bytes, a chunk of this array holds 768"):
        read_row_chunks(array, 32, 64)
    chunk.unlink()
    with pytest.raises(FileNotFoundError, match=r"rows/c/1/0: a chunk of rows 0-64 of 100 is missing"):
        read_row_chunks(array, 0, 64)


def test_prepare_after_committed_does_not_look_for_the_record_again(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = make_stage(store, 3)
    stale.prepare(["thing.txt"])
    write_output(store, stale, "three")
    stale.commit(outputs=["thing.txt"], output_digest="d3", started_at=utc_now())
    looked_for: list[str] = []
    exists = store.exists
    monkeypatch.setattr(store, "exists", lambda relpath: looked_for.append(relpath) or exists(relpath))

    fresh = Stage(store, "run/iter-2", "thing", version=1, config={"k": 3}, inputs={})
    assert fresh.committed() is None
    fresh.prepare(["thing.txt"])
    changed = make_stage(store, 4)
    assert changed.committed() is None
    changed.prepare(["thing.txt"])

    assert fresh.record_path not in looked_for and changed.record_path not in looked_for
    assert not store.exists(changed.record_path) and not store.exists(changed.rel("thing.txt"))
