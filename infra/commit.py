"""The commit protocol inside a stage's folder of the artifact store:

    <folder>/<stage>.commit.json          the stage's record, written last
    <folder>/_progress/<stage>/           per-part markers of a stage still running

A stage's record is written last and read first: its presence, with a key that matches and its
outputs all there, is what "done" means.
"""

from __future__ import annotations

import logging
import posixpath
import socket
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from infra.digest import digest_json
from infra.lease import LeaseFence, LeaseLost, held_fence
from infra.paths import parent_of
from infra.store import ArtifactStore, current_user, encode_json, utc_now
from infra.version import code_version
from infra.zarr_io import expected_zarr_objects

log = logging.getLogger(__name__)


LISTED_NAMES_AT_MOST = 64


class OutputObjects(BaseModel):
    """What one output of a stage held at commit: enough to tell later that something went missing."""

    count: int = Field(description="Objects (files) under the output.")
    bytes: int
    names: list[str] | None = Field(
        default=None, description=f"The objects' paths relative to the stage's folder, for outputs of at most {LISTED_NAMES_AT_MOST}."
    )
    sizes: dict[str, int] | None = Field(
        default=None, description="Bytes of each listed object (records from before it list names only)."
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



class Stage:
    """The commit protocol of one stage in one folder of a run.

    - `committed()` answers "is this work already done?": a record exists and its key matches.
    - `prepare(outputs)` clears whatever a different key left behind (the record first, so nothing
      looks finished while it is being removed) and keeps the finished parts of an interrupted run
      with the same key; `fresh` says which it did.
    - Workers call `mark_part` after each part (e.g. a Zarr chunk) is fully written; `done_parts`
      lists them on resume.
    - `commit(record)` writes the record last, then drops the part markers. The record is created
      only where there is none: a second writer never commits over the first.
    - `fence`: the run's lease (infra/lease.py), checked before every write this protocol makes
      (clearing, part markers, the record), so that a writer that lost its lease writes nothing
      more. By default, the lease this process holds over the folder, if any.
    - With `keep_previous`, what a different key left (its record, outputs and progress: a
      trained model and its checkpoints) is moved to `_kept/<stage>-<key>/` instead of removed,
      the newest `keep_previous` of them kept; `committed()` moves one back when its key is this
      stage's again, so going back to earlier settings takes the earlier work back.
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
        outputs: Iterable[str] = (),
        keep_previous: int = 0,
        fence: LeaseFence | None = None,
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
        self.outputs = tuple(outputs)
        self.keep_previous = keep_previous
        self.fence = fence if fence is not None else held_fence(store, folder)
        self._record_seen: StageRecord | None | bool = None
        self.fresh = False
        """Whether `prepare` cleared the stage: no outputs, no finished parts are left from an earlier attempt."""

    def rel(self, *parts: str) -> str:
        """Path relative to the store root of something in this stage's folder."""
        return posixpath.join(self.folder, *parts)

    def check_fence(self) -> None:
        """LeaseLost if this stage's run lost its lease (a no-op for a stage run without one)."""
        if self.fence is not None:
            self.fence.check()

    @property
    def record_path(self) -> str:
        return record_path(self.folder, self.name)

    @property
    def progress_path(self) -> str:
        return progress_path(self.folder, self.name)

    @property
    def clock_path(self) -> str:
        return clock_path(self.folder, self.name)

    def read_record(self) -> StageRecord | None:
        return read_record(self.store, self.folder, self.name)

    def committed(self) -> StageRecord | None:
        """The record of this exact work with its outputs all there, or None if it has to run.

        A record whose outputs lost objects since (a deleted Zarr chunk would read back as fill
        values) does not count: the problems are logged and the stage runs again. Work of this key
        kept aside (`keep_previous`) is moved back first."""
        record = self.read_record()
        if (record is None or record.key != self.key) and self._take_back_kept(record):
            record = self.read_record()
        self._record_seen = record if record is not None else False
        if record is None or record.key != self.key:
            return None
        if problems := output_problems(self.store, self.folder, record):
            log.warning(
                "%s: committed, but its outputs changed since: %s; running it again",
                self.rel(self.name), "; ".join(problems[:5]),
            )
            return None
        return record

    def damaged_record(self) -> StageRecord | None:
        """After `committed()` found none: the record of this very key whose outputs changed since
        (what a repair starts from), or None."""
        seen = self._record_seen
        return seen if isinstance(seen, StageRecord) and seen.key == self.key else None

    def prepare(self, outputs: Iterable[str] | None = None, repairing: bool = False) -> None:
        """Make the scope ready for (re)running this stage with this key.

        `repairing`: the record of this key goes, but the outputs stay for the work to resume from
        (the caller removed what was damaged). After `committed()` (which read the record, if any)
        the record is not looked for again."""
        self.check_fence()
        outputs = list(self.outputs if outputs is None else outputs)
        if repairing and (damaged := self.damaged_record()) is not None:
            log.warning("%s: repairing the work of key %s from what is intact", self.rel(self.name), damaged.key[:12])
            self._record_seen = None
            self.store.remove(self.record_path)
            self.store.write_json(posixpath.join(self.progress_path, "key.json"), {"key": self.key})
            self.fresh = False
            return
        progress_key = (self.store.read_json(posixpath.join(self.progress_path, "key.json")) or {}).get("key")
        seen = self.read_record() if self._record_seen is None else (self._record_seen or None)
        self._record_seen = None
        self.fresh = seen is not None or progress_key != self.key
        if self.fresh:
            earlier = seen.key if seen is not None else progress_key
            if self.keep_previous and earlier is not None and earlier != self.key:
                self._keep_aside(earlier, outputs, has_record=seen is not None)
            if seen is not None:
                self.store.remove(self.record_path)
            self.store.remove(self.progress_path)
            self._remove_outputs(outputs)
            self.store.write_json(posixpath.join(self.progress_path, "key.json"), {"key": self.key})

    def _remove_outputs(self, outputs: list[str]) -> None:
        for output in outputs:
            self.store.remove(self.rel(output))

    def _kept(self, key: str) -> str:
        return kept_path(self.folder, self.name, key)

    def _keep_aside(self, key: str, outputs: list[str], has_record: bool, sparing: str | None = None) -> None:
        """Move the work of `key` to its place under `_kept/`: the record first (nothing there looks
        finished while it moves), then outputs and progress; `kept.json` last says it is whole."""
        shelf = self._kept(key)
        self.store.remove(shelf)
        if has_record:
            self.store.move(self.record_path, posixpath.join(shelf, RECORD))
        moved = [output for output in outputs if self.store.move(self.rel(output), posixpath.join(shelf, output))]
        self.store.move(self.progress_path, posixpath.join(shelf, PROGRESS))
        self.store.write_json(
            posixpath.join(shelf, KEPT_INDEX),
            {"key": key, "kept_at": utc_now().isoformat(), "committed": has_record, "outputs": moved},
        )
        log.info(
            "%s: settings changed; kept the %s work of key %s (%s) in %s", self.rel(self.name),
            "committed" if has_record else "unfinished", key[:12], ", ".join(moved) or "no outputs", self.store.url(shelf),
        )
        self._drop_old_kept(sparing)

    def _drop_old_kept(self, sparing: str | None) -> None:
        """Keep the newest `keep_previous` shelves of this stage (and the one of key `sparing`,
        being taken back); remove the others, saying so."""
        spared = None if sparing is None else posixpath.basename(self._kept(sparing))
        shelves = []
        for name in self.store.list_names(self.rel(KEPT)):
            if name == spared:
                continue
            if name.startswith(f"{self.name}-") and (index := self.store.read_json(self.rel(KEPT, name, KEPT_INDEX))):
                shelves.append((index["kept_at"], name))
        for _, name in sorted(shelves, reverse=True)[self.keep_previous :]:
            log.info("%s: removing the work kept in %s (keep_previous %d)", self.rel(self.name), name, self.keep_previous)
            self.store.remove(self.rel(KEPT, name))

    def _take_back_kept(self, current: StageRecord | None) -> bool:
        """Move back work kept under this key (whatever is here now is kept aside or removed);
        False when there is none, or none whole."""
        shelf = self._kept(self.key)
        index = self.store.read_json(posixpath.join(shelf, KEPT_INDEX))
        if index is None:
            return False
        progress_key = (self.store.read_json(posixpath.join(self.progress_path, "key.json")) or {}).get("key")
        here = current.key if current is not None else progress_key
        if here is not None and self.keep_previous:
            self._keep_aside(here, list(self.outputs), has_record=current is not None, sparing=self.key)
        else:
            self.store.remove(self.record_path)
            self.store.remove(self.progress_path)
            self._remove_outputs(list(self.outputs))
        for output in index["outputs"]:
            self.store.move(posixpath.join(shelf, output), self.rel(output))
        self.store.move(posixpath.join(shelf, PROGRESS), self.progress_path)
        if index["committed"]:
            self.store.move(posixpath.join(shelf, RECORD), self.record_path)
        self.store.remove(shelf)
        self.store.remove_empty_folder(self.rel(KEPT))
        log.info("%s: took back the %s work of key %s kept in %s", self.rel(self.name),
                 "committed" if index["committed"] else "unfinished", self.key[:12], self.store.url(shelf))
        return True

    def mark_part(self, part: str, info: dict[str, Any]) -> None:
        self.check_fence()
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
        self.check_fence()
        try:
            self.store.create_exclusive(self.record_path, encode_json(record.model_dump(mode="json")))
        except FileExistsError as error:
            raise LeaseLost(
                f"{self.store.url(self.record_path)} was committed by another writer while this one worked; left as it is"
            ) from error
        self.store.remove(self.progress_path)
        self.store.remove_empty_folder(self.rel(PROGRESS))
        return record



PROGRESS = "_progress"
CLOCK = "clock.json"
KEPT = "_kept"
KEPT_INDEX = "kept.json"
RECORD = "record.json"


def record_path(folder: str, name: str) -> str:
    """Where a stage's record lives, relative to the store root."""
    return posixpath.join(folder, f"{name}.commit.json")


def kept_path(folder: str, name: str, key: str) -> str:
    """Where a stage's work of an earlier key is kept aside (`keep_previous`)."""
    return posixpath.join(folder, KEPT, f"{name}-{key[:16]}")


def progress_path(folder: str, name: str) -> str:
    """The folder of a running stage's part markers."""
    return posixpath.join(folder, PROGRESS, name)


def clock_path(folder: str, name: str) -> str:
    """A running stage's clock (tasks/run/stage.py `StageClock`): its attempts under this key and their time."""
    return posixpath.join(progress_path(folder, name), CLOCK)


def read_record(store: ArtifactStore, folder: str, name: str) -> StageRecord | None:
    """A stage's record whatever its key, or None if it has none."""
    raw = store.read_json(record_path(folder, name))
    return None if raw is None else StageRecord.model_validate(raw)


def parts_in_progress(store: ArtifactStore, folder: str, name: str) -> int:
    """How many parts of an uncommitted stage have finished (0 when none has started)."""
    return len(part_markers(store.list_names(progress_path(folder, name))))


def part_markers(names: list[str]) -> list[str]:
    """The finished parts' marker files among a progress folder's names (not its key, nor a write in flight)."""
    return [name for name in names if name.endswith(".json") and name not in ("key.json", CLOCK) and ".tmp-" not in name]


def _objects_of(store: ArtifactStore, folder: str, output: str) -> dict[str, int]:
    """An output's objects by path relative to the stage's folder."""
    return {posixpath.relpath(name, folder): size for name, size in store.list_objects(posixpath.join(folder, output)).items()}


def describe_objects(store: ArtifactStore, folder: str, output: str) -> OutputObjects:
    found = _objects_of(store, folder, output)
    if len(found) > LISTED_NAMES_AT_MOST:
        return OutputObjects(count=len(found), bytes=sum(found.values()))
    return OutputObjects(count=len(found), bytes=sum(found.values()), names=sorted(found), sizes=dict(sorted(found.items())))



def output_problems(store: ArtifactStore, folder: str, record: StageRecord, strict: bool = False) -> list[str]:
    """What no longer matches the record among a stage's outputs: missing objects (named where
    the record lists them or a Zarr group's metadata promises them) and changed sizes.

    Only what the record accounts for is compared, so a file someone added beside an output
    neither hides a change nor counts as one; `strict` (verify) also reports objects added since
    the commit and any change of the byte total. Cheap: one listing per output, and for a Zarr
    output its group's metadata."""
    problems = []
    for output in record.outputs:
        found = _objects_of(store, folder, output)
        if not found:
            problems.append(f"{output}: missing")
            continue
        recorded = record.objects.get(output)
        if recorded is None:  # a record from before objects were recorded: presence is all it tells
            continue
        problems += _accounted_problems(store, folder, output, recorded, found)
        if strict:
            problems += _added_problems(output, recorded, found)
    return problems


def _known_objects(store: ArtifactStore, folder: str, output: str, recorded: OutputObjects, found: dict[str, int]) -> set[str]:
    """The objects the record accounts for by name: those it lists, and those a Zarr group's metadata promises."""
    known = set(recorded.names or [])
    if posixpath.join(output, "zarr.json") in found:
        known |= {posixpath.join(output, name) for name in expected_zarr_objects(store, posixpath.join(folder, output))}
    return known


def _accounted_problems(store: ArtifactStore, folder: str, output: str, recorded: OutputObjects, found: dict[str, int]) -> list[str]:
    known = _known_objects(store, folder, output, recorded, found)
    missing = sorted(known - set(found))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        return [f"{output}: {len(missing)} object(s) missing: {', '.join(missing[:5])}{more}"]
    if recorded.sizes is not None:
        changed = sorted(name for name, size in recorded.sizes.items() if found[name] != size)
        return [f"{output}: {name} holds {found[name]} bytes, the record says {recorded.sizes[name]}" for name in changed[:5]]
    if len(known) == recorded.count:  # every object accounted for by name: compare their total alone
        held = sum(found[name] for name in known)
        return [] if held == recorded.bytes else [f"{output}: holds {held} bytes, the record says {recorded.bytes}"]
    if len(found) < recorded.count:
        return [f"{output}: {recorded.count - len(found)} of {recorded.count} objects missing"]
    if len(found) == recorded.count and sum(found.values()) != recorded.bytes:
        return [f"{output}: holds {sum(found.values())} bytes, the record says {recorded.bytes}"]
    return []


def _added_problems(output: str, recorded: OutputObjects, found: dict[str, int]) -> list[str]:
    if recorded.names is not None:
        added = sorted(set(found) - set(recorded.names))
        if added:
            more = f" and {len(added) - 5} more" if len(added) > 5 else ""
            return [f"{output}: {len(added)} object(s) added since the commit: {', '.join(added[:5])}{more}"]
    elif len(found) > recorded.count:
        return [f"{output}: {len(found) - recorded.count} object(s) added since the commit"]
    return []


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
