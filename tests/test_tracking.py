"""MLflow tracking of sweeps against a real sqlite store: nesting, what each run holds, end states
(never RUNNING), resume, the leaderboard; and the figures logged with a trial."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from hilbert.sweep import plots
from hilbert.tracking.leaderboard import leaderboard
from hilbert.tracking.runs import LOST_TAG, SweepTracker, TrialTracker, close_unfinished_runs, end_trial
from hilbert.tracking.store import Experiment, resolve_tracking_uri, ui_command

SEARCH = {"loss.lambda_cka": {"type": "loguniform", "low": 0.01, "high": 1.0},
          "data.encoders": {"type": "choice", "values": [["logmel", "hashngram"], ["hf:a", "hf:b"]]}}
OBJECTIVE = {"tasks": None, "weights": None, "mode": "max"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


@pytest.fixture(scope="module")
def store(workdir: Path) -> str:
    """hilbert's local default store, one per module (creating its tables takes seconds); one
    experiment per test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return resolve_tracking_uri(None, workdir)


@pytest.fixture
def experiment(store: str, request) -> Experiment:
    return Experiment.open(store, request.node.name)


def start_sweep(experiment: Experiment) -> SweepTracker:
    return SweepTracker.start(experiment, "demo-sweep", search_space=SEARCH, objective=OBJECTIVE,
                              manifest_fingerprint="sha256:abc", encoders={"audio": "logmel:1", "text": {"k": 2}},
                              config={"name": "demo", "trials": 2})


