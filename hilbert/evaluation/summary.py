"""The numbers reported for a cross-validated method, and how sure they are.

Two views of the same test predictions, each with its convention fixed here and nowhere else:

* **Fold table**: a metric per outer test fold, then its mean and *sample* standard deviation
  (``ddof=1``) over the folds where it is defined, and how many those were (an AUC is undefined
  on a fold with a single class of that task; such folds are counted, never silently dropped).
* **Pooled out-of-fold AUC**: every document is a test document of exactly one fold per repeat,
  so each repeat's test predictions cover the corpus once; the pooled AUC is the macro AUC of
  those predictions, averaged over repeats.

Uncertainty comes from a **cluster bootstrap over groups** (speakers, calls: the documents that
the split keeps together, or single documents without a group): each replicate draws groups with
replacement, which weights every document by how often its group was drawn. The 95 % interval
is the 2.5th to 97.5th percentile of the replicates' pooled AUC. Two methods scored on the same
documents are compared **paired**: the same replicates score both, the interval of the AUC
difference ``method - reference`` is read off the same way, and its two-sided bootstrap p-value
is ``min(1, 2 * min(P(diff <= 0), P(diff >= 0)))``. A difference is called real when its
interval excludes 0.

The weighted AUC of a replicate is the Mann-Whitney statistic with weights,
``sum_{i pos} sum_{j neg} w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (sum_pos w * sum_neg w)``,
computed for all replicates at once from one sort of the scores.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

BOOTSTRAP_REPLICATES = 2000
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------------------------
# Fold tables


@dataclass
class FoldTable:
    """Per-fold metrics with their mean, sample standard deviation and count of defined folds."""

    folds: dict[int, dict[str, float]]
    names: list[str]
    mean: dict[str, float]
    std: dict[str, float]
    defined: dict[str, int]

    @classmethod
    def from_folds(cls, per_fold: Mapping[int, Mapping[str, float]]) -> "FoldTable":
        folds = {int(fold): {k: float(v) for k, v in metrics.items()} for fold, metrics in sorted(per_fold.items())}
        names = sorted({name for metrics in folds.values() for name in metrics})
        mean, std, defined = {}, {}, {}
        for name in names:
            values = np.array([m[name] for m in folds.values() if name in m and math.isfinite(m[name])])
            mean[name] = float(values.mean()) if values.size else math.nan
            std[name] = float(values.std(ddof=1)) if values.size > 1 else math.nan
            defined[name] = int(values.size)
        return cls(folds, names, mean, std, defined)

    def to_json(self) -> dict[str, Any]:
        return {"folds": {str(f): _clean(m) for f, m in self.folds.items()}, "mean": _clean(self.mean),
                "std": _clean(self.std), "defined": dict(self.defined)}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["fold", *self.names])
        rows = [(str(f), m) for f, m in self.folds.items()] + [("mean", self.mean), ("std", self.std)]
        for label, metrics in rows:
            writer.writerow([label, *(_csv_number(metrics.get(name, math.nan)) for name in self.names)])
        writer.writerow(["defined", *(self.defined[name] for name in self.names)])
        return out.getvalue()


def _clean(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # JSON has no NaN


def _csv_number(value: float) -> str:
    return "" if not math.isfinite(value) else repr(value)


# ---------------------------------------------------------------------------------------------
# Out-of-fold predictions


@dataclass
class OutOfFoldPredictions:
    """Every test prediction of one method: one row per (repeat, document), rows of a repeat in
    corpus order, so two methods of one split line up row for row."""

    doc_ids: list[str]
    groups: list[str]  # what the bootstrap resamples (a document's group, else the document)
    folds: np.ndarray  # [M] outer fold index of the model that predicted the row
    repeats: np.ndarray  # [M]
    labels: dict[str, np.ndarray]  # task -> [M] class index, -1 unlabelled
    probabilities: dict[str, np.ndarray]  # task -> [M, C]

    def aligned_with(self, other: "OutOfFoldPredictions") -> bool:
        return self.doc_ids == other.doc_ids and np.array_equal(self.repeats, other.repeats)


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUC of ``scores`` [N] for each row of ``weights`` [B, N]; NaN where
    a replicate has no positive or no negative weight."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * negative[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)
    auc[(total_pos <= 0) | (total_neg <= 0)] = np.nan
    return auc


def weighted_macro_auc(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC for each row of ``weights`` [B, N] (conventions of
    :func:`hilbert.metrics.macro_auc`: unlabelled rows ignored, a binary task is the AUC of
    class 1, a class absent from a replicate is left out of its mean)."""
    labelled = labels >= 0
    weights = weights * labelled
    n_classes = probabilities.shape[1]
    classes = [1] if n_classes == 2 else range(n_classes)
    per_class = np.stack([_weighted_auc(probabilities[:, c], (labels == c) & labelled, (labels != c) & labelled,
                                        weights) for c in classes])
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(per_class), axis=0)
        macro = np.nansum(per_class, axis=0) / np.maximum(counts, 1)
    macro[counts == 0] = np.nan
    # A binary replicate with one class only has no AUC (as macro_auc); multi-class needs two present.
    if n_classes > 2:
        present = np.stack([(weights * ((labels == c) & labelled)).sum(axis=1) > 0 for c in range(n_classes)])
        macro[present.sum(axis=0) < 2] = np.nan
    return macro


