"""Feature extraction: every segment of a manifest through the frozen encoders, exactly once.

The driver plans (which documents miss which entries), Ray Data does the encoding: documents
stream through a pool of encoder actors (one model load per actor, GPUs when the cluster has
them), each actor writes finished documents straight into the cache. Nothing is encoded twice:
a re-run is answered from the cache without starting Ray at all, and an interrupted run resumes
at the first document whose entry is missing. The segment timing rows of every document
(:mod:`hilbert.features.timing`: durations, pauses, positions, transcript lengths) need no
encoder: the driver computes the missing ones and caches them beside the features, and the
feature set names them too.

A concurrent ``hilbert cache prune`` never takes an entry from under an extraction: before it
looks at which entries exist, the extraction publishes every key its feature set will name (a
pending reference), and before it writes the feature set it waits for prunes in progress and
encodes again, once, whatever vanished meanwhile (the protocol: :mod:`hilbert.features.housekeeping`).

:func:`encode_document_audio` and :func:`encode_document_text` are the per-document work, shared
by the Ray actors and by plain loops (benchmarks, debugging), so both measure the same thing.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hilbert.data.audio import load_for_encoder, slice_seconds
from hilbert.data.manifest import Manifest
from hilbert.features.cache import (
    MODALITIES,
    TIMING,
    FeatureCache,
    FeatureSet,
    FeatureValueError,
    audio_entry_key,
    file_sha256,
    text_entry_key,
    timing_entry_key,
)
from hilbert.features.encoders import (
    AudioEncoder,
    TextEncoder,
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
)
from hilbert.features.timing import segment_timing, timing_fingerprint, timing_label
from hilbert.ray_runtime import actor_pool, connect


# Up to this many segments left to encode (and no cluster named), extraction runs in the calling
# process: starting Ray Data's actor pool (~30 s on 2 cores) costs more than encoding them. Set by
# the slowest CPU encoder measured, Whisper tiny.en on CTranslate2 (every segment a 30 s window,
# ~0.7 s each: even at this size); the weight-free ones would gain up to thousands of segments
# (docs/benchmarks.md, benchmarks/small_jobs.py).
IN_PROCESS_SEGMENTS = 64


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
    for index, piece in enumerate(pieces):
        if not np.isfinite(piece).all():
            start, end = spans[index]
            raise ExtractionError(f"doc_id {doc_id!r}, field 'audio': NaN or infinite samples in "
                                  f"segments[{index}] ({start:g}-{end:g} s)")
    try:
        return encoder.encode(pieces)
    except Exception as error:  # the encoder knows the segment's index, not the document
        raise ExtractionError(f"doc_id {doc_id!r}, field 'audio', encoder {encoder.spec!r}: {error}") from error


def encode_document_text(encoder: TextEncoder, texts: list[str], doc_id: str) -> np.ndarray:
    """Text features [segments, dim] of one document."""
    try:
        return encoder.encode(texts)
    except Exception as error:
        raise ExtractionError(f"doc_id {doc_id!r}, field 'segments' text, encoder {encoder.spec!r}: {error}") from error


@dataclass(frozen=True)
class _Job:
    """One document's missing entries, as it travels through Ray Data (JSON: no pickled objects).

    An empty key means that modality is already cached for this document.
    """

    doc_id: str
    audio_key: str = ""
    text_key: str = ""
    audio_path: str = ""
    spans: tuple[tuple[float, float], ...] = ()
    texts: tuple[str, ...] = ()

    @property
    def audio_seconds(self) -> float:
        return sum(end - start for start, end in self.spans) if self.audio_key else 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, payload: str) -> "_Job":
        data = json.loads(payload)
        return cls(data["doc_id"], data["audio_key"], data["text_key"], data["audio_path"],
                   tuple((float(s), float(e)) for s, e in data["spans"]), tuple(data["texts"]))


@dataclass
class ExtractionReport:
    """What an extraction did: entries computed and reused, time and throughput."""

    documents: int
    segments: int
    audio_seconds: float
    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    # Entries present when planned but gone before the feature set was written (a prune that had
    # read the references before this extraction published its own), encoded again.
    reencoded: dict[str, int] = field(default_factory=dict)
    # Timing entries (hilbert.features.timing) written by the driver, and found; no encoder runs
    # for them, so they do not count in cache_hit.
    timing_computed: int = 0
    timing_reused: int = 0
    computed_segments: int = 0
    computed_audio_seconds: float = 0.0
    encode_wall_seconds: float = 0.0
    total_seconds: float = 0.0
    feature_set_path: Path | str | None = None  # the URI (options left out) for a cache on a URI
    feature_set: FeatureSet | None = None

    @property
    def cache_hit(self) -> bool:
        """No encoder had anything to encode (timing rows may have been computed)."""
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


class ExtractionProgress:
    """Progress lines while documents come back encoded: documents done of the total, audio
    seconds encoded per second of wall time, and the time left at that rate.

    The first finished batch and the last are always reported, others at most every
    ``every_seconds``. The estimate counts audio seconds (documents arrive longest first, so a
    document count would promise too much too early); it counts documents when only text is left.
    """

    def __init__(self, jobs: list[_Job], log: Callable[[str], None], every_seconds: float = 10.0):
        self.total_documents = len(jobs)
        self.total_audio_seconds = sum(job.audio_seconds for job in jobs)
        self.log = log
        self.every_seconds = every_seconds
        self.started = time.perf_counter()
        self.documents = 0
        self.audio_seconds = 0.0
        self._reported_at: float | None = None

    def add(self, documents: int, audio_seconds: float) -> None:
        self.documents += documents
        self.audio_seconds += audio_seconds
        now = time.perf_counter()
        done = self.documents >= self.total_documents
        if done or self._reported_at is None or now - self._reported_at >= self.every_seconds:
            self._reported_at = now
            self.log(self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        elapsed = max(elapsed, 1e-9)
        share = (self.audio_seconds / self.total_audio_seconds if self.total_audio_seconds > 0
                 else self.documents / max(self.total_documents, 1))
        if self.documents >= self.total_documents:
            status = f"done in {duration_text(elapsed)}"
        elif share > 0:
            status = f"ETA {duration_text(elapsed * (1 - share) / share)}"
        else:
            status = "ETA unknown"
        return (f"encoding: {self.documents}/{self.total_documents} documents, "
                f"{self.audio_seconds:.0f}/{self.total_audio_seconds:.0f} s of audio, "
                f"{self.audio_seconds / elapsed:.1f} audio s/s, {status}")


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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
    in_process: bool | None = None,
) -> ExtractionReport:
    """Fill ``cache_dir`` (a folder, or a URI every node reads) with the features of every
    document of ``manifest``.

    Returns the report with the :class:`FeatureSet` that training reads. ``address`` is the Ray
    cluster (None: an embedded local Ray, started only when something needs encoding). What is
    left to encode runs on Ray Data, or in this process when ``in_process`` says so; by default
    in this process when no address is given and it is small (:data:`IN_PROCESS_SEGMENTS`):
    starting Ray Data costs more than encoding a handful of documents. With ``progress``,
    encoding reports documents done, audio seconds per second and an ETA through ``log``
    (:class:`ExtractionProgress`).
    """
    started = time.perf_counter()
    cache = FeatureCache(cache_dir)
    cache.remove_stale_temporaries()
    # Read from config and weight files only: a fully cached re-run never loads a model.
    fingerprints = {"audio": encoder_fingerprint("audio", audio_encoder),
                    "text": encoder_fingerprint("text", text_encoder)}
    specs = {"audio": audio_encoder, "text": text_encoder}
    keys = entry_keys(manifest, cache, fingerprints)
    report = ExtractionReport(
        documents=len(manifest), segments=sum(len(d.segments) for d in manifest),
        audio_seconds=sum(s.duration for d in manifest for s in d.segments))
    with cache.referencing(keys, description=f"extraction of {manifest.path}") as reference:
        jobs = _missing_jobs(manifest, cache, keys)  # only now: from here on a prune keeps these keys
        if _encodes_in_process(jobs, address, in_process):
            encode = functools.partial(_run_in_process, specs=specs, cache=cache, cpus=cpus_per_actor, use_gpu=use_gpu,
                                       documents_per_batch=documents_per_batch, progress=progress, log=log)
        else:
            encode = functools.partial(_run_on_ray, specs=specs, cache=cache, address=address, num_actors=num_actors,
                                       cpus_per_actor=cpus_per_actor, use_gpu=use_gpu,
                                       documents_per_batch=documents_per_batch, progress=progress, log=log)
        for modality in MODALITIES:
            report.computed[modality] = sum(1 for job in jobs if getattr(job, f"{modality}_key"))
            report.reused[modality] = len(manifest) - report.computed[modality]
        if jobs:
            encode_started = time.perf_counter()
            encode(jobs, keep_alive=reference.keep_alive)
            report.encode_wall_seconds = time.perf_counter() - encode_started
            report.computed_segments = sum(len(job.spans) for job in jobs)
            report.computed_audio_seconds = sum(job.audio_seconds for job in jobs)
        cache.wait_for_prunes(log)
        _encode_vanished(manifest, cache, keys, report, encode, reference.keep_alive, log)
        # After the wait: what is present now stays (a prune from here on reads our reference).
        _store_timing(manifest, cache, keys[TIMING], report)
        feature_set = FeatureSet(
            manifest=str(manifest.path.resolve()), manifest_sha256=manifest_sha256(manifest),
            audio_encoder=audio_encoder, text_encoder=text_encoder,
            audio_fingerprint=fingerprints["audio"], text_fingerprint=fingerprints["text"],
            **_dimensions_of_complete_entries(cache, keys),
            documents={d.doc_id: {"audio": keys["audio"][d.doc_id], "text": keys["text"][d.doc_id],
                                  TIMING: keys[TIMING][d.doc_id], "segments": len(d.segments)} for d in manifest},
            timing=timing_fingerprint())
        written = cache.write_feature_set(feature_set)
    report.feature_set_path = written if cache.store is None else cache.feature_set_location(feature_set.id)
    report.feature_set = feature_set
    report.total_seconds = time.perf_counter() - started
    return report


def entry_keys(manifest: Manifest, cache: FeatureCache, fingerprints: dict[str, dict[str, Any]]
               ) -> dict[str, dict[str, str]]:
    """kind (audio, text, timing) -> doc_id -> entry key: what the feature set of ``manifest``
    will name (audio is hashed, memoised in ``cache``; no encoder is loaded)."""
    audio_hashes = cache.audio_sha256(sorted({d.audio_path for d in manifest}))
    keys: dict[str, dict[str, str]] = {m: {} for m in (*MODALITIES, TIMING)}
    timing = timing_fingerprint()
    for doc in manifest:
        spans = tuple((s.start, s.end) for s in doc.segments)
        texts = [s.text for s in doc.segments]
        keys["audio"][doc.doc_id] = audio_entry_key(audio_hashes[doc.audio_path], spans, fingerprints["audio"])
        keys["text"][doc.doc_id] = text_entry_key(texts, fingerprints["text"])
        keys[TIMING][doc.doc_id] = timing_entry_key(spans, texts, timing)
    return keys


def _store_timing(manifest: Manifest, cache: FeatureCache, keys: dict[str, str], report: ExtractionReport) -> None:
    """Write the timing rows of every document whose entry is missing (computed here: no encoder)."""
    present, label = cache.present(TIMING, keys.values()), timing_label(timing_fingerprint())
    for doc in manifest:
        key = keys[doc.doc_id]
        if key in present:
            report.timing_reused += 1
            continue
        cache.put(TIMING, key, np.hstack(segment_timing(doc.segments)), doc_id=doc.doc_id, encoder=label)
        report.timing_computed += 1


def _encode_vanished(manifest: Manifest, cache: FeatureCache, keys: dict[str, dict[str, str]],
                     report: ExtractionReport, encode: Callable[..., None], keep_alive: Callable[[], None],
                     log: Callable[[str], None]) -> None:
    """Encode, once, entries that were there when planned and are gone now: a prune that read the
    references before our pending reference was published may have deleted them."""
    vanished = _missing_jobs(manifest, cache, keys)
    if not vanished:
        return
    for modality in MODALITIES:
        report.reencoded[modality] = sum(1 for job in vanished if getattr(job, f"{modality}_key"))
    log(f"{len(vanished)} document(s) lost entries during extraction (a concurrent `hilbert cache prune`): "
        "encoding them again")
    encode(vanished, keep_alive=keep_alive)


def _dimensions_of_complete_entries(cache: FeatureCache, keys: dict[str, dict[str, str]]) -> dict[str, int]:
    """``audio_dim`` and ``text_dim``, after checking every entry is there."""
    dims = {}
    for modality in MODALITIES:
        stored = cache.present(modality, keys[modality].values())
        missing = [doc_id for doc_id, k in keys[modality].items() if k not in stored]
        if missing:
            raise ExtractionError(f"{len(missing)} {modality} entries still missing after extraction, "
                                  f"first doc_id {missing[0]!r}")
        dims[f"{modality}_dim"] = int(cache.get(modality, next(iter(keys[modality].values()))).shape[1])
    return dims


def _missing_jobs(manifest: Manifest, cache: FeatureCache, keys: dict[str, dict[str, str]]) -> list[_Job]:
    """One job per document that misses any entry, longest first."""
    stored = {modality: cache.present(modality, keys[modality].values()) for modality in MODALITIES}
    jobs: list[_Job] = []
    for doc in manifest:
        audio_key, text_key = keys["audio"][doc.doc_id], keys["text"][doc.doc_id]
        missing_audio = "" if audio_key in stored["audio"] else audio_key
        missing_text = "" if text_key in stored["text"] else text_key
        if missing_audio or missing_text:
            jobs.append(_Job(doc.doc_id, missing_audio, missing_text, str(doc.audio_path),
                             tuple((s.start, s.end) for s in doc.segments), tuple(s.text for s in doc.segments)))
    # Longest documents first: the pool's tail then holds short documents, not one long straggler.
    jobs.sort(key=lambda job: -(job.audio_seconds + 1e-3 * sum(len(t) for t in job.texts)))
    return jobs


class EncodeAndStore:
    """A Ray Data actor: loads each encoder once, then encodes and stores documents batch by batch.

    One actor holds both encoders, so one pool start-up (process, imports, model loads) serves
    both modalities; an encoder is only built if some document still needs it.
    """

    def __init__(self, specs: dict[str, str], cache_root: str, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.specs = specs
        self.device = device
        self.cache = FeatureCache(cache_root)
        self._audio: AudioEncoder | None = None
        self._text: TextEncoder | None = None

    def audio_encoder(self) -> AudioEncoder:
        if self._audio is None:
            self._audio = build_audio_encoder(self.specs["audio"], device=self.device)
        return self._audio

    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            self._text = build_text_encoder(self.specs["text"], device=self.device)
        return self._text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode and store each job's missing entries. A document whose input cannot be encoded
        comes back with its message in ``error`` (Ray keeps only the text of an exception raised
        in an actor, wrapped in its own) and the others go on."""
        doc_ids, segments, audio_seconds, errors = [], [], [], []
        for payload in batch["job"]:
            job = _Job.from_json(payload)
            try:
                self._encode_and_store(job)
                errors.append("")
            except (ExtractionError, FeatureValueError) as error:
                errors.append(str(error))
            doc_ids.append(job.doc_id)
            segments.append(len(job.spans))
            audio_seconds.append(job.audio_seconds)
        return {"doc_id": np.array(doc_ids), "segments": np.array(segments), "audio_seconds": np.array(audio_seconds),
                "error": np.array(errors)}

    def _encode_and_store(self, job: _Job) -> None:
        # has(): another actor, or a concurrent run on a shared cache, may have finished it.
        if job.audio_key and not self.cache.has("audio", job.audio_key):
            encoder = self.audio_encoder()
            features = encode_document_audio(encoder, job.audio_path, list(job.spans), job.doc_id)
            self.cache.put("audio", job.audio_key, features, doc_id=job.doc_id, encoder=encoder.spec)
        if job.text_key and not self.cache.has("text", job.text_key):
            encoder = self.text_encoder()
            features = encode_document_text(encoder, list(job.texts), job.doc_id)
            self.cache.put("text", job.text_key, features, doc_id=job.doc_id, encoder=encoder.spec)