def artifact_paths(experiment: Experiment, run_id: str, folder: str = "") -> set[str]:
    paths = set()
    for entry in experiment.client.list_artifacts(run_id, folder or None):
        paths |= artifact_paths(experiment, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


def test_tracking_uri_prefers_explicit_then_environment_then_sqlite_in_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    command = ui_command(f"sqlite:///{tmp_path}/mlruns.db")
    assert command.startswith("mlflow ui --backend-store-uri sqlite:///") and "--host 127.0.0.1" in command
    assert f"{tmp_path.as_uri()}/mlartifacts" in command
    # A tracking server serves its own UI: its address, not a second server on the same store.
    assert ui_command("http://127.0.0.1:5000").startswith("http://127.0.0.1:5000 ")


def test_local_default_store_keeps_runs_and_artifacts_in_workdir(experiment: Experiment, workdir: Path):
    assert experiment.uri == f"sqlite:///{workdir.resolve()}/mlruns.db" and (workdir / "mlruns.db").is_file()
    assert experiment.client.get_experiment(experiment.experiment_id).artifact_location == \
        (workdir / "mlartifacts").resolve().as_uri()
    assert Experiment.open(experiment.uri, experiment.name) == experiment  # found again, not created twice


def test_sweep_parent_and_two_trials_nest_with_params_metrics_and_artifacts(experiment: Experiment):
    with start_sweep(experiment) as sweep:
        for trial_id, lam in (("t0", 0.1), ("t1", 0.5)):
            with sweep.trial(trial_id, {"loss": {"lambda_cka": lam}, "data.encoders": ["logmel", "hashngram"]}) as trial:
                for epoch in range(3):
                    trial.log_epoch({"epoch": epoch, "objective": 0.5 + lam * epoch, "train/total": 1.0 / (epoch + 1),
                                     "val/recall@1/audio_joint": 0.2, "val/loud/auc": math.nan, "note": "text",
                                     "time/epoch (s)": 1.5}, step=epoch)
                summary = trial.log_fold_table({0: {"loud/auc": 0.6, "cka/audio_joint": 0.3},
                                                1: {"loud/auc": 0.8, "cka/audio_joint": math.nan}})
                trial.log_figures({"experts": plots.expert_utilisation(np.full((4, 3), 1 / 3))})
    client = experiment.client
    parent = client.get_run(sweep.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["manifest_fingerprint"] == "sha256:abc" and parent.data.tags["encoder/audio"] == "logmel:1"
    assert {f"version/{p}" for p in ("hilbert", "torch", "ray", "mlflow", "optuna")} <= set(parent.data.tags)
    assert json.loads(parent.data.params["search/loss.lambda_cka"])["high"] == 1.0
    assert {"sweep/search_space.json", "sweep/objective.json", "sweep/encoders.json", "sweep/config.json"} <= \
        artifact_paths(experiment, sweep.run_id)

    rows = leaderboard(experiment, sweep.run_id)
    assert [row["trial_id"] for row in rows] == ["t1", "t0"]  # 0.5 + 0.5 * 2 beats 0.5 + 0.1 * 2
    for row in rows:
        child = client.get_run(row["run_id"])
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == sweep.run_id
        assert child.data.params["data.encoders"] == '["logmel","hashngram"]'
        assert [m.step for m in client.get_metric_history(row["run_id"], "objective")] == [0, 1, 2]
        assert child.data.metrics["val/recall_at_1/audio_joint"] == 0.2  # '@' is refused by MLflow
        assert "val/loud/auc" not in child.data.metrics and "time/epoch _s_" in child.data.metrics  # NaN skipped
        assert child.data.metrics["cv_mean/loud/auc"] == pytest.approx(0.7)
        assert child.data.metrics["cv_mean/cka/audio_joint"] == pytest.approx(0.3)  # the NaN fold is left out
        assert "cv_std/cka/audio_joint" not in child.data.metrics  # one defined fold: no spread
        assert {"params.json", "folds/metrics.json", "folds/metrics.csv", "figures/experts.png"} <= \
            artifact_paths(experiment, row["run_id"])
    assert summary["cv_std/loud/auc"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    table = client.download_artifacts(rows[0]["run_id"], "folds/metrics.csv")
    assert Path(table).read_text().splitlines()[0] == "fold,cka/audio_joint,loud/auc"


def test_failing_interrupted_and_stopped_trials_end_failed_killed_killed(experiment: Experiment):
    sweep = start_sweep(experiment)
    with pytest.raises(ValueError):
        with sweep.trial("fails"):
            raise ValueError("diverged")
    with pytest.raises(KeyboardInterrupt):
        with sweep.trial("interrupted"):
            raise KeyboardInterrupt
    with sweep.trial("stopped") as trial:
        trial.log_epoch({"objective": 0.4}, step=0)
        trial.mark_stopped("asha")
    with pytest.raises(KeyboardInterrupt):
        with sweep:
            raise KeyboardInterrupt
    statuses = {row["trial_id"]: row["status"] for row in leaderboard(experiment, sweep.run_id)}
    assert statuses == {"fails": "FAILED", "interrupted": "KILLED", "stopped": "KILLED"}
    assert experiment.client.get_run(sweep.run_id).info.status == "KILLED"
    assert leaderboard(experiment, sweep.run_id)[0]["stopped_by"] == "asha"


def test_sigterm_ends_the_trial_killed_and_the_process_with_143(experiment: Experiment, tmp_path: Path):
    sweep = start_sweep(experiment)
    script = textwrap.dedent(f"""
        import os, signal, time
        from hilbert.tracking.runs import TrialTracker
        from hilbert.tracking.store import Experiment
        experiment = Experiment(*{(experiment.uri, experiment.experiment_id, experiment.name)!r})
        with TrialTracker(experiment, {sweep.run_id!r}, "terminated"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    [row] = leaderboard(experiment, sweep.run_id)
    assert row["status"] == "KILLED"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing stray in cwd


def test_trial_in_a_worker_thread_is_tracked_and_leaves_signal_handlers_alone(experiment: Experiment):
    """Ray Tune runs a function trial in a thread, where Python refuses to install handlers."""
    sweep = start_sweep(experiment)
    errors: list[BaseException] = []
    before = signal.getsignal(signal.SIGTERM)  # whatever an earlier test (ray.init) installed

    def trial_body():
        try:
            with sweep.trial("threaded") as trial:
                trial.log_epoch({"objective": 0.5}, step=0)
        except BaseException as error:  # surfaced below
            errors.append(error)

    worker = threading.Thread(target=trial_body)
    worker.start()
    worker.join()
    assert not errors and signal.getsignal(signal.SIGTERM) is before
    assert leaderboard(experiment, sweep.run_id)[0]["status"] == "FINISHED"


def test_close_unfinished_runs_ends_stragglers_and_a_resumed_trial_reuses_its_run(experiment: Experiment):
    sweep = start_sweep(experiment)
    lost = TrialTracker(experiment, sweep.run_id, "lost", {"lr": 0.1})
    lost.start()  # its process "dies": never ended
    with sweep.trial("done"):
        pass
    assert close_unfinished_runs(experiment, sweep.run_id, include_parent=True) == 2
    assert experiment.client.get_run(sweep.run_id).info.status == "KILLED"
    assert {r["trial_id"]: r["status"] for r in leaderboard(experiment, sweep.run_id)} == \
        {"lost": "KILLED", "done": "FINISHED"}
    tags = {r.data.tags["trial_id"]: r.data.tags for r in experiment.client.search_runs([experiment.experiment_id])
            if "trial_id" in r.data.tags}
    assert "no process was left running" in tags["lost"][LOST_TAG] and LOST_TAG not in tags["done"]

    resumed = SweepTracker.attach(experiment, sweep.run_id)
    assert experiment.client.get_run(sweep.run_id).info.status == "RUNNING"
    with resumed.trial("lost", {"lr": 0.1, "extra": 1}) as trial:
        trial.log_epoch({"objective": 0.9}, step=3)
    assert trial.run_id == lost.run_id
    run = experiment.client.get_run(lost.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempts"] == "2" and run.data.params["extra"] == "1"
    assert LOST_TAG not in run.data.tags
    straggler = resumed.trial("straggler")
    straggler.start()
    assert end_trial(experiment, sweep.run_id, "straggler", stopped_by="asha")
    assert not end_trial(experiment, sweep.run_id, "straggler")  # already ended
    resumed.end()
    assert experiment.client.get_run(sweep.run_id).info.status == "FINISHED"
    assert close_unfinished_runs(experiment, sweep.run_id) == 0


def test_leaderboard_sorts_by_objective_with_unscored_trials_last(experiment: Experiment):
    sweep = start_sweep(experiment)
    for trial_id, objective in (("low", 0.55), ("none", None), ("high", 0.71), ("mid", 0.6)):
        with sweep.trial(trial_id, {"seed": 1}) as trial:
            if objective is not None:
                trial.log_epoch({"objective": objective, "train/total": 2.0, "val/loud/auc": objective}, step=0)
    rows = leaderboard(experiment, sweep.run_id)
    assert [row["trial_id"] for row in rows] == ["high", "mid", "low", "none"]
    assert rows[0]["metrics"] == {"objective": 0.71, "val/loud/auc": 0.71} and rows[0]["params"] == {"seed": "1"}
    assert [row["trial_id"] for row in leaderboard(experiment, sweep.run_id, mode="min")][:3] == ["low", "mid", "high"]


# ---------------------------------------------------------------------------------------------
# Figures


def test_every_figure_renders_to_png_and_tolerates_an_absent_class(tmp_path: Path):
    rng = np.random.default_rng(0)
    labels = {"topic": np.array([0, 0, 1, 1, -1, 0, 1, 0]), "loud": np.array([1, 0, 1, 0, 1, 1, 0, -1])}
    probabilities = {"topic": rng.dirichlet(np.ones(3), 8), "loud": rng.dirichlet(np.ones(2), 8)}  # class 2 absent
    classes = {"topic": ("a", "b", "c"), "loud": ("quiet", "loud")}
    embeddings = {name: rng.normal(size=(8, 5)).astype(np.float32) for name in ("audio", "text", "joint")}
    figures = {
        "roc": plots.roc_curves(labels, probabilities, classes),
        "confusion": plots.confusion_matrices(labels, probabilities, classes),
        "cka": plots.cka_matrix(embeddings),
        "experts": plots.expert_utilisation(rng.dirichlet(np.ones(4), 8)),
        "attention": plots.segment_attention([rng.dirichlet(np.ones(6), 2), rng.dirichlet(np.ones(12), 2).reshape(2, 2, 6)],
                                             ["d1 audio", "d2 joint"]),
        "unlabelled": plots.roc_curves({"topic": -np.ones(8, dtype=int)}, {"topic": probabilities["topic"]}),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    legend = [t.get_text() for t in figures["roc"].axes[0].get_legend().get_texts()]
    assert "c: absent" in legend
    matrix = plots.cka_between(embeddings)
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)


def test_the_sweep_logs_an_epoch_a_resumed_trial_repeats_only_when_it_is_missing(experiment: Experiment):
    from types import SimpleNamespace

    from hilbert.sweep.callback import TrialRunsCallback
    from hilbert.train.loop import REPEATED_REPORT

    sweep = start_sweep(experiment)
    run = sweep.trial("t1")
    run.start()
    callback = TrialRunsCallback(experiment, sweep.run_id, "asha", print_line=None)
    trial = SimpleNamespace(trial_id="t1")
    callback.on_trial_result(0, [], trial, {"epoch": 0, "objective": 0.6})
    # The driver died after epoch 1 was checkpointed, before it logged it; on resume the trial
    # repeats its restored epoch: once when it is missing (1), not again when it is there (0).
    callback.on_trial_result(0, [], trial, {"epoch": 1, "objective": 0.7, REPEATED_REPORT: True})
    callback.on_trial_result(0, [], trial, {"epoch": 1, "objective": 0.7, REPEATED_REPORT: True})
    callback.on_trial_result(0, [], trial, {"epoch": 0, "objective": 0.6, REPEATED_REPORT: True})
    history = sorted((m.step, m.value) for m in experiment.client.get_metric_history(run.run_id, "objective"))
    assert history == [(0, 0.6), (1, 0.7)]
