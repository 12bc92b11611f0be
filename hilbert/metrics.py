"""Evaluation metrics as the paper reports them, robust to small, imbalanced validation folds.

All functions take numpy arrays; labels are integer class indices with -1 for "unlabelled",
which every metric ignores.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score


def macro_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``labels``.

    ``probabilities`` is [N, C]. A class with no positive (or no negative) document in the fold
    has no defined AUC and is left out of the mean instead of failing the fold; with fewer than
    two classes present the result is NaN. Binary tasks give the usual AUC of class 1.
    """
    labels, probabilities = _labelled(labels, probabilities)
    present = np.unique(labels)
    if present.size < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels == 1, probabilities[:, 1]))
    scores = [roc_auc_score(labels == c, probabilities[:, c]) for c in present]
    return float(np.mean(scores))


def balanced_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean per-class recall of the arg-max prediction (chance = 1 / classes present)."""
    labels, probabilities = _labelled(labels, probabilities)
    if labels.size == 0:
        return math.nan
    with warnings.catch_warnings():  # a prediction of a class absent from labels is a wrong one, nothing more
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(labels, probabilities.argmax(axis=1)))


def macro_f1(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions."""
    labels, probabilities = _labelled(labels, probabilities)
    if labels.size == 0:
        return math.nan
    return float(f1_score(labels, probabilities.argmax(axis=1), average="macro", zero_division=0))


def recall_at_k(queries: np.ndarray, keys: np.ndarray, k: int) -> float:
    """Share of queries whose own key (same row) is among the k most cosine-similar keys."""
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    similarity = queries @ keys.T
    own = np.diag(similarity)
    # rank = how many keys beat the true one; ties count against the query (no lucky ties)
    rank = (similarity > own[:, None]).sum(axis=1) + (similarity == own[:, None]).sum(axis=1) - 1
    return float(np.mean(rank < k))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"auc": macro_auc(labels, probabilities),
            "balanced_accuracy": balanced_accuracy(labels, probabilities),
            "macro_f1": macro_f1(labels, probabilities)}


def _labelled(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    keep = labels >= 0
    return labels[keep], probabilities[keep]
