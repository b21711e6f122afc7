"""The trained model and its units leave the pipeline: `export`, `units`, and the fairseq files.

One run of real 8 kHz speech (FSDD), tiny model trained a few steps, ending with an iteration
without training (features of layer 3 of iteration 1's model, k-means, labels): the bundle of
iteration 1 then carries that quantizer, and `units` with it on the training corpus must give
exactly iteration 2's labels. The other presets' train outputs are made cheaply (random-init
weights with 2 layers written as final.pt under a committed train record) and exported the same way.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from flows.cli import main
from infra.commit import Stage
from infra.digest import digest_bytes
from infra.store import ArtifactStore, utc_now
from model.hubert import build_pretrain_model
from model.layer_features import extract_layer_features
from model.presets import HUBERT_CONFIGS, frame_geometry
from tasks.audit.inspection import inspect_run
from tasks.corpus.audio import load_audio_16k
from tasks.products.bundle import BUNDLE, load_bundle
from tasks.products.export import export_model
from tasks.products.fairseq import fairseq_root
from tasks.products.units import units
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.run_info import write_run_info
from tasks.stages.catalog import run_plan
from tests.support import run_cli

transformers = pytest.importorskip("transformers")

LAYER = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, fsdd_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("fsdd") / "wav"
    folder.mkdir()
    for path in sorted(fsdd_dir.glob("*.wav"))[::10][:30]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus: Path, client) -> tuple[PretrainConfig, ArtifactStore]:
    """Iteration 1: MFCC, k=8, tiny trained 3 steps; iteration 2: layer 3 of that model, k=8, labels, no train."""
    config = PretrainConfig.model_validate(
        {
            "run": "t",
            "store": str(tmp_path_factory.mktemp("runs")),
            "corpus": {"source": str(corpus)},
            "iterations": [
                {
                    "features": {"kind": "mfcc"},
                    "kmeans": {"k": 8},
                    "train": {"model": "tiny", "steps": 3, "max_batch_seconds": 4, "max_sample_seconds": 2, "logging": {"log_every": 1}},
                },
                {"features": {"kind": "hubert", "layer": LAYER}, "kmeans": {"k": 8}},
            ],
        }
    )
    store = ArtifactStore(config.store)
    write_run_info(store, config)
    records = run_plan(config, store, client, "labels@2")
    assert ("train", 2) not in records
    return config, store


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, run) -> tuple[Path, str]:
    """`hubert-pipeline export` of iteration 1 (a folder and the command's output)."""
    config, _ = run
    tmp_path = tmp_path_factory.mktemp("export")
    out = tmp_path / "bundle"
    result = run_cli(tmp_path, "export", str(Path(config.store) / "t"), "--iteration", "1", "--out", str(out))
    return out, result.stdout


def _hf_layers(folder: Path, waveform: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, ...]:
    model = transformers.HubertModel.from_pretrained(folder).eval()
    prepared = torch.nn.functional.layer_norm(waveform, waveform.shape) if normalize else waveform
    with torch.no_grad():
        return model(prepared[None], output_hidden_states=True).hidden_states


def _check_bundle_matches_encoder(folder: Path, encoder: torch.nn.Module, config, waveform: torch.Tensor) -> None:
    """HF hidden_states at the documented index and the strict torchaudio load, every layer."""
    manifest = json.loads((folder / BUNDLE.manifest).read_text())
    hidden = _hf_layers(folder, waveform, manifest["normalize_waveform"])
    rebuilt = torchaudio.models.wav2vec2_model(**manifest["torchaudio_encoder"]["kwargs"])
    rebuilt.load_state_dict(torch.load(folder / BUNDLE.torchaudio_encoder, weights_only=True), strict=True)
    for layer in range(1, config.encoder_num_layers + 1):
        expected = extract_layer_features(encoder, waveform, layer, config)
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(hidden[layer][0], expected, rtol=0, atol=1e-4 * scale, msg=f"HF layer {layer}")
        torch.testing.assert_close(
            extract_layer_features(rebuilt, waveform, layer, config), expected, rtol=0, atol=1e-5 * scale, msg=f"torchaudio layer {layer}"
        )


@pytest.mark.slow
def test_export_of_a_trained_tiny_model_loads_in_transformers_with_its_quantizer(run, bundle, corpus: Path) -> None:
    _, store = run
    layout = RunLayout("t")
    out, stdout = bundle
    assert "quantizer: layer 3, k=8" in stdout
    assert {path.name for path in out.iterdir()} >= {"config.json", "model.safetensors", BUNDLE.torchaudio_encoder, BUNDLE.manifest}
    manifest = json.loads((out / BUNDLE.manifest).read_text())
    train = store.read_json("t/iter-1/train.commit.json")
    assert manifest["weights_digest"] == train["output_digest"] == digest_bytes(store.read_bytes(layout.final_model(1)))
    assert manifest["train_record_key"] == train["key"] and manifest["weights"] == "final"
    assert manifest["torchaudio_encoder"]["digest"] == digest_bytes((out / BUNDLE.torchaudio_encoder).read_bytes())

    quantizer = json.loads((out / BUNDLE.quantizer).read_text())
    kmeans = store.read_json("t/iter-2/kmeans.commit.json")
    assert quantizer["layer"] == LAYER and quantizer["k"] == 8 and quantizer["label_rate"] == 50.0
    assert quantizer["centroids_digest"] == kmeans["output_digest"] and quantizer["model_digest"] == manifest["weights_digest"]
    assert quantizer["frame_geometry"] == {"hop_samples": 320, "window_samples": 400, "sample_rate": 16000}
    assert quantizer["layer_convention"]["hf_hidden_states_index"] == LAYER
    assert quantizer["normalize_waveform"] is False
    assert np.array_equal(np.load(out / BUNDLE.centroids), np.load(io.BytesIO(store.read_bytes(layout.centroids(2)))))

    saved = torch.load(io.BytesIO(store.read_bytes(layout.final_model(1))), weights_only=False)
    pretrain = build_pretrain_model(HUBERT_CONFIGS["tiny"], saved["num_classes"])
    pretrain.load_state_dict(saved["model"])
    waveform = load_audio_16k(str(sorted(corpus.glob("*.wav"))[0]))
    _check_bundle_matches_encoder(out, pretrain.wav2vec2.eval(), HUBERT_CONFIGS["tiny"], waveform)


@pytest.mark.slow
def test_an_iteration_without_train_is_shown_as_not_configured(run) -> None:
    config, _ = run
    status = inspect_run(str(Path(config.store) / "t"))
    assert status.iterations[0]["train"].status == "done"
    assert [status.iterations[1][stage].status for stage in ("labels", "train")] == ["done", "not configured"]


def test_fairseq_root_is_the_deepest_common_folder_or_slash() -> None:
    assert fairseq_root(["/data/a/x.wav", "/data/a/b/y.wav"]) == ("/data/a", ["x.wav", "b/y.wav"])
    assert fairseq_root(["/mnt/one/x.wav", "/srv/two/y.wav"]) == ("/", ["/mnt/one/x.wav", "/srv/two/y.wav"])
    assert fairseq_root(["s3://bucket/c/x.wav", "s3://bucket/c/d/y.wav"]) == ("s3://bucket/c", ["x.wav", "d/y.wav"])


@pytest.mark.slow
def test_export_refuses_an_iteration_that_did_not_train_and_a_missing_best(tmp_path: Path, run, capsys) -> None:
    config, _ = run
    run_path = str(Path(config.store) / "t")
    assert main(["export", run_path, "--iteration", "2", "--out", str(tmp_path / "b2")]) == 2
    untrained = capsys.readouterr().err
    assert "iteration 2" in untrained and "no committed train" in untrained
    assert main(["export", run_path, "--iteration", "1", "--weights", "best", "--out", str(tmp_path / "b")]) == 2
    best = capsys.readouterr().err
    assert "--weights best" in best and "does not exist" in best
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("preset", ["base", "large", "xlarge"])
def test_export_of_each_preset_matches_the_pipeline_layers(tmp_path: Path, preset: str, fsdd_dir: Path) -> None:
    """A committed train output of the preset (random init, 2 layers, noise on every weight) exported and loaded."""
    config = HUBERT_CONFIGS[preset].model_copy(update={"encoder_num_layers": 2})
    torch.manual_seed(0)
    pretrain = build_pretrain_model(config, num_classes=8).eval()
    with torch.no_grad():
        for parameter in pretrain.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save({"model": pretrain.state_dict(), "architecture": preset, "config": config.model_dump(), "num_classes": 8}, buffer)
    store, layout = ArtifactStore(str(tmp_path / "runs")), RunLayout("p")
    stage = Stage(store, layout.scope(1), "train", version=1, config={"model": preset}, inputs={})
    stage.prepare(["model"])
    store.write_bytes(layout.final_model(1), buffer.getvalue())
    stage.commit(outputs=["model"], output_digest=digest_bytes(buffer.getvalue()), started_at=utc_now(),
                 metrics={"architecture": config.model_dump(mode="json")})

    summary = export_model(store, layout, 1, tmp_path / "bundle")
    assert not summary.has_quantizer and summary.manifest.normalize_waveform is config.normalize_waveform
    waveform = load_audio_16k(str(sorted(fsdd_dir.glob("*.wav"))[3]))
    _check_bundle_matches_encoder(tmp_path / "bundle", pretrain.wav2vec2, config, waveform)


@pytest.mark.slow
def test_units_of_the_training_corpus_are_the_next_iterations_labels(tmp_path: Path, run, bundle, corpus: Path, caplog) -> None:
    _, store = run
    folder, _ = bundle
    out = tmp_path / "units"
    run_cli(tmp_path, "units", str(folder), str(corpus), "--out", str(out))
    labels = store.open_zarr("t/iter-2/labels.zarr", "r")
    ours = ArtifactStore(str(out)).open_zarr("units.zarr", "r")
    assert list(ours["utt_ids"][:]) == list(labels["utt_ids"][:])
    np.testing.assert_array_equal(ours["offsets"][:], labels["offsets"][:])
    np.testing.assert_array_equal(ours["units"][:], labels["labels"][:])

    # 8 kHz files, resampled on read: 50 Hz frames of the 16 kHz length.
    geometry = frame_geometry(HUBERT_CONFIGS["tiny"])
    lines = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    for line, path in zip(lines, sorted(corpus.glob("*.wav"))):
        assert line["id"] == path.stem
        assert len(line["units"]) == geometry.num_frames(load_audio_16k(str(path)).shape[0])
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["utterances"] == len(lines) == 30 and report["rejected"] == []

    caplog.set_level(logging.INFO, logger="tasks.products.units")
    units(load_bundle(str(folder)), str(corpus), str(out), dedup=True)  # committed: no cluster, only units.jsonl
    assert "committed earlier" in caplog.text
    for plain, collapsed in zip(lines, [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]):
        assert sum(collapsed["durations"]) == len(plain["units"])
        assert np.repeat(collapsed["units"], collapsed["durations"]).tolist() == plain["units"]
        assert all(a != b for a, b in zip(collapsed["units"], collapsed["units"][1:]))


@pytest.mark.slow
def test_units_reads_the_training_corpus_as_webdataset_shards_and_gives_the_same_units(tmp_path: Path, run, bundle, corpus: Path) -> None:
    import webdataset

    _, store = run
    (tmp_path / "wds").mkdir()
    clips = sorted(corpus.glob("*.wav"))
    for shard in range(3):
        with webdataset.TarWriter(str(tmp_path / "wds" / f"shard-{shard:06d}.tar")) as sink:
            for clip in clips[shard * 10 : (shard + 1) * 10]:
                sink.write({"__key__": clip.stem, "wav": clip.read_bytes()})
    counts = units(load_bundle(str(bundle[0])), str(tmp_path / "wds"), str(tmp_path / "units"))
    labels = store.open_zarr("t/iter-2/labels.zarr", "r")
    ours = ArtifactStore(str(tmp_path / "units")).open_zarr("units.zarr", "r")
    assert counts["utterances"] == len(clips) and list(ours["utt_ids"][:]) == list(labels["utt_ids"][:])
    np.testing.assert_array_equal(ours["units"][:], labels["labels"][:])


@pytest.mark.slow
def test_units_refuses_a_bundle_whose_parts_do_not_belong_together(tmp_path: Path, bundle, corpus: Path, capsys) -> None:
    bundle = Path(shutil.copytree(bundle[0], tmp_path / "bundle"))
    quantizer = json.loads((bundle / BUNDLE.quantizer).read_text())
    (bundle / BUNDLE.quantizer).write_text(json.dumps({**quantizer, "model_digest": "0" * 64}))
    assert main(["units", str(bundle), str(corpus), "--out", str(tmp_path / "u1")]) == 2
    assert "fitted on weights 000000000000" in capsys.readouterr().err
    (bundle / BUNDLE.quantizer).write_text(json.dumps(quantizer))
    state = torch.load(bundle / BUNDLE.torchaudio_encoder, weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, bundle / BUNDLE.torchaudio_encoder)
    assert main(["units", str(bundle), str(corpus), "--out", str(tmp_path / "u2")]) == 2
    assert "is not the encoder" in capsys.readouterr().err
    assert not (tmp_path / "u1").exists() and not (tmp_path / "u2").exists()
