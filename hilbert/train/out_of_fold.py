"""Test predictions of a run's fold models: every document predicted by the model that never
saw it (out-of-fold), the rows every reported figure of a cross-validated run comes from.

Each outer fold's model predicts that fold's test documents; with ``cv.repeats`` > 1 every
document is predicted once per repeat. Probabilities of all rows are comparable (they are
what the pooled AUC and the paired comparisons use). Embeddings, gates and pooling weights are
different: each fold model has its own embedding space and its own numbering of experts, so
pooling them across folds compares unrelated coordinates. They are kept for every row (with the
fold that produced them), but figures read the documents of one fold model only
(``reference_fold``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from hilbert.evaluation.predictions import predict_documents
from hilbert.evaluation.summary import OutOfFoldPredictions
from hilbert.features.batches import DocumentFeatures, collate_documents
from hilbert.features.cache import FeatureCache
from hilbert.model.hilbert import HilbertModel
from hilbert.train.checkpoint import load_model
from hilbert.train.plan import Plan, fold_dataset

EMBEDDINGS = ("audio", "text", "joint")


@dataclass
class OutOfFold:
    """Every test prediction of a run's fold models: rows of each repeat in corpus order.

    ``embeddings`` holds the spaces the model has (``audio``/``text`` only where the variant uses
    that modality, always ``joint``); ``gates`` is None for a linear head. ``attention`` holds
    the joint pooling weights ``[heads, modalities, segments]`` of ``attention_doc_ids`` (the
    first documents of ``reference_fold``), cut to each document's real segments.
    """

    doc_ids: list[str]
    folds: np.ndarray  # [N] the fold whose model predicted each row
    repeats: np.ndarray  # [N] the repeat of that fold
    labels: dict[str, np.ndarray]  # task -> [N] class index, -1 unlabelled
    probabilities: dict[str, np.ndarray]  # task -> [N, C]
    embeddings: dict[str, np.ndarray]  # space -> [N, d_embed]
    gates: np.ndarray | None  # [N, experts]
    classes: dict[str, list[str]]  # task -> class names
    modalities: tuple[str, ...]
    reference_fold: int
    attention: list[np.ndarray] = field(default_factory=list)
    attention_doc_ids: list[str] = field(default_factory=list)
    # modality -> [fold models, layers]: each fold model's learned weights over its encoder's
    # layers (layer=all features only; empty otherwise)
    layer_weights: dict[str, np.ndarray] = field(default_factory=dict)

    def rows_of(self, fold: int) -> np.ndarray:
        """Boolean mask of the documents predicted by ``fold``'s model."""
        return self.folds == fold

    def first_repeat(self) -> np.ndarray:
        """Boolean mask of the rows of the first repeat: each document exactly once."""
        return self.repeats == (self.repeats.min() if len(self.repeats) else 0)

    def test_predictions(self, groups: Mapping[str, str]) -> OutOfFoldPredictions:
        """The rows as :class:`OutOfFoldPredictions` (what summaries read); ``groups`` maps doc_id to
        its group (documents without one are their own group)."""
        return OutOfFoldPredictions(list(self.doc_ids), [groups.get(d, d) for d in self.doc_ids], self.folds.copy(),
                               self.repeats.copy(), dict(self.labels), dict(self.probabilities))


