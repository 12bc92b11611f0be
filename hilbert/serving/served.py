"""A loaded model with its encoders, predicting documents in the calling process.

Serving answers a handful of documents at a time, so features are computed here, document by
document, with the encoders the model was trained on (built once, when the model loads), not on
Ray Data: the same per-document functions the extraction actors run
(:func:`~hilbert.features.extract.encode_document_audio`, ``encode_document_text``), then the same
dataset, fold models and averaging as ``hilbert predict`` (:func:`hilbert.predict.mean_probabilities`).
A model trained with segment timing gets its timing columns from the request's segments, by the
function extraction caches them with (:func:`hilbert.features.timing.segment_timing`).

The feature cache is optional. Without one, features live in memory for the request only. With a
``cache_dir`` (the cache ``hilbert extract`` / ``predict`` use, or any folder or URI), a document
already encoded is read from it and a new one is written to it, under the same content-addressed
keys: a document posted twice, or predicted before by ``hilbert predict``, is not encoded again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hilbert.data.manifest import Document, Manifest
from hilbert.features.batches import UNLABELLED_INDEX, DocumentFeatures
from hilbert.features.cache import FeatureCache
from hilbert.features.encoders import build_audio_encoder, build_text_encoder, encoder_fingerprint
from hilbert.features.extract import ExtractionError, encode_document_audio, encode_document_text, entry_keys
from hilbert.features.timing import segment_timing, timing_fingerprint, timing_label
from hilbert.predict import (
    EMBEDDING_COLUMNS,
    ModelLocationError,
    check_encoders,
    embedding_rows,
    load_predictor,
    mean_probabilities,
    predictions_table,
)
from hilbert.serving.requests import RequestError


class ServedModel:
    """The fold models of one checkpoint folder, their encoders and (optionally) a feature cache."""

    def __init__(self, folder: str | Path, *, cache_dir: str | Path | None = None, device: str = "cpu"):
        self.predictor = load_predictor(folder, device)
        described = self.predictor.info.features
        self.specs = {modality: described[f"{modality}_encoder"] for modality in ("audio", "text")}
        self.fingerprints = {modality: encoder_fingerprint(modality, spec) for modality, spec in self.specs.items()}
        check_encoders(self.predictor, self.fingerprints)  # as hilbert predict does, before any request
        # The timing columns the model was trained with (None: none), computed now as extraction does.
        self.timing = described.get("timing")
        if self.timing is not None and self.timing != timing_fingerprint():
            raise ModelLocationError(f"{folder}: the model was trained with {timing_label(self.timing)} timing "
                                     f"features; this hilbert computes {timing_label(timing_fingerprint())}")
        self.audio_encoder = build_audio_encoder(self.specs["audio"], device=device)
        self.text_encoder = build_text_encoder(self.specs["text"], device=device)
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self.max_segments = self.predictor.info.training.get("data", {}).get("max_segments")

    def predict(self, manifest: Manifest, *, embeddings: bool = False) -> pd.DataFrame:
        """One row per document: doc_id, per task the predicted class (``<task>``) and the class
        probabilities (``<task>/p/<class>``), as ``hilbert predict`` writes them; with
        ``embeddings``, also :data:`hilbert.predict.EMBEDDING_COLUMNS` (lists of floats) and
        ``segments``, as ``hilbert embed`` writes them."""
        dataset = self.dataset(manifest)
        table = predictions_table(manifest, self.predictor.label_maps, mean_probabilities(self.predictor, dataset))
        frame = table.to_pandas()
        if embeddings:
            rows = embedding_rows(self.predictor, dataset)
            for name in ("segments", *EMBEDDING_COLUMNS):
                frame[name] = rows[name]
        return frame

    def dataset(self, manifest: Manifest) -> DocumentFeatures:
        """The documents' features as the model reads them (at most ``max_segments`` segments)."""
        timing = {d.doc_id: np.hstack(segment_timing(d.segments)) for d in manifest} if self.timing else {}
        features = _Features(self._features(manifest), timing)
        blank = [{task: UNLABELLED_INDEX for task in self.predictor.label_maps.tasks} for _ in manifest]
        return DocumentFeatures(features, None, [d.doc_id for d in manifest], blank,  # type: ignore[arg-type]
                                self.max_segments, timing=self.timing)

    def _features(self, manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        keys = entry_keys(manifest, self.cache, self.fingerprints) if self.cache else None
        found = {}
        for doc in manifest:
            audio = self._cached("audio", doc, keys, lambda d=doc: encode_document_audio(
                self.audio_encoder, d.audio_path, [(s.start, s.end) for s in d.segments], d.doc_id))
            text = self._cached("text", doc, keys, lambda d=doc: encode_document_text(
                self.text_encoder, [s.text for s in d.segments], d.doc_id))
            found[doc.doc_id] = (audio, text)
        return found

    def _cached(self, modality: str, doc: Document, keys: dict[str, dict[str, str]] | None, encode) -> np.ndarray:
        if keys is not None and self.cache is not None:
            key = keys[modality][doc.doc_id]
            if self.cache.has(modality, key):
                return self.cache.get(modality, key)
        try:
            features = np.ascontiguousarray(encode(), dtype=np.float32)  # what the cache stores
        except ExtractionError as error:  # a file whose header reads but whose samples do not
            raise RequestError([str(error)]) from error
        if keys is not None and self.cache is not None:
            encoder = self.audio_encoder if modality == "audio" else self.text_encoder
            self.cache.put(modality, keys[modality][doc.doc_id], features, doc_id=doc.doc_id, encoder=encoder.spec)
        return features


class _Features:
    """Features (and timing rows) at hand, read the way :class:`DocumentFeatures` reads a cache's
    feature set."""

    def __init__(self, documents: dict[str, tuple[np.ndarray, np.ndarray]], timing: dict[str, np.ndarray]):
        self.documents = documents
        self.timing = timing

    def load_document(self, feature_set: Any, doc_id: str) -> tuple[np.ndarray, np.ndarray]:
        return self.documents[doc_id]

    def load_timing(self, feature_set: Any, doc_id: str) -> np.ndarray:
        return self.timing[doc_id]