def group_bootstrap_weights(groups: Sequence[str], replicates: int, seed: int) -> np.ndarray:
    """[replicates, N]: how many times each row's group was drawn in each replicate (the first
    row is the original sample: every weight 1)."""
    names, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(replicates, len(names)))
    counts = np.zeros((replicates, len(names)))
    np.add.at(counts, (np.repeat(np.arange(replicates), len(names)), draws.ravel()), 1.0)
    return np.vstack([np.ones(len(groups)), counts[:, index]])


def pooled_auc(predictions: OutOfFoldPredictions, task: str, weights: np.ndarray) -> np.ndarray:
    """Pooled out-of-fold macro AUC of ``task`` (mean over repeats) for each row of ``weights``."""
    per_repeat = []
    for repeat in np.unique(predictions.repeats):
        rows = predictions.repeats == repeat
        per_repeat.append(weighted_macro_auc(predictions.labels[task][rows], predictions.probabilities[task][rows],
                                             weights[:, rows]))
    with np.errstate(all="ignore"):
        return np.nanmean(np.stack(per_repeat), axis=0) if per_repeat else np.full(len(weights), np.nan)


def _interval(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return [None, None]
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def compare_methods(predictions: Mapping[str, OutOfFoldPredictions], fold_tables: Mapping[str, FoldTable],
                    tasks: Sequence[str], reference: str | None, *, replicates: int = BOOTSTRAP_REPLICATES,
                    seed: int = 0, fold_metric: str = "{task}/auc") -> dict[str, dict[str, dict[str, Any]]]:
    """method -> task -> the reported figures of ``task``:

    ``pooled_auc`` and its ``ci95``, ``fold_mean``/``fold_std`` of the test AUC with
    ``folds_defined`` of ``folds``, and against ``reference`` (when given and not the method
    itself) ``vs_reference``: ``difference``, its ``ci95``, ``p`` and ``differs``. Every method
    is resampled with the same replicates, so the comparisons are paired. ``fold_metric`` names
    a task's AUC in the fold tables.
    """
    methods = list(predictions)
    if not methods:
        return {}
    first = predictions[methods[0]]
    for name in methods[1:]:
        if not predictions[name].aligned_with(first):
            raise ValueError(f"test predictions of {name!r} and {methods[0]!r} are not of the same documents")
    rows_per_repeat = first.repeats == first.repeats[0] if len(first.repeats) else np.zeros(0, dtype=bool)
    base = group_bootstrap_weights([g for g, keep in zip(first.groups, rows_per_repeat) if keep], replicates, seed)
    # The same group weights for a document in every repeat.
    position = {doc: i for i, doc in enumerate(d for d, keep in zip(first.doc_ids, rows_per_repeat) if keep)}
    weights = base[:, [position[d] for d in first.doc_ids]]
    curves = {name: {task: pooled_auc(predictions[name], task, weights) for task in tasks} for name in methods}
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for name in methods:
        table = fold_tables.get(name)
        report[name] = {}
        for task in tasks:
            values = curves[name][task]
            key = fold_metric.format(task=task)
            entry: dict[str, Any] = {
                "pooled_auc": _number(values[0]), "ci95": _interval(values[1:]),
                "fold_mean": _number(table.mean.get(key, math.nan)) if table else None,
                "fold_std": _number(table.std.get(key, math.nan)) if table else None,
                "folds_defined": table.defined.get(key, 0) if table else 0,
                "folds": len(table.folds) if table else 0,
            }
            if reference in curves and name != reference:
                difference = values - curves[reference][task]
                replicas = difference[1:][np.isfinite(difference[1:])]
                p = (min(1.0, 2 * min(np.mean(replicas <= 0), np.mean(replicas >= 0))) if replicas.size else math.nan)
                interval = _interval(difference[1:])
                entry["vs_reference"] = {
                    "reference": reference, "difference": _number(difference[0]), "ci95": interval,
                    "p": _number(float(p)),
                    "differs": bool(interval[0] is not None and (interval[0] > 0 or interval[1] < 0))}
            report[name][task] = entry
    return report
