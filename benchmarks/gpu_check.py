"""The GPU path in one short run: paper-sized encoders on CUDA against CPU, and HILBERT's training
step on CUDA. Prints a table; with ``--json PATH`` also writes the figures.

    python benchmarks/gpu_check.py                 # on a machine with a GPU (about 3 minutes)
    python benchmarks/gpu_check.py --segments 4    # the same code on CPU only (checks the script)

Needs torch, transformers, numpy and this checkout on ``PYTHONPATH``; not Ray, MLflow or
soundfile (the device machines this project borrows have no network to install them), so it
calls the encoders and the model directly, not through Ray Data or Ray Train.

The encoders are randomly initialised with the shapes of the paper's encoders (HuBERT-base,
Whisper-base, a RoBERTa-base-sized BERT; no hub is reachable, and speed and numerical agreement
do not depend on the weights' values). For each: segments/s and audio-seconds/s on CUDA (fp16
autocast, the ``hf:`` default there, and bf16) and on CPU (fp32), and the smallest per-segment
cosine between the CUDA and CPU vectors, which the cache relies on when it shares one key
across devices. The training step: documents/s of forward + backward + AdamW of the HILBERT
model and its loss on a batch of paper-width features.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hilbert.features.encoders import build_audio_encoder, build_text_encoder  # noqa: E402
from hilbert.losses import HilbertLoss, LossConfig  # noqa: E402
from hilbert.model import HilbertModel, HilbertModelConfig  # noqa: E402

SAMPLE_RATE = 16000
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "b", "c", "d", "e", "s", "t"]


def hubert_base(folder: Path) -> Path:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    HubertModel(HubertConfig()).save_pretrained(folder)  # the defaults are HuBERT-base: 12 x 768
    Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, do_normalize=True).save_pretrained(folder)
    return folder


def whisper_base(folder: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(d_model=512, encoder_layers=6, decoder_layers=1, encoder_attention_heads=8,
                           decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                           vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def bert_base(folder: Path) -> Path:
    """RoBERTa-base's size (12 x 768) with a word-level vocabulary of a few entries: the embedding
    table's size does not change the time of a forward pass."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = folder / "vocab.txt"
    vocabulary.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5)).save_pretrained(folder)
    BertTokenizer(vocab=str(vocabulary)).save_pretrained(folder)
    return folder


def segments(count: int, seconds: float, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Speech-like waveforms (a gliding tone in noise) of ``seconds`` each, and sentences of about
    2.5 words a second, as in conversation."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    waves = [(0.3 * np.sin(2 * np.pi * (120 + 40 * i % 200) * t * (1 + 0.1 * t)) + 0.05 * rng.normal(size=t.size))
             .astype(np.float32) for i in range(count)]
    texts = [" ".join(rng.choice(WORDS, size=max(1, int(2.5 * seconds)))) for _ in range(count)]
    return waves, texts


def timed_encode(encoder, inputs, repeats: int = 2):
    """Vectors and the best of ``repeats`` timed passes after one warm-up pass."""
    vectors = encoder.encode(inputs)
    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        encoder.encode(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return np.asarray(vectors, dtype=np.float32), best


def smallest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(axis=1).min())


