"""Predictions and embeddings of a large corpus over a Ray cluster, with Ray Data.

``hilbert predict`` and ``hilbert embed`` given a cluster address run here. The corpus's features
are first made sure of in the cache (extraction on the cluster, as ``hilbert extract`` does);
then Ray Data streams the documents, a batch at a time, to a pool of actors that each hold the
model (every fold model of an ensemble), on a GPU when they are given one. What they answer
streams back to the driver, which appends it to one Parquet file under a temporary name and
renames it into place when the last row is written: a killed job leaves no half-written table
where readers look. The same functions as the single-process path compute every row
(:func:`hilbert.predict.mean_probabilities`, :func:`hilbert.predict.embedding_rows`), so the
two paths write the same file.

Nothing the size of the corpus travels to the actors: each row carries a document's id and its
cache entries' keys, and the model travels once, as its checkpoint files (safetensors + JSON,
no pickle) in Ray's object store. The driver holds the manifest (the job's index) and one batch
of answers at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hilbert.config import to_dict
from hilbert.data.manifest import Manifest
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.predict import (Predictor, check_model_timing, embedding_rows, features_for, load_predictor,
                             mean_probabilities, probability_columns, unlabelled_dataset)
from hilbert.ray_runtime import actor_pool, connect

KINDS = ("predict", "embed")
PROGRESS_SECONDS = 10.0
ACTOR_START_SECONDS = 600  # a GPU node the autoscaler must start first can take minutes


class BatchInferenceError(RuntimeError):
    """A batch job that failed on the cluster; the message keeps the cause (which names the document)."""


@dataclass
class BatchReport:
    documents: int
    seconds: float  # inference only: the actors' start, every batch and the Parquet file
    extraction_seconds: float
    actors: int
    path: Path

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else float("nan")


class ModelActor:
    """A Ray Data actor holding the model: a batch of rows (doc_id, cache entry keys) in, a batch
    of answer rows out."""

    def __init__(self, kind: str, model: list, cache_root: str, feature_set: dict[str, Any], device: str,
                 threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        self.kind = kind
        self.cache_root = cache_root
        self.feature_set = feature_set  # FeatureSet fields but its documents (each row carries its own)
        files: dict[str, bytes] = ray.get(model[0])  # in a list: Ray resolves only top-level references
        self.folder = tempfile.TemporaryDirectory(prefix="hilbert-model-")
        for relative, content in files.items():
            path = Path(self.folder.name, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        self.predictor = load_predictor(self.folder.name, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        doc_ids = [str(doc_id) for doc_id in batch["doc_id"]]
        entries = {doc_id: json.loads(entry) for doc_id, entry in zip(doc_ids, batch["entry"])}
        feature_set = FeatureSet(**self.feature_set, documents=entries)
        dataset = unlabelled_dataset(self.predictor, self.cache_root, feature_set, doc_ids)
        if self.kind == "predict":
            return probability_columns(doc_ids, self.predictor.label_maps, mean_probabilities(self.predictor, dataset))
        return pa.table(embedding_rows(self.predictor, dataset))


def model_files(predictor: Predictor) -> dict[str, bytes]:
    """The checkpoint files of a loaded predictor (its source folder), by relative path."""
    source = Path(predictor.source)
    return {path.relative_to(source).as_posix(): path.read_bytes() for path in sorted(source.rglob("*"))
            if path.is_file() and path.name in ("model.safetensors", "checkpoint.json")}


def run_batch_inference(kind: str, predictor: Predictor, manifest: Manifest, cache_dir: str | Path,
                        out: str | Path, *, address: str | None, actors: int | None = None,
                        cpus_per_actor: float = 1.0, use_gpu: bool | None = None, documents_per_batch: int = 64,
                        log: Callable[[str], None] = print) -> BatchReport:
    """Write ``hilbert predict`` (``kind="predict"``) or ``hilbert embed`` rows of every document
    of ``manifest`` to the Parquet file ``out``, computed by ``actors`` Ray Data actors on the
    cluster at ``address`` (None: a local Ray); rows in manifest order."""
    import ray
    import ray.data

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if documents_per_batch < 1:
        raise ValueError(f"documents_per_batch must be >= 1, got {documents_per_batch}")
    started = time.perf_counter()
    feature_set = features_for(predictor, manifest, cache_dir, address=address)
    check_model_timing(predictor, feature_set)  # here, not in every actor: a refusal before any starts
    extraction_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batches = -(-len(manifest) // documents_per_batch)
    try:
        actors, use_gpu = actor_pool(connect(address), actors, cpus_per_actor, use_gpu, batches)
    except ValueError as error:
        raise BatchInferenceError(str(error)) from None

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True  # the rows of `out` in manifest order, as in one process
    # Every actor of the pool placed before the first batch: a pool the cluster cannot hold fails
    # with a message instead of waiting forever, and the work is spread over all of it.
    context.wait_for_min_actors_s = ACTOR_START_SECONDS
    header = {key: value for key, value in to_dict(feature_set).items() if key != "documents"}
    rows = [{"doc_id": doc.doc_id, "entry": json.dumps(feature_set.documents[doc.doc_id])} for doc in manifest]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(batches, actors * 4)))
    answers = dataset.map_batches(
        ModelActor,
        fn_constructor_kwargs={"kind": kind, "model": [ray.put(model_files(predictor))],
                               "cache_root": FeatureCache(cache_dir).location, "feature_set": header,
                               "device": "cuda" if use_gpu else "cpu", "threads": max(1, int(cpus_per_actor))},
        batch_size=documents_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    out = Path(out)
    log(f"{kind}: {len(manifest)} documents on {actors} Ray Data actor(s), {documents_per_batch} a batch")
    try:
        written = _stream_to_parquet(answers.iter_batches(batch_size=None, batch_format="pyarrow"), out,
                                     len(manifest), kind, log)
    except ray.exceptions.GetTimeoutError as error:
        raise BatchInferenceError(
            f"{kind}: the cluster did not start {actors} model actor(s) of {cpus_per_actor} CPU"
            f"{' and 1 GPU' if use_gpu else ''} each in {ACTOR_START_SECONDS} s; ask for fewer (--actors)") from error
    except Exception as error:  # Ray wraps the actor's exception; keep its message, which names the doc
        raise BatchInferenceError(f"{kind} on Ray Data failed: {error.__cause__ or error}") from error
    if written != len(manifest):
        raise BatchInferenceError(f"{kind} on Ray Data wrote {written} rows for {len(manifest)} documents")
    return BatchReport(written, time.perf_counter() - started, extraction_seconds, actors, out)


def _stream_to_parquet(tables, path: Path, total: int, kind: str, log: Callable[[str], None]) -> int:
    """Append every table to one Parquet file built under a temporary name beside ``path``, then
    renamed into place; nothing is left at either name when a table fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    writer: pq.ParquetWriter | None = None
    written, started, last_said = 0, time.perf_counter(), time.perf_counter()
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table.cast(writer.schema))
            written += table.num_rows
            now = time.perf_counter()
            if now - last_said >= PROGRESS_SECONDS:
                rate = written / (now - started)
                log(f"{kind}: {written}/{total} documents, {rate:.1f} docs/s, ETA {(total - written) / rate:.0f} s")
                last_said = now
        if writer is None:
            raise BatchInferenceError(f"{kind} on Ray Data returned no rows")
        writer.close()
        writer = None
        os.replace(temporary, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(temporary):
            os.remove(temporary)
    return written
