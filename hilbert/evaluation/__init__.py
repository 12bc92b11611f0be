"""Evaluation: predicting documents with a model, the metrics of a split, and the summaries that
every number the project reports comes from (fold tables, pooled out-of-fold AUC with bootstrap
confidence intervals, paired comparisons). Used by training (validation scores), the test
predictions of fold models (:mod:`hilbert.train.out_of_fold`), sweeps, prediction and the CLI;
it imports nothing of training.

The protocol itself (outer test folds, inner validation splits) is described in
:mod:`hilbert.train.folds` and ``docs/architecture.md``.
"""
