"""WebDataset shards: `.tar` files whose members group into samples by key (the member's path up to
the first dot of its name: `0001.flac` and `0001.json` are sample `0001`), local or on S3.

A sample's audio is its member with an audio extension (flac, wav, mp3, ogg, opus); its key is the
utterance id; a `json` member may give a `speaker`. One probe task streams one shard (one
sequential read, never unpacked to disk) and records where each audio member's bytes lie in the
tar; stages read that byte range alone.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any

import fsspec

from infra.paths import find_files
from tasks.corpus.formats import IdRule, Listing
from tasks.corpus.manifest import AUDIO_SUFFIXES, ManifestError, Utterance
from tasks.corpus.probe import Probed, ProbeSettings, Rejection, Shard, probe_bytes

READ_BLOCK = 8 * 2**20


def sample_key(member: str) -> tuple[str, str]:
    """WebDataset's split of a member name into the sample key and the extension."""
    folder, name = posixpath.split(member)
    stem, _, extension = name.partition(".")
    return posixpath.join(folder, stem), extension.lower()


class TarShard(Shard):
    """A probe task: one WebDataset shard, streamed."""

    def probe(self, settings: ProbeSettings, storage_options: dict[str, Any]) -> Probed:
        fs, stripped = fsspec.core.url_to_fs(self.path, **storage_options)
        found = Probed()
        current: dict[str, Any] = {}

        def finish() -> None:
            """Probe the sample just read (its members are consecutive in the tar)."""
            if not current:
                return
            key = current["key"]
            if "audio" not in current:
                found.rejections.append(
                    Rejection(id=key, path=self.path, origin=self.path, reason="no audio", detail="the sample has no audio member")
                )
                return
            name, offset, size, data = current["audio"]
            speaker = None
            if "json" in current:
                try:
                    speaker = json.loads(current["json"]).get("speaker")
                except (ValueError, AttributeError):
                    speaker = None
            base = Utterance(
                id=key, path=self.path, samples=0, sample_rate=1, channels=0, member=name, byte_offset=offset,
                byte_length=size, speaker=None if speaker is None else str(speaker),
            )
            found.add(probe_bytes(base, data, f"{self.path}[{name}]", settings))

        with fs.open(stripped, "rb", block_size=READ_BLOCK) as handle:
            try:
                with tarfile.open(fileobj=handle, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, extension = sample_key(member.name)
                        if current.get("key") != key:
                            finish()
                            current.clear()
                            current["key"] = key
                        if "." + extension in AUDIO_SUFFIXES and "audio" not in current:
                            current["audio"] = (member.name, member.offset_data, member.size, tar.extractfile(member).read())
                        elif extension == "json":
                            current["json"] = tar.extractfile(member).read()
                finish()
            except tarfile.TarError as error:  # the samples read before the damage are kept
                found.rejections.append(
                    Rejection(id=posixpath.basename(self.path), path=self.path, origin=self.path, reason="corrupt shard",
                              detail=f"the tar cannot be read past {current.get('key', 'its start')} ({error})")
                )
        return found


def listing(source: str, ids: IdRule, storage_options: dict[str, Any]) -> Listing:
    if source.lower().endswith(".tar"):
        paths = [source]
    else:
        try:
            paths = find_files(source, (".tar",), storage_options).to_pylist()
        except FileNotFoundError as error:
            raise ManifestError(str(error)) from error
    if not paths:
        raise ManifestError(f"no .tar shards in corpus source {source}")
    return Listing("webdataset", [TarShard(f"probe-{index}", path) for index, path in enumerate(paths)], "the samples' keys")
