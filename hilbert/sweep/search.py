"""How a sweep searches and stops: the Optuna searcher and the early-stopping schedulers, which
read the training loop's validation objective per epoch (:mod:`hilbert.train.report`)."""

from __future__ import annotations

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from hilbert.sweep.config import SweepConfig
from hilbert.train.report import EPOCHS_COMPLETED, OBJECTIVE, is_final


def make_searcher(sweep: SweepConfig) -> OptunaSearch:
    settings = sweep.searcher
    if settings.type == "optuna_tpe":
        # constant_liar: concurrent trials do not all sample the same point while others run.
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials,
                                             constant_liar=sweep.concurrency > 1)
    else:
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    space = {key: parameter.optuna_distribution() for key, parameter in sweep.search.items()}
    # The study in memory, saved in Tune's searcher state (why not in Optuna's storage: resume.py).
    return OptunaSearch(space=space, metric=OBJECTIVE, mode=sweep.objective.mode, sampler=sampler)


def make_scheduler(sweep: SweepConfig) -> TrialScheduler:
    settings = sweep.scheduler
    assert sweep.base_config is not None
    epochs = sweep.trial_config({}).optimization.epochs
    # A grace period as long as the trials (a shortened run, `hilbert demo --epochs 2`) stops nothing.
    grace = min(settings.grace_period, epochs)
    if settings.type == "asha":
        return AshaLettingTrialsFinish(
            epochs, time_attr=EPOCHS_COMPLETED, metric=OBJECTIVE, mode=sweep.objective.mode, max_t=epochs + 1,
            grace_period=grace, reduction_factor=settings.reduction_factor)
    if settings.type == "median":
        return MedianLettingTrialsFinish(
            epochs, time_attr=EPOCHS_COMPLETED, metric=OBJECTIVE, mode=sweep.objective.mode,
            grace_period=grace, min_samples_required=2)
    return FIFOScheduler()


class _FinalReportContinues:
    """Mixin for a Tune scheduler: never stop a trial on its final report (the last epoch, or the
    epoch where every fold stopped early). Stopping it there would kill it before it logs its
    fold table, figures and model, for no saving; a rung of ASHA can fall on the last epoch
    (grace 5, factor 2, 20 epochs), so ``max_t`` alone does not prevent it."""

    def __init__(self, epochs: int, **settings):
        super().__init__(**settings)
        self._epochs = epochs

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if is_final(result, self._epochs) else decision


class AshaLettingTrialsFinish(_FinalReportContinues, ASHAScheduler):
    """ASHA that lets a trial's final report through (module level: Tune pickles its scheduler)."""


class MedianLettingTrialsFinish(_FinalReportContinues, MedianStoppingRule):
    """Median stopping that lets a trial's final report through."""
