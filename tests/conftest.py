"""Shared fixtures: tiny corpora written to tmp folders, and a 2-CPU local Ray."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
import soundfile

# No test may reach a model hub or any address other than loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray binds to 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the name MLflow 3.17 reads


def write_tone(path: Path, seconds: float = 3.0, sample_rate: int = 16000, channels: int = 1,
               frequency: float = 220.0, subtype: str | None = None) -> Path:
    """A short harmonic tone file (any format soundfile writes, chosen by the suffix)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = 0.3 * np.sin(2 * np.pi * frequency * t) + 0.1 * np.sin(2 * np.pi * 2 * frequency * t)
    data = np.stack([mono * (1.0 - 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else mono
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data.astype(np.float32), sample_rate, subtype=subtype)
    return path


def document(doc_id: str, audio: str, segments: Iterable[tuple[float, float, str]] | None = None,
             labels: dict[str, Any] | None = None, group: str | None = None) -> dict[str, Any]:
    segs = segments if segments is not None else [(0.0, 1.0, "hello there"), (1.2, 2.5, "general kenobi")]
    record: dict[str, Any] = {"doc_id": doc_id, "audio": audio,
                              "segments": [{"start": s, "end": e, "text": t} for s, e, t in segs],
                              "labels": labels if labels is not None else {"topic": "a"}}
    if group is not None:
        record["group"] = group
    return record


def write_manifest(folder: Path, records: Iterable[dict[str, Any] | str | bytes], name: str = "manifest.jsonl") -> Path:
    """Write records (dicts become JSON lines; str/bytes are written verbatim) to a manifest."""
    lines = []
    for record in records:
        if isinstance(record, dict):
            lines.append(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        elif isinstance(record, str):
            lines.append(record.encode("utf-8"))
        else:
            lines.append(record)
    path = folder / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@functools.lru_cache(maxsize=None)
def _cpu_encoders(audio: str, text: str):
    """Each encoder pair built once per test session."""
    from hilbert.features.encoders import build_audio_encoder, build_text_encoder

    return build_audio_encoder(audio, device="cpu"), build_text_encoder(text, device="cpu")


def extract_in_process(manifest, audio: str, text: str, cache_dir: str | Path):
    """The feature set of ``manifest`` in ``cache_dir``, encoded in this process: what extraction's
    Ray actors do, in a plain loop (as benchmarks/extract.py does); then `extract_features` finds
    every entry cached and writes the feature set without starting Ray. One intra-op thread, as
    each extraction actor has by default: on a busy 2-core machine, five times faster than more."""
    import torch

    from hilbert.features.cache import FeatureCache
    from hilbert.features.encoders import encoder_fingerprint
    from hilbert.features.extract import encode_document_audio, encode_document_text, entry_keys, extract_features

    cache = FeatureCache(cache_dir)
    keys = entry_keys(manifest, cache, {"audio": encoder_fingerprint("audio", audio),
                                        "text": encoder_fingerprint("text", text)})
    audio_encoder, text_encoder = _cpu_encoders(audio, text)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for doc in manifest:
            if not cache.has("audio", keys["audio"][doc.doc_id]):
                features = encode_document_audio(audio_encoder, doc.audio_path,
                                                 [(s.start, s.end) for s in doc.segments], doc.doc_id)
                cache.put("audio", keys["audio"][doc.doc_id], features, doc_id=doc.doc_id, encoder=audio_encoder.spec)
            if not cache.has("text", keys["text"][doc.doc_id]):
                features = encode_document_text(text_encoder, [s.text for s in doc.segments], doc.doc_id)
                cache.put("text", keys["text"][doc.doc_id], features, doc_id=doc.doc_id, encoder=text_encoder.spec)
    finally:
        torch.set_num_threads(threads)
    report = extract_features(manifest, audio, text, cache_dir, progress=False)
    assert report.cache_hit, "the loop above must write exactly the entries extraction plans"
    return report.feature_set


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """Four valid documents with two tasks, one label null."""
    for i in range(4):
        write_tone(tmp_path / "audio" / f"d{i}.wav", frequency=150 + 60 * i)
    records = [document(f"d{i}", f"audio/d{i}.wav",
                        labels={"topic": "ab"[i % 2], "voice": None if i == 0 else "xy"[i // 2]},
                        group=f"g{i // 2}") for i in range(4)]
    return write_manifest(tmp_path, records)


@pytest.fixture
def seeded_single_thread():
    """Reproducible, and one intra-op thread: tiny tensors gain nothing from more, and on a busy
    2-core machine spinning OpenMP threads make these tests 100x slower."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 CPUs on 127.0.0.1, shared by the Ray tests of a session."""
    import ray

    from hilbert.ray_runtime import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()
