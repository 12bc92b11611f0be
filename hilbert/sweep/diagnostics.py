"""Out-of-fold outputs of a trial's fold models, and the figures made from them.

A trial ends with one model per cross-validation fold. Every document was held out by exactly
one of them, so predicting each fold's validation documents with that fold's model gives one
honest prediction per document (out-of-fold), never seen in training: the ROC curves and
confusion matrices of the whole corpus rather than of one small fold.

Embeddings, gates and pooling weights are different: each fold model has its own embedding
space and its own numbering of experts, so pooling them across folds compares unrelated
coordinates. They are kept for every document (with the fold that produced them), but the CKA,
expert and attention figures read the documents of one fold model only (``reference_fold``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from hilbert.features.batches import DocumentFeatures, collate_documents
from hilbert.features.cache import FeatureCache
from hilbert.model.hilbert import HilbertModel
from hilbert.sweep.plots import confusion_matrices, cka_matrix, expert_utilisation, roc_curves, segment_attention
from hilbert.train.checkpoint import load_model
from hilbert.train.loop import Plan, fold_dataset, predict_documents

EMBEDDINGS = ("audio", "text", "joint")


@dataclass
class OutOfFold:
    """Every document's prediction by the model of its own fold, rows in corpus order.

    ``embeddings`` holds the spaces the model has (``audio``/``text`` only where the variant uses
    that modality, always ``joint``); ``gates`` is None for a linear head. ``attention`` holds
    the joint pooling weights ``[heads, modalities, segments]`` of ``attention_doc_ids`` (the
    first documents of ``reference_fold``), cut to each document's real segments.
    """

    doc_ids: list[str]
    folds: np.ndarray  # [N] the fold whose model predicted each document
    labels: dict[str, np.ndarray]  # task -> [N] class index, -1 unlabelled
    probabilities: dict[str, np.ndarray]  # task -> [N, C]
    embeddings: dict[str, np.ndarray]  # space -> [N, d_embed]
    gates: np.ndarray | None  # [N, experts]
    classes: dict[str, list[str]]  # task -> class names
    modalities: tuple[str, ...]
    reference_fold: int
    attention: list[np.ndarray] = field(default_factory=list)
    attention_doc_ids: list[str] = field(default_factory=list)

    def rows_of(self, fold: int) -> np.ndarray:
        """Boolean mask of the documents predicted by ``fold``'s model."""
        return self.folds == fold


def out_of_fold_outputs(folds_dir: str | Path, plan: Mapping[str, Any], device: str | torch.device = "cpu",
                        attention_documents: int = 3) -> OutOfFold:
    """Predict each fold's validation documents with ``folds_dir/fold_<i>``; pool in corpus order.

    ``plan`` is the JSON the trial trained from (:func:`hilbert.train.run.make_plan`); every fold
    it lists must have its checkpoint folder, or the out-of-fold set would silently lose documents.
    """
    parsed = Plan.from_json(dict(plan))
    device = torch.device(device)
    cache = FeatureCache(parsed.cache_dir)
    pieces: list[dict[str, np.ndarray]] = []
    doc_ids: list[str] = []
    folds: list[int] = []
    attention: list[np.ndarray] = []
    attention_doc_ids: list[str] = []
    modalities: tuple[str, ...] = ()
    for fold in parsed.folds:
        model = _fold_model(Path(folds_dir), fold, parsed, device)
        modalities = model.config.modalities
        validation = fold_dataset(parsed, cache, fold, validation=True)
        if not len(validation):
            continue
        pieces.append(predict_documents(model, validation, device))
        doc_ids += validation.doc_ids
        folds += [fold] * len(validation)
        if fold == parsed.folds[0] and attention_documents > 0:
            attention = pooling_weights(model, validation, range(min(attention_documents, len(validation))), device)
            attention_doc_ids = validation.doc_ids[:len(attention)]
    corpus_position = {doc_id: position for position, doc_id in enumerate(parsed.fold_of)}
    order = np.argsort([corpus_position[d] for d in doc_ids], kind="stable")
    pooled = {name: np.concatenate([piece[name] for piece in pieces])[order] for name in pieces[0]} if pieces else {}
    ordered_ids = [doc_ids[i] for i in order]
    tasks = parsed.label_maps.tasks
    return OutOfFold(
        doc_ids=ordered_ids, folds=np.asarray(folds, dtype=int)[order],
        labels={task: np.array([parsed.labels[d][task] for d in ordered_ids], dtype=int) for task in tasks},
        probabilities={task: pooled[f"probabilities/{task}"] for task in tasks if f"probabilities/{task}" in pooled},
        embeddings={name: pooled[name] for name in EMBEDDINGS if name in pooled}, gates=pooled.get("gates"),
        classes={task: list(names) for task, names in parsed.label_maps.classes.items()}, modalities=modalities,
        reference_fold=parsed.folds[0], attention=attention, attention_doc_ids=attention_doc_ids)


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


def trial_figures(outputs: OutOfFold, classes: Mapping[str, Sequence[str]] | None = None) -> dict[str, Figure]:
    """Figures for a trial's run, by artifact name.

    ROC curves and confusion matrices pool every out-of-fold prediction; CKA, expert use and
    segment attention come from the reference fold's model alone (see the module docstring).
    ``classes`` defaults to the plan's class names.
    """
    classes = classes if classes is not None else outputs.classes
    figures = {"roc_curves": roc_curves(outputs.labels, outputs.probabilities, classes),
               "confusion_matrices": confusion_matrices(outputs.labels, outputs.probabilities, classes)}
    rows = outputs.rows_of(outputs.reference_fold)
    if rows.sum() >= 2:
        figures["cka"] = cka_matrix({name: embedding[rows] for name, embedding in outputs.embeddings.items()})
    if outputs.gates is not None and rows.any():
        figures["expert_utilisation"] = expert_utilisation(outputs.gates[rows])
    if outputs.attention:
        figures["segment_attention"] = segment_attention(outputs.attention, outputs.attention_doc_ids,
                                                         outputs.modalities)
    return figures
