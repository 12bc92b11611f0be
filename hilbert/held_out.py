"""Scores on held-out documents: documents of speakers that no sweep trial saw.

Promotion compares the challenger with the champion by :func:`held_out_scorer` (a model folder
-> the mean over tasks of the macro one-vs-rest ROC AUC on the held-out corpus, fold models
averaged), and :func:`held_out_baseline` is what the champion has to beat there: logistic
regression on mean-pooled features, fit on the development documents only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hilbert.data.manifest import Manifest
from hilbert.features.batches import LabelMaps
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.predict import evaluate_corpus, load_predictor
from hilbert.train.baseline import logistic_regression_held_out, mean_pooled_features
from hilbert.train.folds import group_of


def mean_auc(metrics: Mapping[str, float], tasks: Sequence[str]) -> float:
    """The mean of ``<task>/auc`` over ``tasks``, leaving out tasks without one (NaN: a class
    missing from the held-out labels); NaN when no task has one."""
    values = [metrics[f"{task}/auc"] for task in tasks if not math.isnan(metrics.get(f"{task}/auc", math.nan))]
    return sum(values) / len(values) if values else math.nan


def held_out_scorer(corpus: Manifest, cache: str | Path, address: str | None = None) -> Callable[[Path], float]:
    """Model folder -> mean macro AUC over its tasks on ``corpus``: what promotion compares.

    ``cache`` is the feature cache the corpus's features are extracted into (a cache hit when
    they are there), ``address`` the Ray cluster for an extraction that is not.
    """

    def score(folder: Path) -> float:
        predictor = load_predictor(folder)
        # A challenger trained on a held-out document would be promoted on a score it has seen.
        return mean_auc(evaluate_corpus(predictor, corpus, cache, address=address, seen="refuse"),
                        predictor.label_maps.tasks)

    return score


def held_out_metric(manifest: str | Path) -> str:
    """What :func:`held_out_scorer`'s score is, in words (recorded beside a promotion decision)."""
    return f"mean over tasks of macro one-vs-rest ROC AUC on {manifest} (fold models averaged)"


def held_out_baseline(label_maps: LabelMaps, development: Manifest, held_out: Manifest, cache: str | Path,
                      feature_set: FeatureSet, timing: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Logistic regression on mean-pooled features, fit on the development documents (its ``C``
    chosen by speaker-grouped cross-validation of them), scored on the held-out ones:
    ``<task>/<metric>`` as :func:`hilbert.predict.evaluate_corpus` reports them.

    ``feature_set`` covers the documents of both corpora (the feature set of the manifest they
    were split from); ``timing``: its timing columns, averaged with the features (as
    :func:`hilbert.train.baseline.mean_pooled_features` takes them).
    """
    store = FeatureCache(cache)

    def features_and_labels(corpus: Manifest) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        features = mean_pooled_features(store, feature_set, [doc.doc_id for doc in corpus], timing=timing)
        encoded = [label_maps.encode(doc) for doc in corpus]
        return features, {task: np.array([labels[task] for labels in encoded]) for task in label_maps.tasks}

    return logistic_regression_held_out(*features_and_labels(development), *features_and_labels(held_out), label_maps,
                                        train_groups=[group_of(doc) for doc in development])
