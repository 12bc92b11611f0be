"""A model over documents: class probabilities, embeddings, and the metrics of one split."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hilbert.features.batches import DocumentFeatures, LabelMaps, collate_documents
from hilbert.losses import info_nce, information_balance, linear_cka
from hilbert.metrics import classification_metrics, recall_at_k
from hilbert.model.hilbert import HilbertModel


@torch.no_grad()
def predict_documents(model: HilbertModel, dataset: DocumentFeatures, device: torch.device, batch_size: int = 32
                      ) -> dict[str, Any]:
    """Run ``model`` over ``dataset``: probabilities per task, embeddings and gate probabilities."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_documents)
    outputs: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        output = model(batch["audio"].to(device), batch["text"].to(device), batch["mask"].to(device))
        pieces = {f"probabilities/{task}": torch.softmax(logits.float(), dim=-1) for task, logits in output.logits.items()}
        pieces.update({"audio": output.audio_embedding, "text": output.text_embedding, "joint": output.joint_embedding,
                       "gates": output.gate_probs})
        for name, value in pieces.items():
            if value is not None:
                outputs.setdefault(name, []).append(value.float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def task_metrics(labels: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``<task>/auc``, ``<task>/balanced_accuracy``, ``<task>/macro_f1`` of every task."""
    metrics: dict[str, float] = {}
    for task, task_labels in labels.items():
        for name, value in classification_metrics(task_labels, probabilities[task]).items():
            metrics[f"{task}/{name}"] = value
    return metrics


def evaluate(model: HilbertModel, dataset: DocumentFeatures, label_maps: LabelMaps, device: torch.device,
             temperature: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``model`` on ``dataset`` (per-task AUC / balanced accuracy / F1, retrieval, CKA,
    balance, experts; see :func:`embedding_diagnostics`) and the raw outputs they came from."""
    predicted = predict_documents(model, dataset, device)
    labels = {task: np.array([lab[task] for lab in dataset.labels]) for task in label_maps.tasks}
    metrics = task_metrics(labels, {task: predicted[f"probabilities/{task}"] for task in label_maps.tasks})
    metrics.update(embedding_diagnostics(predicted, temperature))
    return metrics, predicted


def embedding_diagnostics(predicted: Mapping[str, np.ndarray], temperature: float) -> dict[str, float]:
    """Retrieval recall@k modality->joint, CKA(modality, joint), balance gap and the information
    balance estimate (``balance/...``: each modality's InfoNCE bound against the joint and their
    normalised gap), expert use.

    ``temperature`` is the model's own (trained) InfoNCE temperature: the balance gap compares
    the two contrastive terms the model was trained with, at the scale it was trained at.
    """
    metrics: dict[str, float] = {}
    joint = predicted["joint"]
    contrastive: dict[str, float] = {}
    for modality in ("audio", "text"):
        if modality not in predicted:
            continue
        embedding = predicted[modality]
        for k in (1, 5):
            metrics[f"recall@{k}/{modality}_joint"] = recall_at_k(embedding, joint, k)
        x, y = torch.from_numpy(embedding), torch.from_numpy(joint)
        # The unbiased estimator (n >= 4) does not read small folds as aligned by chance.
        metrics[f"cka/{modality}_joint"] = float(linear_cka(x, y, unbiased=len(x) >= 4))
        contrastive[modality] = float(info_nce(nn.functional.normalize(x, dim=-1), nn.functional.normalize(y, dim=-1),
                                               temperature))
    if len(contrastive) == 2:
        # InfoNCE bounds I(m; j) >= log N - L: the gap of the two losses is the gap of the bounds.
        metrics["balance_gap"] = abs(contrastive["audio"] - contrastive["text"])
        if len(joint) >= 2:  # the normalised estimate (hilbert.losses.information_balance)
            balance = information_balance(*(torch.from_numpy(predicted[m]) for m in ("audio", "text", "joint")),
                                          temperature)
            metrics.update({"balance/audio_bound": float(balance.audio), "balance/text_bound": float(balance.text),
                            "balance/imbalance": float(balance.imbalance)})
    if "gates" in predicted:
        usage = predicted["gates"].mean(axis=0)
        metrics["experts/max_share"] = float(usage.max())
        metrics["experts/entropy"] = float(-(usage * np.log(np.maximum(usage, 1e-12))).sum() / math.log(len(usage)))
    return metrics


def objective_score(metrics: Mapping[str, float], tasks: Sequence[str], objective_tasks: Sequence[str] | None = None,
                    objective_weights: Mapping[str, float] | None = None) -> float:
    """Weighted mean macro AUC over the objective's tasks (a task with an undefined AUC is left out):
    the score an epoch is chosen by (on validation documents) and a fold is reported by (on test)."""
    weights = objective_weights or {}
    chosen = objective_tasks or (list(weights) if weights else list(tasks))
    pairs = [(metrics.get(f"{task}/auc", math.nan), weights.get(task, 1.0) if weights else 1.0) for task in chosen]
    pairs = [(value, weight) for value, weight in pairs if not math.isnan(value) and weight > 0]
    total = sum(weight for _, weight in pairs)
    return float(sum(value * weight for value, weight in pairs) / total) if total > 0 else math.nan
