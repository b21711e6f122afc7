"""`hubert-pipeline units` throughput: the Dask command on 2 workers against a plain transformers loop.

    .venv/bin/python bench/units.py [--minutes 3] [--model tiny] [--layer 6] [--k 100] [--out bench-out]

Builds a bundle the way a user gets one: a run whose iteration 1 model (random-init weights of
`--model`, committed under a train record: throughput does not depend on training) has its layer
`--layer` clustered by iteration 2 (features and k-means, on a 15-second corpus), exported with
`export_model`. Then, on the same `--minutes` of synthesized speech, in one run:

  (a) the reference a user would write: the exported Hugging Face HubertModel's forward
      (output_hidden_states) and the nearest centroid, one utterance at a time, in this process
      with torch's default threads;
  (b) `units` (tasks/products/units.py, what the command runs) on a LocalCluster of 2 workers, started
      beforehand as `--dask ADDRESS` would find it: its compute phase (every chunk's encoder load,
      audio, features, units and Zarr write; what report.json records), and the whole call
      (bundle checks, listing, probing on Dask, units.jsonl included).

Prints audio-seconds per second of each, the ratios, and the share of frames where (a) and (b) agree;
also (a) with one torch thread: on a machine whose cores are shared, torch's intra-op threads can
lose most of their speed waiting for each other, and the ratio to (a) alone would flatter (b).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from devtools.demo_corpus import cached_demo_corpus
from infra.cluster import dask_client
from infra.commit import Stage
from infra.digest import digest_bytes
from infra.store import ArtifactStore, utc_now
from model.frames import SAMPLE_RATE
from model.hubert import build_pretrain_model, prepare_waveform
from model.kmeans import nearest_centroids
from model.presets import HUBERT_CONFIGS, HubertConfig
from model.weights import save_weights
from tasks.corpus.audio import load_audio_16k
from tasks.products.bundle import BUNDLE, load_bundle
from tasks.products.export import export_model
from tasks.products.units import units
from tasks.run.config import PretrainConfig
from tasks.run.layout import RunLayout
from tasks.run.stage import StageContext, run_stage
from tasks.stages.catalog import STAGES


def make_bundle(work: Path, fit_corpus: Path, model: str, layer: int, k: int, client) -> Path:
    """A run with a committed random-init model and iteration 2's k-means on its layer, exported."""
    config = PretrainConfig.model_validate(
        {
            "run": "bench",
            "store": str(work / "runs"),
            "corpus": {"source": str(fit_corpus)},
            "iterations": [
                {"features": {"kind": "mfcc"}, "kmeans": {"k": 8}, "train": {"model": model}},
                {"features": {"kind": "hubert", "layer": layer}, "kmeans": {"k": k}},
            ],
        }
    )
    store, layout = ArtifactStore(config.store), RunLayout(config.run)
    architecture = HUBERT_CONFIGS[model]
    torch.manual_seed(0)
    pretrain = build_pretrain_model(architecture, num_classes=8)
    weights = save_weights(pretrain, architecture, model, num_classes=8)
    train = Stage(store, layout.scope(1), "train", version=1, config={"model": model, "random_init": True}, inputs={})
    train.prepare(["model"])
    store.write_bytes(layout.final_model(1), weights)
    train.commit(outputs=["model"], output_digest=digest_bytes(weights), started_at=utc_now(),
                 metrics={"architecture": architecture.model_dump(mode="json")})
    run_stage(STAGES["intake"], StageContext(config, store, client))
    for stage in ("features", "kmeans"):
        run_stage(STAGES[stage], StageContext(config, store, client, 2))
    summary = export_model(store, layout, 1, work / "bundle")
    assert summary.has_quantizer
    return summary.folder


def reference_loop(bundle: Path, wavs: list[Path], threads: int) -> tuple[float, list[np.ndarray]]:
    """HF forward + nearest centroid per utterance with `threads` torch threads; audio-seconds per second and the units."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _reference_loop(bundle, wavs)
    finally:
        torch.set_num_threads(default)


def _reference_loop(bundle: Path, wavs: list[Path]) -> tuple[float, list[np.ndarray]]:
    manifest = json.loads((bundle / BUNDLE.manifest).read_text())
    quantizer = json.loads((bundle / BUNDLE.quantizer).read_text())
    centroids = np.load(bundle / BUNDLE.centroids)
    index = quantizer["layer_convention"]["hf_hidden_states_index"]
    architecture = HubertConfig.model_validate(manifest["architecture"])
    model = transformers.HubertModel.from_pretrained(bundle).eval()
    found, audio_seconds = [], 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for path in wavs:
            waveform = load_audio_16k(str(path))
            audio_seconds += waveform.shape[0] / SAMPLE_RATE
            hidden = model(prepare_waveform(architecture, waveform)[None], output_hidden_states=True).hidden_states[index][0]
            found.append(nearest_centroids(hidden.numpy(), centroids)[0].numpy())
    return audio_seconds / (time.perf_counter() - start), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="audio to turn into units (default 3)")
    parser.add_argument("--model", default="tiny", choices=sorted(HUBERT_CONFIGS), help="architecture (default tiny; base is slower, same shape of result)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="cached corpora live here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fit_corpus = cached_demo_corpus(args.out, 0.25, seed=1)
    corpus = cached_demo_corpus(args.out, args.minutes)
    wavs = sorted(corpus.glob("*.wav"))
    work = Path(tempfile.mkdtemp(prefix="bench-units-"))
    try:
        with dask_client(n_workers=2) as client:
            started = time.perf_counter()
            bundle = make_bundle(work, fit_corpus, args.model, args.layer, args.k, client)
            print(f"bundle: {args.model}, layer {args.layer}, k={args.k} ({time.perf_counter() - started:.0f} s to make)")
            default_threads = torch.get_num_threads()
            loop_rate, loop_units = reference_loop(bundle, wavs, default_threads)
            one_thread_rate, _ = reference_loop(bundle, wavs, 1)
            clock = time.perf_counter()
            counts = units(load_bundle(str(bundle)), str(corpus), str(work / "units"), dask_address=client.scheduler.address)
            end_to_end = time.perf_counter() - clock
        report = json.loads((work / "units" / "report.json").read_text())
        audio_seconds = counts["audio_hours"] * 3600
        stage_rate, command_rate = report["audio_seconds_per_second"], audio_seconds / end_to_end

        group = ArtifactStore(str(work / "units")).open_zarr("units.zarr", "r")
        ours = group["units"][:]
        agree = float(np.mean(ours == np.concatenate(loop_units))) if ours.size == sum(map(len, loop_units)) else float("nan")
        print(f"audio: {audio_seconds:.0f} s in {len(wavs)} utterances")
        print(f"(a) transformers loop, one process, {default_threads} threads (torch's default): {loop_rate:8.1f} audio-s/s")
        print(f"    the same loop with 1 thread (for reference):       {one_thread_rate:8.1f} audio-s/s   "
              f"(b) against it: {stage_rate / one_thread_rate:.2f}x")
        print(f"(b) units on 2 Dask workers, compute phase:            {stage_rate:8.1f} audio-s/s   ratio b/a {stage_rate / loop_rate:.2f}x")
        print(f"    units on 2 Dask workers, whole call:               {command_rate:8.1f} audio-s/s   ratio     {command_rate / loop_rate:.2f}x")
        print(f"frames where (a) and (b) give the same unit: {agree:.4%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
