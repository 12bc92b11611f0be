"""Figures of a trained model for a trial's run: ROC curves, confusion matrices, CKA between
embedding spaces, expert utilisation, segment attention and learned layer weights.

Every function takes numpy arrays and returns a :class:`matplotlib.figure.Figure` built without
pyplot: no global figure registry to leak memory over hundreds of trials, no GUI backend (the
figures render with Agg when saved), and no MLflow here -- ``TrialTracker.log_figures`` logs them.
Labels are class indices with -1 for unlabelled, as everywhere in hilbert.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from hilbert.losses import linear_cka

_PANEL = 3.6  # inches per subplot


def _panels(count: int, columns: int = 3, height: float = _PANEL, layout: str | None = "constrained"
            ) -> tuple[Figure, list]:
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    figure = Figure(figsize=(_PANEL * columns, height * rows), layout=layout)
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[count:]:
        unused.set_axis_off()
    return figure, axes[:count]


def _margins_in_inches(figure: Figure, *, left: float, right: float, bottom: float, top: float,
                       rows: int = 1, between: float = 0.0) -> None:
    """Fixed margins (and ``between`` stacked panels) for figures whose labels have a known size:
    constrained layout measures every text first, which costs more than drawing these figures
    (~0.2 s a trial). The figures with class names of any length keep constrained layout."""
    width, height = figure.get_size_inches()
    panel = (height - top - bottom - between * (rows - 1)) / rows
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           hspace=between / panel)


def _class_names(task: str, n_classes: int, classes: Mapping[str, Sequence[str]] | None) -> list[str]:
    return list(classes[task]) if classes and task in classes else [str(i) for i in range(n_classes)]


def _labelled(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    keep = labels >= 0
    return labels[keep], np.asarray(probabilities, dtype=np.float64)[keep]


def roc_curves(labels: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray],
               classes: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """One panel per task, one one-vs-rest ROC curve per class (``probabilities[task]`` is
    ``[N, C]``). A class without positive or without negative documents has no curve; the legend
    says so instead of failing."""
    figure, axes = _panels(len(probabilities))
    for ax, (task, task_probabilities) in zip(axes, probabilities.items()):
        y, p = _labelled(labels[task], task_probabilities)
        for index, name in enumerate(_class_names(task, p.shape[1], classes)):
            positive = y == index
            if positive.all() or not positive.any():
                ax.plot([], [], linestyle="none", label=f"{name}: absent" if not positive.any() else f"{name}: only class")
                continue
            false_positive, true_positive, _ = roc_curve(positive, p[:, index])
            ax.plot(false_positive, true_positive, label=f"{name} (AUC {roc_auc_score(positive, p[:, index]):.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{task} (n={y.size})", xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize="small", loc="lower right")
    return figure


def confusion_matrices(labels: Mapping[str, np.ndarray], probabilities: Mapping[str, np.ndarray],
                       classes: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """Per task, the arg-max confusion matrix normalised per true class (rows), with counts.
    Every class keeps its row and column, an absent one as zeros."""
    figure, axes = _panels(len(probabilities))
    for ax, (task, task_probabilities) in zip(axes, probabilities.items()):
        y, p = _labelled(labels[task], task_probabilities)
        names = _class_names(task, p.shape[1], classes)
        counts = confusion_matrix(y, p.argmax(axis=1), labels=list(range(len(names)))) if y.size else \
            np.zeros((len(names), len(names)), dtype=int)
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for (row, column), count in np.ndenumerate(counts):
            ax.text(column, row, str(count), ha="center", va="center",
                    color="white" if shares[row, column] > 0.5 else "black", fontsize="small")
        ticks = range(len(names))
        ax.set(title=task, xlabel="predicted", ylabel="true", xticks=ticks, yticks=ticks)
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_yticklabels(names)
    return figure


def cka_between(embeddings: Mapping[str, np.ndarray], unbiased: bool = True) -> np.ndarray:
    """Linear CKA between every pair of embedding spaces (same documents, same order); the
    unbiased estimator needs at least 4 documents, so fewer fall back to the biased one."""
    names = list(embeddings)
    tensors = [torch.from_numpy(np.asarray(embeddings[name], dtype=np.float32)) for name in names]
    unbiased = unbiased and len(tensors[0]) >= 4
    matrix = np.ones((len(names), len(names)))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            matrix[i, j] = matrix[j, i] = float(linear_cka(tensors[i], tensors[j], unbiased=unbiased))
    return matrix


def cka_matrix(embeddings: Mapping[str, np.ndarray], unbiased: bool = True) -> Figure:
    """Heatmap of :func:`cka_between` over e.g. ``{"audio": z_a, "text": z_t, "joint": z_j}``."""
    names = list(embeddings)
    matrix = cka_between(embeddings, unbiased)
    width, height = 1.3 * len(names) + 2.0, 1.1 * len(names) + 1.5
    figure = Figure(figsize=(width, height))
    _margins_in_inches(figure, left=0.9, right=0.1, bottom=0.5, top=0.45)
    ax = figure.subplots()
    image = ax.imshow(matrix, vmin=min(0.0, matrix.min()), vmax=1, cmap="viridis")
    for (row, column), value in np.ndenumerate(matrix):
        ax.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), title="linear CKA" + (" (unbiased)" if unbiased and len(next(iter(embeddings.values()))) >= 4 else ""))
    ax.set_xticklabels(names)
    ax.set_yticklabels(names)
    figure.colorbar(image, ax=ax, shrink=0.8)
    return figure


def expert_utilisation(gate_probabilities: np.ndarray) -> Figure:
    """Mean gate probability per expert over documents (``[N, experts]``), against the uniform
    share that the load-balancing term aims for."""
    usage = np.asarray(gate_probabilities, dtype=np.float64).mean(axis=0)
    figure = Figure(figsize=(max(3.5, 0.6 * usage.size + 1.5), 3.2))
    _margins_in_inches(figure, left=0.75, right=0.15, bottom=0.55, top=0.4)
    ax = figure.subplots()
    ax.bar(range(usage.size), usage)
    ax.axhline(1.0 / usage.size, color="grey", linestyle=":", label="uniform")
    ax.set(xlabel="expert", ylabel="mean gate probability", xticks=range(usage.size), ylim=(0, max(1.0, usage.max())),
           title=f"expert utilisation (n={len(gate_probabilities)})")
    ax.legend(fontsize="small")
    return figure


def layer_weights(weights: Mapping[str, np.ndarray]) -> Figure:
    """The learned weights over an encoder's layers (``layer=all``), one panel per modality:
    each entry is ``[fold models, layers]``; bars are the mean over fold models, dots each
    model, against the plain average (``1 / layers``) the weights start from. Layer 0 is the
    encoder's embeddings."""
    figure, axes = _panels(len(weights), columns=len(weights) or 1)
    for ax, (modality, values) in zip(axes, weights.items()):
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        layers = np.arange(values.shape[1])
        ax.bar(layers, values.mean(axis=0), color="tab:blue", alpha=0.7, label="mean over folds")
        for fold in values:
            ax.plot(layers, fold, "o", color="black", markersize=3, alpha=0.6)
        ax.axhline(1.0 / values.shape[1], color="grey", linestyle=":", label="plain average")
        top = max(1.0 / values.shape[1], values.max()) * 1.15
        ax.set(xlabel="encoder layer (0 = embeddings)", ylabel="weight", ylim=(0, top),
               title=f"{modality} layer weights ({len(values)} fold models)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return figure


def segment_attention(weights: Sequence[np.ndarray], titles: Sequence[str] | None = None,
                      modalities: Sequence[str] = ("audio", "text")) -> Figure:
    """Pooling weights of a few documents as heatmaps, one panel per document.

    Each entry is ``[heads, segments]`` (audio or text pooling) or ``[heads, modalities,
    segments]`` (joint pooling), shown with one row per head and modality; padded segments should
    be cut off beforehand.
    """
    figure, axes = _panels(len(weights), columns=1, height=1.9, layout=None)
    _margins_in_inches(figure, left=1.1, right=0.1, bottom=0.45, top=0.3, rows=max(1, len(weights)),
                       between=0.75)
    for index, (ax, document) in enumerate(zip(axes, weights)):
        document = np.asarray(document, dtype=np.float64)
        rows = [f"head {h}" for h in range(document.shape[0])]
        if document.ndim == 3:
            rows = [f"head {h} {m}" for h in range(document.shape[0]) for m in modalities[:document.shape[1]]]
            document = document.reshape(-1, document.shape[-1])
        image = ax.imshow(document, aspect="auto", cmap="magma", vmin=0)
        ax.set(yticks=range(len(rows)), xlabel="segment", title=titles[index] if titles else f"document {index}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yticklabels(rows, fontsize="small")
        figure.colorbar(image, ax=ax, pad=0.01)
    return figure
