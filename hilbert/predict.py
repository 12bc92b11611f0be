"""Use a trained model on new documents: predict, evaluate and embed.

A model location is a checkpoint folder (``model.safetensors`` + ``checkpoint.json``) or a folder
of fold models (``fold_0/``, ``fold_1/``, ... as ``hilbert train`` writes per variant). Predictions
of a fold folder average the folds' class probabilities (a k-fold ensemble); embeddings come from
one model only, since each fold model has its own embedding space: the fold with the best
validation score. Features of the new corpus are extracted through the cache with the encoders
the model was trained on, and refused if those encoders' fingerprints changed since.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from hilbert.data.manifest import Manifest
from hilbert.features.batches import UNLABELLED_INDEX, DocumentFeatures, LabelMaps, check_timing
from hilbert.features.cache import CacheError, FeatureCache, FeatureSet
from hilbert.features.extract import extract_features
from hilbert.evaluation.predictions import embedding_diagnostics, predict_documents
from hilbert.metrics import classification_metrics
from hilbert.model.hilbert import HilbertModel
from hilbert.storage import write_parquet
from hilbert.train.checkpoint import CheckpointInfo, load_model


class ModelLocationError(ValueError):
    """A path that holds no loadable checkpoint, or features that do not fit the model."""


@dataclass
class Predictor:
    models: list[tuple[HilbertModel, CheckpointInfo]]
    source: Path

    @property
    def info(self) -> CheckpointInfo:
        return self.models[0][1]

    @property
    def label_maps(self) -> LabelMaps:
        return self.info.label_maps

    def best_model(self) -> tuple[HilbertModel, CheckpointInfo]:
        """The model with the best validation score (the only one for a single checkpoint)."""
        return max(self.models, key=lambda pair: pair[1].metrics.get("score", -math.inf))


def trained_temperature(info: CheckpointInfo) -> float:
    """The InfoNCE temperature the model ended training with (a checkpoint from before it was
    recorded: the configured initial temperature)."""
    if "temperature" in info.metrics:
        return float(info.metrics["temperature"])
    return float(info.training.get("loss", {}).get("temperature", 0.07))


def load_predictor(location: str | Path, device: str = "cpu") -> Predictor:
    """Load a checkpoint folder or a folder of fold checkpoints, without unpickling anything."""
    folder = Path(location)
    if (folder / "checkpoint.json").is_file():
        return Predictor([load_model(folder, device)], folder)
    folds = sorted(p for p in folder.glob("fold_*") if (p / "checkpoint.json").is_file())
    if not folds:
        raise ModelLocationError(f"{folder} holds no hilbert checkpoint (checkpoint.json) nor fold_*/ checkpoints")
    models = [load_model(p, device) for p in folds]
    first = models[0][1]
    for _, info in models[1:]:
        if info.label_maps != first.label_maps or info.features.get("audio_encoder") != first.features.get("audio_encoder"):
            raise ModelLocationError(f"{folder}: fold checkpoints disagree on tasks or encoders")
    return Predictor(models, folder)


def features_for(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, *, address: str | None = None
                 ) -> FeatureSet:
    """Extract (or reuse) the corpus's features with the model's encoders; check they match."""
    described = predictor.info.features
    report = extract_features(manifest, described["audio_encoder"], described["text_encoder"], cache_dir,
                              address=address, progress=False)
    feature_set = report.feature_set
    assert feature_set is not None
    check_encoders(predictor, {m: getattr(feature_set, f"{m}_fingerprint") for m in ("audio", "text")})
    return feature_set


def check_encoders(predictor: Predictor, fingerprints: dict[str, Any]) -> None:
    """Refuse features whose encoders (``modality -> fingerprint`` now) are not the ones the
    model was trained with."""
    described = predictor.info.features
    for modality, now in fingerprints.items():
        trained = described.get(f"{modality}_fingerprint")
        if trained and trained != now:
            raise ModelLocationError(
                f"the {modality} encoder {described[f'{modality}_encoder']!r} is not the one the model was trained "
                f"with (fingerprint changed: {json.dumps(trained)[:120]} -> {json.dumps(now)[:120]})")


def check_model_timing(predictor: Predictor, feature_set: FeatureSet) -> dict[str, Any] | None:
    """The timing columns the model reads (those its checkpoint names; None for a model trained
    without them, or before they existed); features whose timing columns differ are refused."""
    timing = predictor.info.features.get("timing")
    try:
        check_timing(feature_set, timing)
    except CacheError as error:
        raise ModelLocationError(f"{predictor.source}: the model was trained with segment timing features, "
                                 f"but {error}") from error
    return timing


def _dataset(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, feature_set: FeatureSet,
             with_labels: bool) -> DocumentFeatures:
    """The documents as the model was trained to read them: its ``max_segments`` and timing
    columns (:func:`check_model_timing`)."""
    if with_labels:
        return DocumentFeatures.for_documents(FeatureCache(cache_dir), feature_set, manifest.documents,
                                              predictor.label_maps, _max_segments(predictor),
                                              timing=check_model_timing(predictor, feature_set))
    return unlabelled_dataset(predictor, cache_dir, feature_set, [d.doc_id for d in manifest])


def unlabelled_dataset(predictor: Predictor, cache_dir: str | Path, feature_set: FeatureSet,
                       doc_ids: list[str]) -> DocumentFeatures:
    """``doc_ids`` of ``feature_set`` as the model reads them, without labels (to predict or embed)."""
    blank = [{task: UNLABELLED_INDEX for task in predictor.label_maps.tasks} for _ in doc_ids]
    return DocumentFeatures(FeatureCache(cache_dir), feature_set, doc_ids, blank, _max_segments(predictor),
                            timing=check_model_timing(predictor, feature_set))


def _max_segments(predictor: Predictor) -> int | None:
    return predictor.info.training.get("data", {}).get("max_segments")


def _predict_with_every_model(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, *,
                              address: str | None, with_labels: bool
                              ) -> tuple[DocumentFeatures, list[dict[str, np.ndarray]]]:
    """Each model's outputs (probabilities, embeddings, gates) over the corpus, in model order."""
    feature_set = features_for(predictor, manifest, cache_dir, address=address)
    dataset = _dataset(predictor, manifest, cache_dir, feature_set, with_labels)
    return dataset, every_model_outputs(predictor, dataset)


