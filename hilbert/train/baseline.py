"""The baseline HILBERT has to beat: logistic regression on mean-pooled segment features.

It runs under the same protocol as the model (:mod:`hilbert.train.folds`): the same outer test
folds, the same labelled documents, the same metrics. Its one hyperparameter, the inverse
regularisation strength ``C``, is chosen per task from :data:`C_GRID` by the macro AUC on the
fold's validation documents (by grouped inner cross-validation of the training documents when
the split has no validation documents), then the model is refit on the training and validation
documents with that ``C`` and scores the test fold once. The model only trains on the training
documents (it needs the validation documents for early stopping), so if anything this gives the
baseline more data than HILBERT, never less care. Class weights are balanced (the tasks are
imbalanced) and features are standardised on the documents each fit sees. With
``data.timing`` it sees the segment timing columns the model sees, averaged like the rest.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from hilbert.features.batches import LabelMaps, document_inputs
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.metrics import classification_metrics, macro_auc

C_GRID = (0.01, 0.1, 1.0, 10.0)
INNER_FOLDS = 3


def mean_pooled_features(cache: FeatureCache, feature_set: FeatureSet, doc_ids: list[str],
                         modalities: tuple[str, ...] = ("audio", "text"),
                         timing: Mapping[str, Any] | None = None) -> np.ndarray:
    """[documents, Da + Dt]: each document's segment features averaged, modalities concatenated;
    with ``timing`` (the feature set's timing columns, as the model gets them) those columns are
    averaged too (mean log duration, pause, words, ...)."""
    rows = []
    for doc_id in doc_ids:
        audio, text = document_inputs(cache, feature_set, doc_id, timing)
        parts = {"audio": audio.mean(axis=0), "text": text.mean(axis=0)}
        rows.append(np.concatenate([parts[m] for m in modalities]))
    return np.stack(rows)


def logistic_regression(regularisation: float, rows: int, columns: int) -> Pipeline:
    """Standardise, then L2-regularised multinomial logistic regression with balanced class
    weights; with fewer ``rows`` (documents) than ``columns`` (features), the standardised rows
    are first rotated onto their own principal axes.

    The rotation (PCA keeping every component, no whitening) changes nothing in the fitted
    model: with an L2 penalty the optimal weights lie in the span of the (standardised, centred)
    training rows (representer theorem), so fitting ``beta`` on ``Z = X V`` and predicting with
    ``X V beta`` reaches the same optimum and the same probabilities as fitting ``W = V beta`` on
    ``X``. What it changes is the size of the problem: with fewer documents than feature columns
    (a few hundred documents against 4,096 hashed n-grams or a 4,096-wide T5) the solver works on
    ``documents x classes`` parameters instead of ``columns x classes``, about 10x faster here.
    """
    steps = [StandardScaler(), PCA(svd_solver="full")] if rows < columns else [StandardScaler()]
    return make_pipeline(*steps, LogisticRegression(C=regularisation, class_weight="balanced", max_iter=2000))


def _fit_predict(features: np.ndarray, labels: np.ndarray, fit: np.ndarray, score: np.ndarray, n_classes: int,
                 regularisation: float) -> np.ndarray:
    """[score rows, classes] probabilities of a model fit on the labelled ``fit`` rows (uniform when
    fewer than two classes are labelled there; classes absent from the fit get 0)."""
    fit = fit & (labels >= 0)
    probabilities = np.full((int(score.sum()), n_classes), 1.0 / n_classes)
    present = np.unique(labels[fit])
    if present.size < 2:
        return probabilities
    model = logistic_regression(regularisation, int(fit.sum()), features.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features[fit], labels[fit])
    probabilities = np.zeros_like(probabilities)
    probabilities[:, present] = model.predict_proba(features[score])
    return probabilities


def choose_regularisation(features: np.ndarray, labels: np.ndarray, train: np.ndarray, validation: np.ndarray,
                          groups: Sequence[str], n_classes: int, grid: Sequence[float] = C_GRID) -> float:
    """The ``C`` of ``grid`` with the best validation macro AUC: on the ``validation`` rows, or,
    when there are none, averaged over grouped inner folds of the ``train`` rows (ties: the
    stronger regularisation, the first in the grid)."""
    if validation.any():
        splits = [(train, validation)]
    else:
        rows = np.flatnonzero(train & (labels >= 0))
        parts = min(INNER_FOLDS, len(set(np.asarray(groups)[rows])))
        if parts < 2:
            return 1.0
        splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=0)
        splits = []
        for inner_train, inner_validation in splitter.split(rows, labels[rows], np.asarray(groups)[rows]):
            fit, held = np.zeros_like(train), np.zeros_like(train)
            fit[rows[inner_train]], held[rows[inner_validation]] = True, True
            splits.append((fit, held))
    best, best_score = grid[0], -math.inf
    for regularisation in grid:
        scores = [macro_auc(labels[held], _fit_predict(features, labels, fit, held, n_classes, regularisation))
                  for fit, held in splits]
        scores = [s for s in scores if not math.isnan(s)]
        score = float(np.mean(scores)) if scores else -math.inf
        if score > best_score:
            best, best_score = regularisation, score
    return best


def logistic_regression_folds(features: np.ndarray, labels: dict[str, np.ndarray], doc_ids: Sequence[str],
                              groups: Sequence[str], folds: Sequence[Any], label_maps: LabelMaps
                              ) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, np.ndarray]]]:
    """Per outer fold (:class:`hilbert.train.folds.Fold`), per task: ``C`` chosen without the test
    documents, refit, then the test documents scored.

    ``labels`` maps task -> [documents] class indices (-1 unlabelled), rows in ``doc_ids`` order.
    Returns fold -> {"test/<task>/auc", ... "C/<task>"} and fold -> task -> [test documents,
    classes] probabilities (test documents in the fold's order).
    """
    position = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    results: dict[int, dict[str, float]] = {}
    probabilities: dict[int, dict[str, np.ndarray]] = {}

    def rows(ids: Sequence[str]) -> np.ndarray:
        mask = np.zeros(len(doc_ids), dtype=bool)
        mask[[position[d] for d in ids]] = True
        return mask

    for fold in folds:
        train, validation = rows(fold.train), rows(fold.validation)
        test_positions = [position[d] for d in fold.test]
        test = rows(fold.test)
        order = np.argsort(np.argsort(test_positions))  # mask order (corpus) -> the fold's order
        metrics: dict[str, float] = {}
        probabilities[fold.index] = {}
        for task, classes in label_maps.classes.items():
            y = labels[task]
            regularisation = choose_regularisation(features, y, train, validation, groups, len(classes))
            predicted = _fit_predict(features, y, train | validation, test, len(classes), regularisation)[order]
            probabilities[fold.index][task] = predicted
            for name, value in classification_metrics(y[test_positions], predicted).items():
                metrics[f"test/{task}/{name}"] = value
            metrics[f"C/{task}"] = regularisation
        results[fold.index] = metrics
    return results, probabilities


def logistic_regression_held_out(train_features: np.ndarray, train_labels: dict[str, np.ndarray],
                                 test_features: np.ndarray, test_labels: dict[str, np.ndarray],
                                 label_maps: LabelMaps, train_groups: Sequence[str] | None = None
                                 ) -> dict[str, float]:
    """Fit on every labelled training document (``C`` chosen by grouped inner cross-validation of
    them, never on the held-out ones), score the held-out documents (same metrics as CV)."""
    groups = list(train_groups) if train_groups is not None else [str(i) for i in range(len(train_features))]
    features = np.concatenate([train_features, test_features])
    train = np.r_[np.ones(len(train_features), dtype=bool), np.zeros(len(test_features), dtype=bool)]
    metrics: dict[str, float] = {}
    for task, classes in label_maps.classes.items():
        y = np.concatenate([train_labels[task], np.full(len(test_features), -1)])
        regularisation = choose_regularisation(features, y, train, np.zeros_like(train),
                                               groups + [f"\0held-out-{i}" for i in range(len(test_features))],
                                               len(classes))
        predicted = _fit_predict(features, y, train, ~train, len(classes), regularisation)
        for name, value in classification_metrics(test_labels[task], predicted).items():
            metrics[f"{task}/{name}"] = value
    return metrics