class _Failures:
    """The documents that could not be encoded, gathered batch by batch; raised once the others
    are cached, so that a rerun after the fix encodes only these."""

    shown = 10

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, done: dict[str, np.ndarray]) -> None:
        self.messages.extend(str(message) for message in done["error"] if message)

    def raise_any(self, specs: dict[str, str]) -> None:
        if not self.messages:
            return
        more = len(self.messages) - self.shown
        raise ExtractionError(
            f"extraction with {specs['audio']!r} / {specs['text']!r} failed: {len(self.messages)} document(s) "
            "could not be encoded (every other document is cached):\n"
            + "\n".join(self.messages[:self.shown]) + (f"\n... and {more} more" if more > 0 else ""))


def _encodes_in_process(jobs: list[_Job], address: str | None, in_process: bool | None) -> bool:
    if in_process is not None:
        return in_process
    if address not in (None, "", "local"):
        return False  # a cluster was named: its nodes encode
    return sum(len(job.spans) for job in jobs) <= IN_PROCESS_SEGMENTS


def _run_in_process(jobs: list[_Job], specs: dict[str, str], cache: FeatureCache, *, cpus: float,
                    use_gpu: bool | None, documents_per_batch: int, progress: bool,
                    log: Callable[[str], None] = print, keep_alive: Callable[[], None] = lambda: None) -> None:
    """What the Ray Data actors do (:class:`EncodeAndStore`), in this process, batch by batch."""
    import torch

    device = "cuda" if (torch.cuda.is_available() if use_gpu is None else use_gpu) else "cpu"
    threads = torch.get_num_threads()
    tracker = ExtractionProgress(jobs, log) if progress else None
    try:
        worker, failures = EncodeAndStore(specs, cache.location, device, max(1, int(cpus))), _Failures()
        for start in range(0, len(jobs), documents_per_batch):
            done = worker({"job": np.array([job.to_json() for job in jobs[start:start + documents_per_batch]])})
            keep_alive()
            failures.add(done)
            if tracker is not None:
                tracker.add(len(done["doc_id"]), float(np.sum(done["audio_seconds"])))
    except Exception as error:
        raise ExtractionError(f"extraction with {specs['audio']!r} / {specs['text']!r} failed: {error}") from error
    finally:
        torch.set_num_threads(threads)  # the worker set its own count for this process
    failures.raise_any(specs)


