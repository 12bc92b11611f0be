"""Feature extraction: every segment of a manifest through the frozen encoders, exactly once.

The driver plans (which documents miss which entries), Ray Data does the encoding: documents
stream through a pool of encoder actors (one model load per actor, GPUs when the cluster has
them), each actor writes finished documents straight into the cache. Nothing is encoded twice:
a re-run is answered from the cache without starting Ray at all, and an interrupted run resumes
at the first document whose entry is missing.

:func:`encode_document_audio` and :func:`encode_document_text` are the per-document work, shared
by the Ray actors and by plain loops (benchmarks, debugging), so both measure the same thing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hilbert.data.audio import load_for_encoder, slice_seconds
from hilbert.data.manifest import Document, Manifest
from hilbert.features.cache import (
    MODALITIES,
    FeatureCache,
    FeatureSet,
    Modality,
    audio_entry_key,
    file_sha256,
    text_entry_key,
)
from hilbert.features.encoders import (
    AudioEncoder,
    TextEncoder,
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
)


class ExtractionError(RuntimeError):
    """Encoding a document failed; the message names the document and the encoder."""


def encode_document_audio(encoder: AudioEncoder, audio_path: str | Path,
                          spans: list[tuple[float, float]], doc_id: str) -> np.ndarray:
    """Audio features [segments, dim] of one document (decode, downmix, resample, slice, encode)."""
    try:
        waveform = load_for_encoder(audio_path, encoder.sample_rate)
    except Exception as error:
        raise ExtractionError(f"doc_id {doc_id!r}, field 'audio': {error}") from error
    pieces = [slice_seconds(waveform, encoder.sample_rate, start, end) for start, end in spans]
    return encoder.encode(pieces)


def encode_document_text(encoder: TextEncoder, texts: list[str], doc_id: str) -> np.ndarray:
    """Text features [segments, dim] of one document."""
    return encoder.encode(texts)


@dataclass(frozen=True)
class _Job:
    """One document's missing entry, as it travels through Ray Data (JSON: no pickled objects)."""

    modality: Modality
    doc_id: str
    key: str
    audio_path: str = ""
    spans: tuple[tuple[float, float], ...] = ()
    texts: tuple[str, ...] = ()

    @property
    def audio_seconds(self) -> float:
        return sum(end - start for start, end in self.spans)


@dataclass
class ExtractionReport:
    """What an extraction did: entries computed and reused, time and throughput."""

    documents: int
    segments: int
    audio_seconds: float
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    computed_segments: int = 0
    computed_audio_seconds: float = 0.0
    encode_wall_seconds: float = 0.0
    total_seconds: float = 0.0
    feature_set_path: Path | None = None
    feature_set: FeatureSet | None = None

    @property
    def cache_hit(self) -> bool:
        return not any(self.computed.values())

    def throughput_line(self) -> str:
        entries = ", ".join(f"{m} {self.computed.get(m, 0)} computed / {self.reused.get(m, 0)} cached"
                            for m in MODALITIES)
        if self.cache_hit:
            return (f"all {self.documents} documents were cached ({entries}); nothing encoded "
                    f"in {self.total_seconds:.2f} s")
        wall = max(self.encode_wall_seconds, 1e-9)
        return (f"encoded {self.computed_segments} segments ({self.computed_audio_seconds:.0f} s of audio) "
                f"in {self.encode_wall_seconds:.1f} s: {self.computed_segments / wall:.1f} segments/s, "
                f"{self.computed_audio_seconds / wall:.1f} audio s/s ({entries})")


def manifest_sha256(manifest: Manifest) -> str:
    return file_sha256(manifest.path)