def out_of_fold_outputs(folds_dir: str | Path, plan: Mapping[str, Any], device: str | torch.device = "cpu",
                        attention_documents: int = 3) -> OutOfFold:
    """Predict each fold's test documents with ``folds_dir/fold_<i>``; rows of each repeat in
    corpus order.

    ``plan`` is the JSON the trial trained from (:func:`hilbert.train.run.make_plan`); every fold
    it lists must have its checkpoint folder, or the out-of-fold set would silently lose documents.
    """
    parsed = Plan.from_json(dict(plan))
    device = torch.device(device)
    cache = FeatureCache(parsed.cache_dir)
    pieces: list[dict[str, np.ndarray]] = []
    doc_ids: list[str] = []
    folds: list[int] = []
    repeats: list[int] = []
    attention: list[np.ndarray] = []
    attention_doc_ids: list[str] = []
    modalities: tuple[str, ...] = ()
    layer_weights: dict[str, list[np.ndarray]] = {}
    for entry in parsed.folds:
        fold = entry["index"]
        model = _fold_model(Path(folds_dir), fold, parsed, device)
        modalities = model.config.modalities
        for modality, weights in model.layer_weights().items():
            layer_weights.setdefault(modality, []).append(weights.cpu().numpy())
        test = fold_dataset(parsed, cache, fold, "test")
        if not len(test):
            continue
        pieces.append(predict_documents(model, test, device))
        doc_ids += test.doc_ids
        folds += [fold] * len(test)
        repeats += [entry["repeat"]] * len(test)
        if fold == parsed.fold_indices[0] and attention_documents > 0:
            attention = pooling_weights(model, test, range(min(attention_documents, len(test))), device)
            attention_doc_ids = test.doc_ids[:len(attention)]
    corpus_position = {doc_id: position for position, doc_id in enumerate(parsed.labels)}
    order = np.lexsort(([corpus_position[d] for d in doc_ids], repeats))
    pooled = {name: np.concatenate([piece[name] for piece in pieces])[order] for name in pieces[0]} if pieces else {}
    ordered_ids = [doc_ids[i] for i in order]
    tasks = parsed.label_maps.tasks
    return OutOfFold(
        doc_ids=ordered_ids, folds=np.asarray(folds, dtype=int)[order], repeats=np.asarray(repeats, dtype=int)[order],
        labels={task: np.array([parsed.labels[d][task] for d in ordered_ids], dtype=int) for task in tasks},
        probabilities={task: pooled[f"probabilities/{task}"] for task in tasks if f"probabilities/{task}" in pooled},
        embeddings={name: pooled[name] for name in EMBEDDINGS if name in pooled}, gates=pooled.get("gates"),
        classes={task: list(names) for task, names in parsed.label_maps.classes.items()}, modalities=modalities,
        reference_fold=parsed.fold_indices[0], attention=attention, attention_doc_ids=attention_doc_ids,
        layer_weights={modality: np.stack(weights) for modality, weights in layer_weights.items()})


def _fold_model(folds_dir: Path, fold: int, plan: Plan, device: torch.device) -> HilbertModel:
    folder = folds_dir / f"fold_{fold}"
    if not (folder / "checkpoint.json").is_file():
        raise FileNotFoundError(f"no model for fold {fold}: {folder} holds no checkpoint.json")
    model, info = load_model(folder, device)
    trained_fold = info.training.get("fold", fold)
    if trained_fold != fold or dict(info.label_maps.classes) != dict(plan.label_maps.classes):
        raise ValueError(f"{folder} was trained for fold {trained_fold} with classes "
                         f"{dict(info.label_maps.classes)}, not for this plan's fold {fold}")
    return model


@torch.no_grad()
def pooling_weights(model: HilbertModel, dataset: DocumentFeatures, indices: Sequence[int],
                    device: torch.device) -> list[np.ndarray]:
    """Joint pooling weights ``[heads, modalities, segments]`` of some documents, padding cut off."""
    indices = list(indices)
    if not indices:
        return []
    model.eval()
    batch = collate_documents([dataset[i] for i in indices])
    mask = batch["mask"].to(device)
    embedded = model.embed(batch["audio"].to(device), batch["text"].to(device), mask)
    weights = embedded.joint_pooling.float().cpu().numpy()
    lengths = mask.sum(dim=1).tolist()
    return [weights[row, ..., :length] for row, length in enumerate(lengths)]




def predictions_table(predictions: OutOfFoldPredictions, classes: Mapping[str, Sequence[str]]) -> pa.Table:
    """One row per (repeat, document, task): doc_id, repeat, fold, task, the true label (null
    when unlabelled), the predicted class and the class probabilities (in the order of the
    schema's ``classes`` metadata, a JSON object task -> class names)."""
    columns: dict[str, list[Any]] = {name: [] for name in
                                     ("doc_id", "repeat", "fold", "task", "label", "predicted", "probabilities")}
    for task, names in classes.items():
        labels, probabilities = predictions.labels[task], predictions.probabilities[task]
        for row, doc_id in enumerate(predictions.doc_ids):
            columns["doc_id"].append(doc_id)
            columns["repeat"].append(int(predictions.repeats[row]))
            columns["fold"].append(int(predictions.folds[row]))
            columns["task"].append(task)
            columns["label"].append(names[labels[row]] if labels[row] >= 0 else None)
            columns["predicted"].append(names[int(np.argmax(probabilities[row]))])
            columns["probabilities"].append(probabilities[row].astype(np.float32).tolist())
    table = pa.table({**{k: v for k, v in columns.items() if k != "probabilities"},
                      "probabilities": pa.array(columns["probabilities"], type=pa.list_(pa.float32()))})
    return table.replace_schema_metadata({"classes": json.dumps({t: list(n) for t, n in classes.items()})})
