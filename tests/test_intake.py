import http.server
import json
import shutil
import threading
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


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with a WAV file and records that it came."""

    requests: list[str] = []
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        RecordingHandler.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_entries_outside_the_source_are_rejected_unread_and_no_request_leaves(tmp_path: Path, fsdd_dir: Path, client) -> None:
    """A NeMo .jsonl naming an http:// URL, an absolute path elsewhere, a path escaping with '..' and
    a name with a tab: each is in the intake report with its reason, and the HTTP server (which would
    serve real audio) sees no request. `corpus.allowed_roots` admits the folder outside."""
    files = sorted(fsdd_dir.glob("*.wav"))[:4]
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    (corpus / "wav").mkdir(parents=True)
    elsewhere.mkdir()
    for path in files[:2]:
        shutil.copy(path, corpus / "wav" / path.name)
    shutil.copy(files[2], elsewhere / files[2].name)
    shutil.copy(files[3], corpus / "wav" / "tab\there.wav")
    RecordingHandler.requests, RecordingHandler.body = [], files[0].read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data.wav"
    entries = [f"wav/{files[0].name}", url, str(elsewhere / files[2].name), f"../elsewhere/{files[2].stem}_b.wav",
               "wav/tab\there.wav", f"wav/{files[1].name}"]
    shutil.copy(files[2], elsewhere / f"{files[2].stem}_b.wav")
    (corpus / "manifest.jsonl").write_text("".join(json.dumps({"audio_filepath": entry}) + "\n" for entry in entries))
    try:
        config = load_config(write_config(tmp_path / "cfg.yaml", corpus / "manifest.jsonl", tmp_path / "runs"))
        record = run_chain(config, client, "intake").records["intake"]
        report = ArtifactStore(config.store).read_json("t/corpus/intake_report.json")
        reasons = [(Path(r["path"]).name, r["reason"]) for r in report["rejected"]]
        assert reasons == [
            ("meta-data.wav", "outside the source"), (files[2].name, "outside the source"),
            (f"{files[2].stem}_b.wav", "outside the source"), ("tab\there.wav", "bad file name"),
        ]
        assert "not fetched" in report["rejected"][0]["detail"] and str(corpus) in report["rejected"][0]["detail"]
        assert record.counts["utterances"] == 2 and record.metrics["rejected_by_reason"] == {"outside the source": 3, "bad file name": 1}

        allowing = load_config(write_config(tmp_path / "cfg.yaml", corpus / "manifest.jsonl", tmp_path / "runs"))
        allowing = allowing.model_copy(update={"corpus": allowing.corpus.model_copy(update={"allowed_roots": [str(elsewhere)]})})
        assert run_chain(allowing, client, "intake").records["intake"].counts["utterances"] == 4
        assert RecordingHandler.requests == []
    finally:
        server.shutdown()
