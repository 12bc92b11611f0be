"""The baseline HILBERT has to beat: logistic regression on mean-pooled segment features.

Same folds, same labelled documents, same metrics as the model, so the table compares like with
like. Class weights are balanced (the tasks are imbalanced) and features are standardised on the
training fold only.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.features.batches import LabelMaps
from hilbert.metrics import classification_metrics


def mean_pooled_features(cache: FeatureCache, feature_set: FeatureSet, doc_ids: list[str],
                         modalities: tuple[str, ...] = ("audio", "text")) -> np.ndarray:
    """[documents, Da + Dt]: each document's segment features averaged, modalities concatenated."""
    rows = []
    for doc_id in doc_ids:
        audio, text = cache.load_document(feature_set, doc_id)
        parts = {"audio": audio.mean(axis=0), "text": text.mean(axis=0)}
        rows.append(np.concatenate([parts[m] for m in modalities]))
    return np.stack(rows)


def logistic_regression_cv(features: np.ndarray, labels: dict[str, np.ndarray], fold_of: np.ndarray,
                           label_maps: LabelMaps, regularisation: float = 1.0,
                           folds: list[int] | None = None) -> dict[int, dict[str, float]]:
    """Per fold, per task: fit on the labelled training documents, score the validation fold.

    ``labels`` maps task -> [documents] class indices (-1 unlabelled); ``fold_of`` [documents].
    Returns fold -> {"<task>/auc": ..., "<task>/balanced_accuracy": ..., "<task>/macro_f1": ...}
    for every fold, or for ``folds`` only.
    """
    results: dict[int, dict[str, float]] = {}
    for fold in folds if folds is not None else sorted(set(fold_of.tolist())):
        train, validation = fold_of != fold, fold_of == fold
        metrics: dict[str, float] = {}
        for task, classes in label_maps.classes.items():
            y = labels[task]
            fit_rows = train & (y >= 0)
            probabilities = np.full((int(validation.sum()), len(classes)), 1.0 / len(classes))
            present = np.unique(y[fit_rows])
            if present.size >= 2:
                model = make_pipeline(StandardScaler(), LogisticRegression(
                    C=regularisation, class_weight="balanced", max_iter=2000))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.fit(features[fit_rows], y[fit_rows])
                probabilities = np.zeros_like(probabilities)  # classes absent from training get 0
                probabilities[:, present] = model.predict_proba(features[validation])
            for name, value in classification_metrics(y[validation], probabilities).items():
                metrics[f"{task}/{name}"] = value
        results[fold] = metrics
    return results


def logistic_regression_held_out(train_features: np.ndarray, train_labels: dict[str, np.ndarray],
                                 test_features: np.ndarray, test_labels: dict[str, np.ndarray],
                                 label_maps: LabelMaps, regularisation: float = 1.0) -> dict[str, float]:
    """Fit on every labelled training document, score the held-out ones (same metrics as CV)."""
    features = np.concatenate([train_features, test_features])
    labels = {task: np.concatenate([train_labels[task], test_labels[task]]) for task in label_maps.tasks}
    fold_of = np.concatenate([np.ones(len(train_features), dtype=int), np.zeros(len(test_features), dtype=int)])
    return logistic_regression_cv(features, labels, fold_of, label_maps, regularisation, folds=[0])[0]