def _run_on_ray(jobs: list[_Job], specs: dict[str, str], cache: FeatureCache, *, address: str | None,
                num_actors: int | None, cpus_per_actor: float, use_gpu: bool | None,
                documents_per_batch: int, progress: bool, log: Callable[[str], None] = print,
                keep_alive: Callable[[], None] = lambda: None) -> None:
    import ray.data  # only when something is left to encode: a full cache hit never starts Ray

    try:
        num_actors, use_gpu = actor_pool(connect(address), num_actors, cpus_per_actor, use_gpu, len(jobs))
    except ValueError as error:
        raise ExtractionError(str(error)) from None

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ExtractionProgress says what matters here: documents, audio s/s, ETA
    context.print_on_execution_start = False
    rows = [{"job": job.to_json()} for job in jobs]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), num_actors * 4))
    encoded = dataset.map_batches(
        EncodeAndStore,
        fn_constructor_kwargs={"specs": specs, "cache_root": cache.location, "device": "cuda" if use_gpu else "cpu",
                               "threads": max(1, int(cpus_per_actor))},
        batch_size=documents_per_batch,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    tracker, failures = ExtractionProgress(jobs, log) if progress else None, _Failures()
    try:
        for done in encoded.iter_batches(batch_size=None):
            keep_alive()
            failures.add(done)
            if tracker is not None:
                tracker.add(len(done["doc_id"]), float(np.sum(done["audio_seconds"])))
    except Exception as error:  # not the input's fault (the actors return those): Ray's message, whole
        cause = error.__cause__ or error
        raise ExtractionError(f"extraction with {specs['audio']!r} / {specs['text']!r} failed: {cause}") from error
    failures.raise_any(specs)
