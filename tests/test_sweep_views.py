"""A finished sweep's views: Optuna's figures of its study, and a table of every trial."""

from __future__ import annotations

import csv
import io
import math

import optuna
import pytest

from hilbert.sweep.views import close_views, study_views, trials_csv


def study_of(values: list[float | None]) -> optuna.Study:
    """A study over two parameters, a trial per value (None: the trial failed)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for value in values:
        trial = study.ask({"optimization.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                           "loss.lambda_cka": optuna.distributions.FloatDistribution(0.0, 1.0)})
        study.tell(trial, value, state=optuna.trial.TrialState.FAIL if value is None else None)
    return study


def test_every_view_is_drawn_for_a_study_with_finished_trials(tmp_path):
    figures = study_views(study_of([0.61, 0.72, None, 0.66, 0.70, 0.58]))
    try:
        assert set(figures) == {"optimization_history", "param_importances", "parallel_coordinate", "slice"}
        for name, figure in figures.items():
            path = tmp_path / f"{name}.png"
            figure.savefig(path)
            assert path.stat().st_size > 1000
    finally:
        close_views(figures)


def test_views_a_study_cannot_support_yet_are_left_out_saying_why():
    said: list[str] = []
    assert study_views(study_of([None, None]), log=said.append) == {}
    assert said == ["sweep views: no trial finished, nothing to draw"]
    said.clear()
    figures = study_views(study_of([0.6]), log=said.append)  # one finished trial: no importances
    try:
        assert "optimization_history" in figures and "param_importances" not in figures
        assert any(line.startswith("sweep views: no param importances") for line in said), said
    finally:
        close_views(figures)


def test_the_trials_table_has_a_row_per_trial_with_both_objectives_and_the_searched_params():
    rows = [
        {"name": "trial-a", "trial_id": "a", "status": "FINISHED", "stopped_by": None, "objective": 0.7125,
         "params": {"optimization.learning_rate": "0.001", "config.model.d_model": "16"},
         "metrics": {"epochs_completed": 4.0, "test/objective": 0.69}},
        {"name": "trial-b", "trial_id": "b", "status": "KILLED", "stopped_by": "asha", "objective": 0.6,
         "params": {"optimization.learning_rate": "0.003", "loss.lambda_cka": "0.1"}, "metrics": {"epochs_completed": 1.0}},
        {"name": "trial-c", "trial_id": "c", "status": "FAILED", "stopped_by": None, "objective": math.nan,
         "params": {}, "metrics": {}},
    ]
    table = list(csv.DictReader(io.StringIO(trials_csv(rows))))
    assert [row["trial"] for row in table] == ["trial-a", "trial-b", "trial-c"]
    assert list(table[0]) == ["trial", "trial_id", "status", "stopped_by", "epochs", "val_objective", "test_objective",
                              "loss.lambda_cka", "optimization.learning_rate"]  # no config.* copies of the base
    assert table[0]["val_objective"] == "0.7125" and table[0]["test_objective"] == "0.69" and table[0]["epochs"] == "4"
    assert table[1]["stopped_by"] == "asha" and table[1]["test_objective"] == "" and table[1]["loss.lambda_cka"] == "0.1"
    assert table[2]["val_objective"] == "" and table[2]["optimization.learning_rate"] == ""


@pytest.fixture(autouse=True)
def quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)