def every_model_outputs(predictor: Predictor, dataset: DocumentFeatures) -> list[dict[str, np.ndarray]]:
    """Each model's outputs over ``dataset``, in model order, each on the device it was loaded to
    (``load_predictor(location, device)``)."""
    return [predict_documents(model, dataset, next(model.parameters()).device) for model, _ in predictor.models]


def _mean_probabilities(predictor: Predictor, outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {task: np.mean([output[f"probabilities/{task}"] for output in outputs], axis=0)
            for task in predictor.label_maps.tasks}


def mean_probabilities(predictor: Predictor, dataset: DocumentFeatures) -> dict[str, np.ndarray]:
    """Class probabilities per task [documents, classes] over ``dataset``, averaged over the fold
    models: what ``hilbert predict`` writes, for features that are already at hand."""
    return _mean_probabilities(predictor, every_model_outputs(predictor, dataset))


def predict_probabilities(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, *,
                          address: str | None = None, with_labels: bool = False
                          ) -> tuple[DocumentFeatures, dict[str, np.ndarray]]:
    """Class probabilities per task [documents, classes], averaged over the fold models."""
    dataset, outputs = _predict_with_every_model(predictor, manifest, cache_dir, address=address,
                                                 with_labels=with_labels)
    return dataset, _mean_probabilities(predictor, outputs)


SeenPolicy = Literal["report", "exclude", "refuse"]


class SeenDocumentsError(ValueError):
    """Documents to score that the model trained on or chose its epoch on."""


def seen_in_training(predictor: Predictor, feature_set: FeatureSet, doc_ids: list[str]) -> list[str] | None:
    """Those of ``doc_ids`` (documents of ``feature_set``) that a model of ``predictor`` trained
    or chose its epoch on, matched by content (:meth:`FeatureSet.document_identity`), not by
    doc_id; None when a checkpoint does not record its documents (written before it could)."""
    recorded = [info.seen_documents for _, info in predictor.models]
    if any(identities is None for identities in recorded):
        return None
    seen = set().union(*recorded)
    return [doc_id for doc_id in doc_ids if feature_set.document_identity(doc_id) in seen]


def evaluate_corpus(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, *,
                    address: str | None = None, seen: SeenPolicy = "report") -> dict[str, float]:
    """Metrics of the model on a labelled corpus (unknown classes are refused, nulls ignored).

    Documents a fold model trained on or chose its epoch on make a score that is not held-out;
    ``seen`` says what to do with them: ``report`` scores every document and counts them in
    ``documents/seen_in_training``, ``exclude`` scores only the others, ``refuse`` raises
    :class:`SeenDocumentsError` naming them. ``documents/evaluated``: the documents scored.
    """
    feature_set = features_for(predictor, manifest, cache_dir, address=address)
    seen_ids = seen_in_training(predictor, feature_set, [doc.doc_id for doc in manifest])
    if seen_ids and seen == "refuse":
        shown = ", ".join(repr(doc_id) for doc_id in seen_ids[:5]) + (", ..." if len(seen_ids) > 5 else "")
        raise SeenDocumentsError(f"{len(seen_ids)} of {len(manifest)} documents of {manifest.path} were in the "
                                 f"training or validation split of the model at {predictor.source} ({shown}): "
                                 "scores on them are not held-out")
    if seen_ids and seen == "exclude":
        excluded = set(seen_ids)
        manifest = Manifest(manifest.path, [doc for doc in manifest if doc.doc_id not in excluded])
        if not manifest.documents:
            raise SeenDocumentsError(f"every document of {manifest.path} was in the training or validation split "
                                     f"of the model at {predictor.source}: none is left to score")
    dataset = _dataset(predictor, manifest, cache_dir, feature_set, with_labels=True)
    outputs = every_model_outputs(predictor, dataset)
    metrics: dict[str, float] = {"documents/evaluated": float(len(dataset))}
    if seen_ids is not None:
        metrics["documents/seen_in_training"] = float(len(seen_ids))
    for task, task_probabilities in _mean_probabilities(predictor, outputs).items():
        labels = np.array([row[task] for row in dataset.labels])
        metrics[f"{task}/labelled"] = float((labels >= 0).sum())
        for name, value in classification_metrics(labels, task_probabilities).items():
            metrics[f"{task}/{name}"] = value
    # Embedding diagnostics of one model: fold models' embedding spaces are not comparable.
    best = predictor.models.index(predictor.best_model())
    metrics.update(embedding_diagnostics(outputs[best], trained_temperature(predictor.models[best][1])))
    return metrics


def predictions_table(manifest: Manifest, label_maps: LabelMaps, probabilities: dict[str, np.ndarray]) -> pa.Table:
    """doc_id, then per task the predicted class and one probability column per class."""
    return probability_columns([d.doc_id for d in manifest], label_maps, probabilities)


def probability_columns(doc_ids: list[str], label_maps: LabelMaps, probabilities: dict[str, np.ndarray]) -> pa.Table:
    """:func:`predictions_table` of the documents ``doc_ids`` (rows of ``probabilities``)."""
    columns: dict[str, Any] = {"doc_id": list(doc_ids)}
    for task, classes in label_maps.classes.items():
        columns[f"{task}"] = [classes[i] for i in probabilities[task].argmax(axis=1)]
        for index, name in enumerate(classes):
            columns[f"{task}/p/{name}"] = probabilities[task][:, index].astype(np.float32)
    return pa.table(columns)


def write_predictions(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, path: str | Path, *,
                      address: str | None = None) -> Path:
    """Predict every task for the documents of ``manifest`` and write :func:`predictions_table`
    to the Parquet file ``path`` (whole or not at all)."""
    _, probabilities = predict_probabilities(predictor, manifest, cache_dir, address=address)
    return write_parquet(predictions_table(manifest, predictor.label_maps, probabilities), path)


def embeddings_table(predictor: Predictor, manifest: Manifest, cache_dir: str | Path, *,
                     address: str | None = None) -> pa.Table:
    """Per document: audio, text and joint embeddings and the segment pooling weights."""
    feature_set = features_for(predictor, manifest, cache_dir, address=address)
    dataset = _dataset(predictor, manifest, cache_dir, feature_set, with_labels=False)
    return pa.table(embedding_rows(predictor, dataset))


EMBEDDING_COLUMNS = ("audio_embedding", "text_embedding", "joint_embedding", "audio_pooling", "text_pooling",
                     "joint_pooling")


def embedding_rows(predictor: Predictor, dataset: DocumentFeatures) -> dict[str, list]:
    """Columns doc_id, segments and :data:`EMBEDDING_COLUMNS` (lists of floats, None where the
    model has no such output) of ``dataset``'s documents, from the best fold model."""
    model, _ = predictor.best_model()
    rows: dict[str, list] = {"doc_id": [], "segments": []}
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            audio = torch.from_numpy(item["audio"])[None]
            text = torch.from_numpy(item["text"])[None]
            output = model.embed(audio, text, torch.ones(1, audio.shape[1], dtype=torch.bool))
            rows["doc_id"].append(dataset.doc_ids[index])
            rows["segments"].append(int(audio.shape[1]))
            for name in EMBEDDING_COLUMNS:
                value = getattr(output, name, None)
                rows.setdefault(name, []).append(None if value is None else value[0].float().numpy().tolist())
    return rows
