"""What a training run reports: the names every reader of its reports relies on.

The training loop (:mod:`hilbert.train.loop`) reports one flat dict per epoch; Tune's schedulers
and searcher, the sweep's MLflow logging, the leaderboard and ``hilbert train``'s tables read it
by these names. The loop owns them; nothing downstream spells them itself.

Selection signal (validation documents; what early stopping, ASHA and Optuna see):

- ``objective``: the mean over folds of each fold's best validation score so far (it never falls);
- ``epoch_score``: this epoch's validation score over the folds it trained (the learning curve);
- ``val/<metric>``: means over folds of this epoch's validation metrics.

Reported figures (outer test folds, in the last report only, once training has ended):
``test/objective`` and ``test/<task>/<metric>``. Time axis: ``epochs_completed`` counts from 1
whatever the resume point.
"""

from __future__ import annotations

from typing import Any, Mapping

EPOCH = "epoch"
EPOCHS_COMPLETED = "epochs_completed"  # the time axis of Tune's schedulers
ACTIVE_FOLDS = "active_folds"  # folds that early stopping has not ended yet
OBJECTIVE = "objective"
EPOCH_SCORE = "epoch_score"
TEST_OBJECTIVE = "test/objective"
VALIDATION, TEST, TRAIN, TIME = "val/", "test/", "train/", "time/"
# Set on a report that repeats the epoch a resumed run restored (a sweep logs it only if the
# epoch is missing from the trial's run; schedulers see it again harmlessly).
REPEATED_REPORT = "repeated_after_resume"

# What of a report is worth keeping per epoch (Tune adds pids, hostnames, timestamps, ...).
_EPOCH_SCALARS = (OBJECTIVE, TEST_OBJECTIVE, EPOCH_SCORE, EPOCH, EPOCHS_COMPLETED, ACTIVE_FOLDS)
_EPOCH_PREFIXES = (VALIDATION, TRAIN, TIME)


def epoch_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a report (or of a Tune result built from one) that describe the epoch:
    the names above, ``val/...``, ``train/...`` and ``time/...``."""
    return {key: value for key, value in report.items() if key in _EPOCH_SCALARS or key.startswith(_EPOCH_PREFIXES)}


def is_final(report: Mapping[str, Any], epochs: int) -> bool:
    """Whether this is a run's last report: its last epoch, or every fold stopped early."""
    return report.get(EPOCHS_COMPLETED, 0) >= epochs or report.get(ACTIVE_FOLDS, 1) == 0
