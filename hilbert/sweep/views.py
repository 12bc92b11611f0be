"""A finished sweep at a glance: Optuna's views of its study and a table of every trial.

The study is the searcher's own (what Optuna learned from each trial's validation objective),
so its views show the selection signal: the optimisation history, which hyperparameters mattered
(fANOVA importances), parallel coordinates and one slice per parameter. The table comes from
MLflow, one row per trial run: its parameters, its end state, and both its validation objective
(what the searcher saw) and its test objective (the outer test folds, never selected on).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt  # Optuna draws through pyplot: its figures are closed after logging
import optuna
from matplotlib.figure import Figure
from optuna.visualization import matplotlib as optuna_plots

from hilbert.train.report import EPOCHS_COMPLETED, TEST_OBJECTIVE

# Name of each view -> how Optuna draws it.
_VIEWS: dict[str, Callable[[optuna.Study], Any]] = {
    "optimization_history": optuna_plots.plot_optimization_history,
    "param_importances": lambda study: optuna_plots.plot_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)),
    "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    "slice": optuna_plots.plot_slice,
}


def study_views(study: optuna.Study, log: Callable[[str], None] = print) -> dict[str, Figure]:
    """Each view Optuna can draw of ``study`` (name -> figure; the caller closes them). A view
    that the study cannot support yet (importances of one finished trial, say) is left out with
    a line saying why."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        log("sweep views: no trial finished, nothing to draw")
        return {}
    figures = {}
    for name, draw in _VIEWS.items():
        if name == "param_importances" and len(finished) < 2:
            # Optuna draws it from one trial too, but no parameter varied: every bar is made up.
            log("sweep views: no param importances (they need two finished trials)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                drawn = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                log(f"sweep views: no {name.replace('_', ' ')} ({error})")
                continue
        # A view is an Axes, or an array of them (one slice per parameter): keep its figure.
        first = drawn.flat[0] if hasattr(drawn, "flat") else drawn
        figure = first.get_figure()
        figure.set_size_inches(max(6.0, figure.get_figwidth()), max(4.0, figure.get_figheight()))
        figures[name] = figure
    return figures


def close_views(figures: Mapping[str, Figure]) -> None:
    for figure in figures.values():
        plt.close(figure)


def trials_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per trial run of a leaderboard (:func:`hilbert.tracking.leaderboard.leaderboard`):
    name, trial id, status, who stopped it, epochs, validation and test objective, then every
    parameter (sorted; the trial config's own ``config.*`` params left out, they repeat the base)."""
    params = sorted({key for row in rows for key in row["params"] if not key.startswith("config.")})
    header = ["trial", "trial_id", "status", "stopped_by", "epochs", "val_objective", "test_objective", *params]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        metrics = row["metrics"]
        writer.writerow([row["name"], row["trial_id"], row["status"], row.get("stopped_by") or "",
                         _cell(metrics.get(EPOCHS_COMPLETED)), _cell(row["objective"]),
                         _cell(metrics.get(TEST_OBJECTIVE)), *(row["params"].get(key, "") for key in params)])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)