def encoder_rows(workdir: Path, count: int, seconds: float, cpu_count: int, gpu: bool) -> list[dict]:
    waves, texts = segments(count, seconds)
    models = [("HuBERT-base shapes", "audio", hubert_base(workdir / "hubert")),
              ("Whisper-base shapes", "audio", whisper_base(workdir / "whisper")),
              ("RoBERTa-base size (BERT)", "text", bert_base(workdir / "bert"))]
    rows = []
    for label, modality, folder in models:
        build = build_audio_encoder if modality == "audio" else build_text_encoder
        inputs = waves if modality == "audio" else texts
        cpu_vectors, cpu_seconds = timed_encode(build(f"hf:{folder}", device="cpu"), inputs[:cpu_count], repeats=1)
        row = {"encoder": label, "modality": modality, "dim": int(cpu_vectors.shape[1]),
               "segments": count, "segment_seconds": seconds,
               "cpu_segments_per_s": cpu_count / cpu_seconds}
        if gpu:
            for precision in ("float16", "bfloat16"):
                encoder = build(f"hf:{folder}?precision={precision}", device="cuda")
                vectors, elapsed = timed_encode(encoder, inputs)
                row[f"cuda_{precision}_segments_per_s"] = count / elapsed
                row[f"cuda_{precision}_min_cosine_vs_cpu"] = smallest_cosine(vectors[:cpu_count], cpu_vectors)
                del encoder
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def training_rows(device: str, documents: int, segments_per_document: int, steps: int) -> list[dict]:
    """Forward + backward + AdamW of HILBERT on [documents, segments, width] features of the
    paper's unequal widths (768 speech, 4096 text)."""
    torch.manual_seed(0)
    config = HilbertModelConfig(audio_dim=768, text_dim=4096, tasks={"diagnosis": 3, "severity": 2}, d_model=256,
                                d_embed=128, n_heads=4, n_cross_layers=2, pooling_heads=2, dropout=0.1,
                                n_experts=4, expert_hidden=256)
    model = HilbertModel(config).to(device)
    loss_fn = HilbertLoss(LossConfig(gather=False)).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-3)
    audio = torch.randn(documents, segments_per_document, 768, device=device)
    text = torch.randn(documents, segments_per_document, 4096, device=device)
    mask = torch.ones(documents, segments_per_document, dtype=torch.bool, device=device)
    mask[::3, segments_per_document // 2:] = False  # documents of unequal length
    labels = {"diagnosis": torch.randint(0, 3, (documents,), device=device),
              "severity": torch.randint(0, 2, (documents,), device=device)}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(audio, text, mask), labels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    first = step()  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        last = step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    row = {"device": device, "documents": documents, "segments": segments_per_document, "steps": steps,
           "documents_per_s": documents * steps / elapsed, "first_loss": first, "last_loss": last,
           "finite": math.isfinite(last)}
    if device.startswith("cuda"):
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row), flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=256, help="segments per encoder on CUDA")
    parser.add_argument("--cpu-segments", type=int, default=8, help="segments on CPU (the agreement check)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each segment")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA: {torch.cuda.get_device_name(0) if gpu else 'none'}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        encoders = encoder_rows(Path(workdir), args.segments, args.seconds, min(args.cpu_segments, args.segments), gpu)
    training = training_rows("cpu", min(args.documents, 16), 32, steps=2)
    if gpu:
        training += training_rows("cuda", args.documents, 64, steps=20)
    print("\nencoder                    | cpu seg/s | cuda fp16 seg/s | cuda bf16 seg/s | min cos fp16 | min cos bf16")
    for row in encoders:
        cells = [f"{row.get(key, math.nan):.4f}" if "cosine" in key else f"{row.get(key, math.nan):.1f}"
                 for key in ("cpu_segments_per_s", "cuda_float16_segments_per_s", "cuda_bfloat16_segments_per_s",
                             "cuda_float16_min_cosine_vs_cpu", "cuda_bfloat16_min_cosine_vs_cpu")]
        print(f"{row['encoder']:<26} | " + " | ".join(cells))
    print(f"(segments of {args.seconds:g} s; audio-seconds/s = segments/s x {args.seconds:g})")
    for row in training:
        print(f"training step on {row['device']}: {row['documents_per_s']:.0f} documents/s "
              f"({row['documents']} documents x {row['segments']} segments), loss {row['first_loss']:.3f} -> "
              f"{row['last_loss']:.3f}" + (f", peak {row['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in row else ""))
    if args.json:
        args.json.write_text(json.dumps({"encoders": encoders, "training": training}, indent=1) + "\n")


if __name__ == "__main__":
    main()
