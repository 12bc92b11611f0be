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

from hilbert import storage
from hilbert.sweep.resume import saved_study
from hilbert.tracking.runs import SweepTracker
from hilbert.train.report import EPOCHS_COMPLETED, TEST_OBJECTIVE

SWEEP_FOLDER_TAG = "sweep_folder"  # the parent run's tag naming its sweep folder (path or URI)

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


def log_sweep_views(sweep: SweepTracker, tune_folder: str, rows: Sequence[Mapping[str, Any]],
                    log: Callable[[str], None] = print) -> list[str]:
    """``sweep/trials.csv`` (:func:`trials_csv` of ``rows``) and Optuna's views of the study Tune
    saved in ``tune_folder`` (``sweep/views/*.png``) in the sweep's parent run, replacing what
    an earlier call logged: what users compare trials by in the MLflow UI. Returns the paths."""
    sweep.experiment.client.log_text(sweep.run_id, trials_csv(rows), "sweep/trials.csv")
    study = saved_study(tune_folder)
    if study is None:
        log("sweep views: Tune has saved no study yet")
        return ["sweep/trials.csv"]
    figures = study_views(study, log)
    try:
        return ["sweep/trials.csv", *sweep.log_figures(figures, "sweep/views")]
    finally:
        close_views(figures)


def refresh_sweep_views(sweep: SweepTracker, rows: Sequence[Mapping[str, Any]],
                        log: Callable[[str], None] = print) -> list[str]:
    """:func:`log_sweep_views` for a sweep found in MLflow, its study read from the sweep folder
    its parent run names: a sweep still running, or one whose driver died before drawing them.
    Logs nothing (and says why) when that folder cannot be read from here."""
    folder = sweep.experiment.client.get_run(sweep.run_id).data.tags.get(SWEEP_FOLDER_TAG)
    if not folder:
        log("sweep views: the parent run names no sweep folder (a sweep from before views existed)")
        return []
    try:
        reachable = storage.exists(storage.join(folder, "sweep.json"))
    except Exception as error:  # a URI this machine has no credentials or route for
        log(f"sweep views: the sweep folder {storage.shown(folder)} cannot be read from here ({error})")
        return []
    if not reachable:
        log(f"sweep views: no sweep folder at {storage.shown(folder)} on this machine (run `hilbert runs` where "
            "the sweep ran, or on a machine that mounts it)")
        return []
    return log_sweep_views(sweep, storage.join(folder, "tune"), rows, log)