def extract_features(
    manifest: Manifest,
    audio_encoder: str,
    text_encoder: str,
    cache_dir: str | Path,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    use_gpu: bool | None = None,
    documents_per_batch: int = 4,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractionReport:
    """Fill ``cache_dir`` with the features of every document of ``manifest``.

    Returns the report with the :class:`FeatureSet` that training reads. ``address`` is the Ray
    cluster (None: an embedded local Ray, started only when something needs encoding).
    """
    started = time.perf_counter()
    cache = FeatureCache(cache_dir)
    cache.remove_stale_temporaries()
    # Read from config and weight files only: a fully cached re-run never loads a model.
    fingerprints = {"audio": encoder_fingerprint("audio", audio_encoder),
                    "text": encoder_fingerprint("text", text_encoder)}
    specs = {"audio": audio_encoder, "text": text_encoder}
    keys, jobs = _plan(manifest, cache, fingerprints)
    report = ExtractionReport(
        documents=len(manifest), segments=sum(len(d.segments) for d in manifest),
        audio_seconds=sum(s.duration for d in manifest for s in d.segments))
    for modality in MODALITIES:
        report.computed[modality] = len(jobs[modality])
        report.reused[modality] = len(manifest) - len(jobs[modality])

    dims: dict[str, int] = {}
    if any(jobs.values()):
        encode_started = time.perf_counter()
        for modality in MODALITIES:
            if jobs[modality]:
                _run_on_ray(jobs[modality], specs[modality], cache, address=address, num_actors=num_actors,
                            cpus_per_actor=cpus_per_actor, use_gpu=use_gpu,
                            documents_per_batch=documents_per_batch, progress=progress)
        report.encode_wall_seconds = time.perf_counter() - encode_started
        touched = {job.doc_id for modality in MODALITIES for job in jobs[modality]}
        report.computed_segments = sum(len(d.segments) for d in manifest if d.doc_id in touched)
        report.computed_audio_seconds = sum(j.audio_seconds for j in jobs["audio"])

    for modality in MODALITIES:
        missing = [doc_id for doc_id, k in keys[modality].items() if not cache.has(modality, k)]
        if missing:
            raise ExtractionError(f"{len(missing)} {modality} entries still missing after extraction, "
                                  f"first doc_id {missing[0]!r}")
        first_key = next(iter(keys[modality].values()))
        dims[modality] = int(cache.get(modality, first_key).shape[1])

    feature_set = FeatureSet(
        manifest=str(manifest.path.resolve()), manifest_sha256=manifest_sha256(manifest),
        audio_encoder=audio_encoder, text_encoder=text_encoder,
        audio_fingerprint=fingerprints["audio"], text_fingerprint=fingerprints["text"],
        audio_dim=dims["audio"], text_dim=dims["text"],
        documents={d.doc_id: {"audio": keys["audio"][d.doc_id], "text": keys["text"][d.doc_id],
                              "segments": len(d.segments)} for d in manifest})
    report.feature_set_path = cache.write_feature_set(feature_set)
    report.feature_set = feature_set
    report.total_seconds = time.perf_counter() - started
    return report


def _plan(manifest: Manifest, cache: FeatureCache, fingerprints: dict[str, dict[str, Any]]
          ) -> tuple[dict[str, dict[str, str]], dict[str, list[_Job]]]:
    """Every document's entry keys, and the jobs for the entries the cache lacks."""
    audio_hashes = cache.audio_sha256(sorted({d.audio_path for d in manifest}))
    keys: dict[str, dict[str, str]] = {m: {} for m in MODALITIES}
    jobs: dict[str, list[_Job]] = {m: [] for m in MODALITIES}
    for doc in manifest:
        spans = tuple((s.start, s.end) for s in doc.segments)
        texts = tuple(s.text for s in doc.segments)
        keys["audio"][doc.doc_id] = audio_key = audio_entry_key(audio_hashes[doc.audio_path], spans,
                                                                fingerprints["audio"])
        keys["text"][doc.doc_id] = text_key = text_entry_key(texts, fingerprints["text"])
        if not cache.has("audio", audio_key):
            jobs["audio"].append(_Job("audio", doc.doc_id, audio_key, str(doc.audio_path), spans))
        if not cache.has("text", text_key):
            jobs["text"].append(_Job("text", doc.doc_id, text_key, texts=texts))
    # Longest documents first: the pool's tail then holds short documents, not one long straggler.
    jobs["audio"].sort(key=lambda job: -job.audio_seconds)
    jobs["text"].sort(key=lambda job: -sum(len(t) for t in job.texts))
    return keys, jobs


class EncodeAndStore:
    """A Ray Data actor: loads one encoder once, then encodes and stores documents batch by batch."""

    def __init__(self, modality: Modality, spec: str, cache_root: str, device: str | None, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.modality = modality
        builder = build_audio_encoder if modality == "audio" else build_text_encoder
        self.encoder = builder(spec, device=device)
        self.cache = FeatureCache(cache_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        doc_ids, segments, seconds = [], [], []
        for payload in batch["job"]:
            job = _Job(**{k: _untuple(k, v) for k, v in json.loads(payload).items()})
            if self.cache.has(self.modality, job.key):  # another actor or run finished it meanwhile
                features = None
            elif self.modality == "audio":
                features = encode_document_audio(self.encoder, job.audio_path, list(job.spans), job.doc_id)
            else:
                features = encode_document_text(self.encoder, list(job.texts), job.doc_id)
            if features is not None:
                self.cache.put(self.modality, job.key, features, doc_id=job.doc_id, encoder=self.encoder.spec)
            doc_ids.append(job.doc_id)
            segments.append(len(job.spans) or len(job.texts))
            seconds.append(job.audio_seconds)
        return {"doc_id": np.array(doc_ids), "segments": np.array(segments), "audio_seconds": np.array(seconds)}


def _untuple(name: str, value: Any) -> Any:
    if name == "spans":
        return tuple(tuple(span) for span in value)
    if name == "texts":
        return tuple(value)
    return value


def _run_on_ray(jobs: list[_Job], spec: str, cache: FeatureCache, *, address: str | None,
                num_actors: int | None, cpus_per_actor: float, use_gpu: bool | None,
                documents_per_batch: int, progress: bool) -> None:
    import ray
    import ray.data

    from hilbert.ray_runtime import connect

    resources = connect(address)
    gpus = resources.get("GPU", 0.0)
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if use_gpu and gpus == 0:
        raise ExtractionError("use_gpu was requested but the Ray cluster has no GPU")
    if num_actors is None:
        num_actors = int(gpus) if use_gpu else max(1, int(resources.get("CPU", 1) // cpus_per_actor))
    num_actors = max(1, min(num_actors, len(jobs)))

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False
    rows = [{"job": json.dumps(job.__dict__)} for job in jobs]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), num_actors * 4))
    encoded = dataset.map_batches(
        EncodeAndStore,
        fn_constructor_kwargs={"modality": jobs[0].modality, "spec": spec, "cache_root": str(cache.root),
                               "device": "cuda" if use_gpu else "cpu",
                               "threads": max(1, int(cpus_per_actor))},
        batch_size=documents_per_batch,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    try:
        for _ in encoded.iter_batches(batch_size=None):
            pass
    except Exception as error:  # Ray wraps the actor's exception; keep its message, which names the doc
        cause = error.__cause__ or error
        raise ExtractionError(f"{jobs[0].modality} extraction with {spec!r} failed: {cause}") from error
