"""The summaries every reported number comes from: weighted AUC, the group bootstrap, paired
comparisons and fold tables (hilbert.evaluation.summary)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hilbert.evaluation.summary import (FoldTable, OutOfFoldPredictions, compare_methods, group_bootstrap_weights,
                                        weighted_macro_auc)
from hilbert.metrics import macro_auc


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_weighted_auc_is_sklearns_auc_and_integer_weights_repeat_rows(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(-1, classes, 300)
    probabilities = np.round(rng.random((300, classes)), 1) + 0.05  # many ties
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert weighted_macro_auc(labels, probabilities, np.ones((1, 300)))[0] == pytest.approx(macro_auc(labels, probabilities))
    counts = rng.integers(0, 4, 300)
    repeated = np.repeat(np.arange(300), counts)
    assert weighted_macro_auc(labels, probabilities, counts[None].astype(float))[0] == \
        pytest.approx(macro_auc(labels[repeated], probabilities[repeated]))


def test_a_replicate_with_one_class_has_no_auc():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    weights = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=float)
    auc = weighted_macro_auc(labels, probabilities, weights)
    assert math.isnan(auc[0]) and auc[1] == 1.0


def test_the_bootstrap_resamples_whole_groups_and_keeps_the_sample_first():
    groups = ["a", "a", "b", "c", "c", "c"]
    weights = group_bootstrap_weights(groups, 500, seed=0)
    assert weights.shape == (501, 6) and (weights[0] == 1).all()
    assert (weights[1:, 0] == weights[1:, 1]).all() and (weights[1:, 3] == weights[1:, 5]).all()
    assert np.allclose(weights[1:, [0, 2, 3]].sum(axis=1), 3)  # three groups drawn in every replicate
    assert np.allclose(weights[1:].mean(axis=0), 1.0, atol=0.1)


def predictions(probabilities: np.ndarray, labels: np.ndarray, groups: list[str]) -> OutOfFoldPredictions:
    n = len(labels)
    return OutOfFoldPredictions([f"d{i}" for i in range(n)], groups, np.arange(n) % 3, np.zeros(n, dtype=int),
                           {"t": labels}, {"t": probabilities})


def test_paired_comparison_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    groups = [f"g{i // 4}" for i in range(200)]
    signal = labels + rng.normal(0, 0.6, 200)
    good = np.stack([1 - signal, signal], axis=1)
    noise = rng.normal(size=200)
    chance = np.stack([1 - noise, noise], axis=1)
    methods = {"hilbert": predictions(good, labels, groups), "copy": predictions(good.copy(), labels, groups),
               "chance": predictions(chance, labels, groups)}
    tables = {name: FoldTable.from_folds({0: {"t/auc": 0.8}, 1: {"t/auc": 0.9}, 2: {"t/auc": math.nan}})
              for name in methods}
    report = compare_methods(methods, tables, ["t"], "hilbert", replicates=400, seed=0)
    hilbert = report["hilbert"]["t"]
    assert hilbert["ci95"][0] < hilbert["pooled_auc"] < hilbert["ci95"][1] and "vs_reference" not in hilbert
    assert hilbert["folds_defined"] == 2 and hilbert["folds"] == 3
    assert hilbert["fold_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    copy = report["copy"]["t"]["vs_reference"]
    assert copy["difference"] == 0.0 and not copy["differs"] and copy["ci95"] == [0.0, 0.0]
    versus = report["chance"]["t"]["vs_reference"]
    assert versus["differs"] and versus["ci95"][1] < 0 and versus["p"] < 0.01
    assert abs(report["chance"]["t"]["pooled_auc"] - 0.5) < 0.1


def test_methods_of_different_documents_are_not_compared():
    labels = np.array([0, 1, 0, 1])
    probabilities = np.tile([[0.4, 0.6]], (4, 1))
    one = predictions(probabilities, labels, ["a", "b", "c", "d"])
    other = predictions(probabilities, labels, ["a", "b", "c", "d"])
    other.doc_ids = ["x", "y", "z", "w"]
    with pytest.raises(ValueError, match="not of the same documents"):
        compare_methods({"hilbert": one, "other": other}, {}, ["t"], "hilbert", replicates=10)
