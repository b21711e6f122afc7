from pathlib import Path

import pytest

from infra.store import ArtifactStore
from tasks.corpus.manifest import ManifestError
from tasks.run.config import load_config
from tasks.run.layout import RunLayout
from tasks.run.records import load_manifest
from tests.support import run_chain, write_config


def test_bad_files_are_reported_and_good_ones_kept(tmp_path: Path, salted_corpus: Path, client) -> None:
    config = load_config(write_config(tmp_path / "cfg.yaml", salted_corpus, tmp_path / "runs"))
    store = ArtifactStore(config.store)
    record = run_chain(config, client, "intake").records["intake"]

    report = store.read_json("t/corpus/intake_report.json")
    reasons = {Path(rejection["path"]).name: rejection["reason"] for rejection in report["rejected"]}
    assert reasons == {"empty.wav": "empty", "truncated.wav": "truncated", "notes.wav": "unreadable", "blip.wav": "too short"}
    assert all(rejection["detail"] for rejection in report["rejected"])

    manifest = {utterance.id: utterance for utterance in load_manifest(store, RunLayout("t"))}
    assert len(manifest) == 28
    assert manifest["stereo"].channels == 2
    assert manifest["hifi"].sample_rate == 44_100
    assert {u.sample_rate for u in manifest.values()} == {8000, 16000, 44100}
    assert record.counts["utterances"] == 28 and record.counts["rejected"] == 4


def test_a_second_intake_is_skipped_and_a_changed_folder_is_not(tmp_path: Path, salted_corpus: Path, client) -> None:
    config = load_config(write_config(tmp_path / "cfg.yaml", salted_corpus, tmp_path / "runs"))
    first = run_chain(config, client, "intake").records["intake"]
    assert run_chain(config, client, "intake").records["intake"] == first
    (salted_corpus / "notes.wav").unlink()
    changed = run_chain(config, client, "intake").records["intake"]
    assert changed.key != first.key and changed.counts["rejected"] == 3


def test_manifest_mismatch_is_a_rejection(tmp_path: Path, fsdd_dir: Path, client) -> None:
    files = sorted(fsdd_dir.glob("*.wav"))[:2]
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{fsdd_dir}\n{files[0].name}\t12\n{files[1].name}\t99999999\n")
    config = load_config(write_config(tmp_path / "cfg.yaml", tsv, tmp_path / "runs"))
    store = ArtifactStore(config.store)
    with pytest.raises(ManifestError, match="all 2 files rejected"):
        run_chain(config, client, "intake")
    report = store.read_json("t/corpus/intake_report.json")
    assert {r["reason"] for r in report["rejected"]} == {"manifest mismatch"}
    assert not store.exists("t/corpus/intake.commit.json")
