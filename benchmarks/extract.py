"""Extraction throughput: the Ray Data pipeline against a bare loop over the same encoders.

    python benchmarks/extract.py [--documents 120] [--audio-encoder logmel] [--text-encoder hashngram]
                                 [--tiny-hf]    # also a randomly initialised wav2vec2-style model

Prints one table: the bare loop (the same per-document functions the Ray actors call, one
process, all cores to torch), the pipeline on a fresh cache (with and without Ray's start-up),
the fully cached re-run, and the ratios the targets in docs/benchmarks.md refer to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


BARE_LOOP = """
import time
started = time.perf_counter()
import os, sys
import torch
from hilbert.data.manifest import load_manifest
from hilbert.features.encoders import build_audio_encoder, build_text_encoder
from hilbert.features.extract import encode_document_audio, encode_document_text
torch.set_num_threads(os.cpu_count() or 1)
audio = build_audio_encoder(sys.argv[2], device="cpu")
text = build_text_encoder(sys.argv[3], device="cpu")
for doc in load_manifest(sys.argv[1]):
    encode_document_audio(audio, doc.audio_path, [(s.start, s.end) for s in doc.segments], doc.doc_id)
    encode_document_text(text, [s.text for s in doc.segments], doc.doc_id)
print(time.perf_counter() - started)
"""


def bare_loop(manifest_path: Path, audio_spec: str, text_spec: str) -> float:
    """Seconds to encode every document in a fresh process: no Ray, no cache.

    Timed from the imports on, like a user's own script, because each Ray actor also pays for
    importing torch and loading the encoders; the same per-document functions as the actors.
    """
    import subprocess
    import sys

    output = subprocess.run([sys.executable, "-c", BARE_LOOP, str(manifest_path), audio_spec, text_spec],
                            check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def tiny_hf_model(folder: Path) -> str:
    """A randomly initialised wav2vec2-style model (no download), saved to ``folder``."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            conv_dim=(256,) * 7, num_feat_extract_layers=7, feat_extract_norm="layer",
                            do_stable_layer_norm=True)
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(folder)
    return f"hf:{folder}"


def measure(manifest_path: Path, audio_spec: str, text_spec: str, workdir: Path, actor_options: dict) -> dict[str, float]:
    import ray

    from hilbert.data.manifest import load_manifest
    from hilbert.features.extract import extract_features
    from hilbert.ray_runtime import connect

    manifest = load_manifest(manifest_path)
    bare = bare_loop(manifest_path, audio_spec, text_spec)

    cold_cache = workdir / "cache-cold"
    started = time.perf_counter()
    report = extract_features(manifest, audio_spec, text_spec, cold_cache, progress=False, log=lambda _: None,
                              **actor_options)
    with_startup = time.perf_counter() - started  # includes starting the local Ray
    shutil.rmtree(cold_cache)
    connect()  # Ray is up now: time the pipeline alone
    report = extract_features(manifest, audio_spec, text_spec, cold_cache, progress=False, log=lambda _: None,
                              **actor_options)
    pipeline = report.total_seconds
    ray.shutdown()
    started = time.perf_counter()
    cached = extract_features(manifest, audio_spec, text_spec, cold_cache, progress=False)
    rerun = time.perf_counter() - started
    assert cached.cache_hit
    return {"segments": report.segments, "audio_s": report.audio_seconds, "bare": bare,
            "pipeline": pipeline, "with_startup": with_startup, "rerun": rerun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=120)
    parser.add_argument("--audio-encoder", default="logmel")
    parser.add_argument("--text-encoder", default="hashngram")
    parser.add_argument("--tiny-hf", action="store_true", help="also measure a tiny random wav2vec2 model")
    parser.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    args = parser.parse_args()

    from hilbert.data.demo import write_demo_corpus

    workdir = Path(tempfile.mkdtemp(prefix="hilbert-bench-"))
    try:
        manifest_path = write_demo_corpus(workdir / "corpus", n_documents=args.documents, seed=0)
        pairs = [(args.audio_encoder, args.text_encoder)]
        if args.tiny_hf:
            pairs.append((tiny_hf_model(workdir / "tiny-w2v"), args.text_encoder))
        rows = []
        for audio_spec, text_spec in pairs:
            figures = measure(manifest_path, audio_spec, text_spec, workdir / f"run{len(rows)}",
                              {"num_actors": args.actors, "cpus_per_actor": args.cpus_per_actor})
            rows.append((audio_spec.replace(str(workdir), "<tmp>"), text_spec, figures))
        print_table(rows, os.cpu_count() or 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(rows, cores: int) -> None:
    header = (f"{'audio encoder':<22} {'text':<10} {'segs':>5} {'audio s':>8} {'bare s':>7} {'ray s':>7} "
              f"{'overhead':>8} {'+start s':>8} {'rerun s':>8} {'rerun x':>8} {'segs/s':>7}")
    print(f"extraction benchmark on {cores} CPU cores")
    print(header)
    print("-" * len(header))
    for audio_spec, text_spec, f in rows:
        overhead = f["pipeline"] / f["bare"] - 1.0
        print(f"{audio_spec:<22} {text_spec:<10} {f['segments']:>5} {f['audio_s']:>8.0f} {f['bare']:>7.2f} "
              f"{f['pipeline']:>7.2f} {overhead:>+8.1%} {f['with_startup']:>8.2f} {f['rerun']:>8.3f} "
              f"{f['with_startup'] / f['rerun']:>7.0f}x {f['segments'] / f['pipeline']:>7.1f}")
    print("overhead: Ray pipeline (Ray already running) vs the bare loop; +start: pipeline including "
          "Ray start-up; rerun x: first run (with start-up) / fully cached re-run")


if __name__ == "__main__":
    main()
