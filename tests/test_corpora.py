"""Corpora as teams keep them: Hugging Face datasets (Parquet shards, saved to disk), WebDataset tar
shards (local and on S3), Lhotse cuts of a long recording: each runs through labels with the labels
of the same audio given as loose wav files. The corpora are written with the real libraries."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import soundfile

from infra.store import ArtifactStore
from tasks.corpus.formats import detect_format
from tasks.run.config import PretrainConfig
from tasks.run.layout import INTAKE_REJECTIONS
from tests.support import Chain, run_chain

pytestmark = pytest.mark.slow

CLIPS = 40


def chain_config(store: Path, source: str, run: str = "t", storage_options: dict | None = None) -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "run": run,
            "store": str(store),
            "corpus": {"source": source},
            "storage_options": storage_options or {},
            "iterations": [
                {"features": {"kind": "mfcc", "chunk_frames": 1024}, "kmeans": {"k": 8, "sample_fraction": 0.5},
                 "train": {"model": "tiny"}}
            ],
        }
    )


def labels_by_id(chain: Chain) -> tuple[list[str], np.ndarray, np.ndarray]:
    group = chain.store.open_zarr(chain.layout.labels_store(1), "r")
    return [str(name) for name in group["utt_ids"][:]], group["offsets"][:], group["labels"][:]


def assert_same_labels(chain: Chain, loose: Chain) -> None:
    ids, offsets, labels = labels_by_id(chain)
    expected_ids, expected_offsets, expected_labels = labels_by_id(loose)
    assert ids == expected_ids and len(ids) == CLIPS
    np.testing.assert_array_equal(offsets, expected_offsets)
    np.testing.assert_array_equal(labels, expected_labels)


@pytest.fixture(scope="module")
def clips(fsdd_dir: Path) -> list[Path]:
    """Real 8 kHz recordings of several speakers, in sorted order (a folder lists them so)."""
    return sorted(sorted(fsdd_dir.glob("*.wav"))[::7][:CLIPS])


@pytest.fixture(scope="module")
def loose(tmp_path_factory: pytest.TempPathFactory, clips: list[Path], client) -> Chain:
    """The clips as loose wav files, through labels: the labels every other form must give."""
    folder = tmp_path_factory.mktemp("loose") / "wav"
    folder.mkdir()
    for path in clips:
        shutil.copy(path, folder / path.name)
    return run_chain(chain_config(folder.parent / "runs", str(folder)), client)


def test_a_hugging_face_parquet_corpus_gives_the_labels_of_its_loose_files(
    tmp_path: Path, clips: list[Path], loose: Chain, client
) -> None:
    import datasets
    from datasets.table import embed_table_storage

    dataset = datasets.Dataset.from_dict(
        {"audio": [str(path) for path in clips], "id": [path.stem for path in clips],
         "speaker": [path.stem.split("_")[1] for path in clips]}
    ).cast_column("audio", datasets.Audio(decode=False))
    dataset = dataset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)  # as push_to_hub embeds
    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    for index in range(3):
        dataset.shard(3, index, contiguous=True).to_parquet(str(folder / f"train-{index:05d}-of-00003.parquet"))
    assert pq.ParquetFile(folder / "train-00000-of-00003.parquet").schema_arrow.field("audio").type.num_fields == 2
    assert detect_format(str(folder.parent)) == "huggingface"
    chain = run_chain(chain_config(tmp_path / "runs", str(folder.parent)), client)
    assert_same_labels(chain, loose)
    first = chain.utterances[0]
    assert first.path.endswith("train-00000-of-00003.parquet") and first.member == "audio" and first.row == 0
    assert first.speaker == clips[0].stem.split("_")[1]
    report = chain.store.read_json(chain.layout.intake_report)
    assert report["format"] == "huggingface" and report["rejected"] == []


def test_parquet_rows_that_only_name_their_files_are_reported(tmp_path: Path, clips: list[Path], client) -> None:
    import datasets

    named = datasets.Dataset.from_dict({"audio": [str(path) for path in clips[:3]]}).cast_column("audio", datasets.Audio(decode=False))
    named.to_parquet(str(tmp_path / "named.parquet"))  # to_parquet does not embed the files
    with pytest.raises(ValueError, match="all 3 files rejected"):
        run_chain(chain_config(tmp_path / "runs", str(tmp_path / "named.parquet")), client, "intake")
    report = ArtifactStore(str(tmp_path / "runs")).read_json("t/corpus/intake_report.json")
    assert [(r["id"], r["reason"]) for r in report["rejected"]] == [(path.stem, "no audio bytes") for path in clips[:3]]
    assert str(clips[0]) in report["rejected"][0]["detail"]


def test_a_dataset_saved_to_disk_is_read_by_byte_range(tmp_path: Path, clips: list[Path], loose: Chain, client) -> None:
    import datasets

    dataset = datasets.Dataset.from_dict({"audio": [str(path) for path in clips]}).cast_column("audio", datasets.Audio(decode=False))
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    chain = run_chain(chain_config(tmp_path / "runs", str(tmp_path / "saved")), client)
    assert_same_labels(chain, loose)  # ids: the stems of the audio's own file names
    first = chain.utterances[0]
    with open(first.path, "rb") as shard:
        shard.seek(first.byte_offset)
        assert shard.read(first.byte_length) == clips[0].read_bytes()


def write_webdataset(folder: Path, clips: list[Path], shards: int = 4) -> list[Path]:
    import webdataset

    folder.mkdir(parents=True)
    paths = []
    per_shard = -(-len(clips) // shards)
    for index in range(shards):
        path = folder / f"shard-{index:06d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for clip in clips[index * per_shard : (index + 1) * per_shard]:
                sink.write({"__key__": clip.stem, "wav": clip.read_bytes(), "json": {"speaker": clip.stem.split("_")[1]}})
        paths.append(path)
    return paths


def test_webdataset_shards_give_the_same_labels_locally_and_on_s3(tmp_path: Path, clips: list[Path], loose: Chain, client, s3) -> None:
    shards = write_webdataset(tmp_path / "wds", clips)
    local = run_chain(chain_config(tmp_path / "runs", str(tmp_path / "wds")), client)
    assert_same_labels(local, loose)
    first = local.utterances[0]
    assert (first.id, first.member, first.speaker) == (clips[0].stem, f"{clips[0].stem}.wav", clips[0].stem.split("_")[1])
    with open(first.path, "rb") as shard:  # the member's bytes, where the manifest says
        shard.seek(first.byte_offset)
        assert shard.read(first.byte_length) == clips[0].read_bytes()

    prefix = f"corpus/wds-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    for shard in shards:
        fs.put_file(str(shard), f"{prefix}/{shard.name}")
    remote = run_chain(chain_config(tmp_path / "runs-s3", f"s3://{prefix}", storage_options=s3.storage_options()), client)
    assert_same_labels(remote, loose)
    assert remote.utterances[0].path == f"s3://{prefix}/shard-000000.tar"


def test_a_corrupt_tar_shard_is_reported_and_the_samples_before_it_kept(tmp_path: Path, clips: list[Path], client) -> None:
    shards = write_webdataset(tmp_path / "wds", clips[:8], shards=2)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2] + b"\x01" * 700)  # cut, then garbage where a header should be
    chain = run_chain(chain_config(tmp_path / "runs", str(tmp_path / "wds")), client, "intake")
    report = chain.store.read_json(chain.layout.intake_report)
    assert {rejection["reason"] for rejection in report["rejected"]} & {"corrupt shard", "truncated", "unreadable"}
    kept = [u.id for u in chain.utterances]
    assert kept[:4] == [clip.stem for clip in clips[:4]] and 4 <= len(kept) < 8


def test_a_lhotse_cut_manifest_of_a_long_recording_gives_the_labels_of_the_pieces(
    tmp_path: Path, clips: list[Path], loose: Chain, client
) -> None:
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    pieces = [soundfile.read(path, dtype="int16")[0] for path in clips]
    long = tmp_path / "book.wav"
    soundfile.write(long, np.concatenate(pieces), 8000, subtype="PCM_16")
    recording = Recording.from_file(str(long))
    cuts, start = [], 0
    for path, piece in zip(clips, pieces):
        cuts.append(
            MonoCut(
                id=path.stem, start=start / 8000, duration=len(piece) / 8000, channel=0, recording=recording,
                supervisions=[SupervisionSegment(id=path.stem, recording_id=recording.id, start=0, duration=len(piece) / 8000,
                                                 speaker=path.stem.split("_")[1])],
            )
        )
        start += len(piece)
    CutSet.from_cuts(cuts).to_file(str(tmp_path / "cuts.jsonl.gz"))
    assert detect_format(str(tmp_path / "cuts.jsonl.gz")) == "lhotse"
    chain = run_chain(chain_config(tmp_path / "runs", str(tmp_path / "cuts.jsonl.gz")), client)
    assert_same_labels(chain, loose)
    second = chain.utterances[1]
    assert (second.recording, second.start, second.samples) == (recording.id, len(pieces[0]), len(pieces[1]))
    assert second.speaker == clips[1].stem.split("_")[1]


def test_an_mp3_and_an_opus_corpus_run_through_labels_and_a_bad_one_is_reported(tmp_path: Path, clips: list[Path], client) -> None:
    for format_, subtype, suffix, cut_reason in (("MP3", "MPEG_LAYER_III", "mp3", "truncated"), ("OGG", "OPUS", "opus", "unreadable")):
        folder = tmp_path / suffix
        folder.mkdir()
        for path in clips[:20]:
            samples, rate = soundfile.read(path, dtype="float32")
            soundfile.write(folder / f"{path.stem}.{suffix}", samples, rate, format=format_, subtype=subtype)
        encoded = io.BytesIO()
        soundfile.write(encoded, soundfile.read(clips[20], dtype="float32")[0], 8000, format=format_, subtype=subtype)
        (folder / f"broken.{suffix}").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 3] + b"\x00" * 64)
        (folder / f"notes.{suffix}").write_text("not audio at all\n")
        chain = run_chain(chain_config(tmp_path / f"runs-{suffix}", str(folder)), client)
        assert [u.id for u in chain.utterances] == sorted(path.stem for path in clips[:20])
        rejected = {r["id"]: r["reason"] for r in chain.store.read_json(chain.layout.intake_report)["rejected"]}
        assert rejected == {"notes": "unreadable", "broken": cut_reason}  # a cut-off stream: its header promises more
        every = pq.read_table(chain.store.path(chain.layout.path(None, INTAKE_REJECTIONS))).to_pylist()
        assert {row["id"]: row["reason"] for row in every} == rejected and every[0]["path"].endswith(f".{suffix}")
        assert chain.records["labels"].counts["frames"] > 0 and chain.records["labels"].metrics["used_clusters"] > 1


def test_a_store_made_before_the_columnar_manifest_keeps_working(tmp_path: Path, loose: Chain, client) -> None:
    """Its intake stays committed with its `manifest.jsonl`, which every stage after reads (the
    driver columnar, the tasks their rows); what they compute from it is what they computed before."""
    import json

    from infra.digest import digest_bytes
    from tasks.audit.verification import verify_run

    shutil.copytree(loose.config.store, tmp_path / "runs")
    config = PretrainConfig.model_validate({**loose.config.model_dump(), "store": str(tmp_path / "runs")})
    store = ArtifactStore(config.store)
    chain = Chain(config, store, {})
    legacy = "".join(
        json.dumps({key: value for key, value in u.model_dump().items()
                    if key in ("id", "path", "samples", "sample_rate", "channels", "speaker")}, separators=(",", ":")) + "\n"
        for u in loose.utterances
    ).encode()
    store.write_bytes(chain.layout.legacy_manifest, legacy)
    store.remove(chain.layout.manifest)
    record_path = f"{chain.layout.stage_folder('intake', None)}/intake.commit.json"
    record = store.read_json(record_path)
    for field in ("outputs", "objects", "sizes"):
        renamed = json.dumps(record[field]).replace("manifest.parquet", "manifest.jsonl")
        record[field] = json.loads(renamed)
    record["objects"]["manifest.jsonl"] = {"count": 1, "bytes": len(legacy), "names": ["manifest.jsonl"]}
    record["output_digest"] = digest_bytes(legacy)
    store.write_json(record_path, record)

    again = run_chain(chain.config, client)
    assert again.records["intake"].key == loose.records["intake"].key  # not taken in again
    assert not store.exists(chain.layout.manifest)
    assert again.records["features"].inputs["manifest"] == digest_bytes(legacy)
    assert again.records["features"].output_digest == loose.records["features"].output_digest
    assert again.records["labels"].output_digest == loose.records["labels"].output_digest
    assert [u.id for u in again.utterances] == [u.id for u in loose.utterances]
    checks = verify_run(str(tmp_path / "runs" / "t"), deep=True)
    assert [check.stage for check in checks][:1] == ["intake"] and all(check.ok and check.digest_checked for check in checks)
