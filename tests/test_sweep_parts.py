"""The sweep's pieces that decide without Ray running: what a trial asks for, how many trials fit,
when a scheduler may stop a trial, the objective's task weights, the held-out split and the
held-out baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler

from hilbert.config import ConfigError
from hilbert.data.demo import split_held_out
from hilbert.features.batches import LabelMaps
from hilbert.sweep.config import load_sweep
from hilbert.sweep.runner import _fitting_concurrency, _trial_resources
from hilbert.sweep.state import SweepError
from hilbert.sweep.search import make_scheduler
from hilbert.train.baseline import logistic_regression_held_out
from hilbert.evaluation.predictions import objective_score

REPOSITORY = Path(__file__).parents[1]


def demo_sweep(**changes):
    sweep = load_sweep(REPOSITORY / "tune" / "demo.yaml")
    for name, value in changes.items():
        setattr(sweep, name, value)
    return sweep


def test_a_ddp_trial_holds_no_cpu_and_a_one_worker_trial_holds_its_worker():
    sweep = demo_sweep()
    assert _trial_resources(sweep)["cpu"] == 0  # 2 workers: the Train workers hold the CPUs
    sweep.resources.workers_per_trial, sweep.resources.cpus_per_worker, sweep.resources.gpus_per_worker = 1, 2, 1
    assert _trial_resources(sweep) == {"cpu": 2, "gpu": 1, "memory": 1024 ** 2}


def test_concurrency_is_capped_to_what_the_local_machine_holds():
    lines: list[str] = []
    sweep = demo_sweep(concurrency=3)  # 2 workers x 1 CPU a trial
    assert _fitting_concurrency(sweep, {"CPU": 2.0}, local_ray=True, log=lines.append) == 1
    assert "lowered from 3 to 1" in lines[-1]
    assert _fitting_concurrency(sweep, {"CPU": 8.0}, local_ray=True, log=lines.append) == 3
    # A cluster that can grow keeps what was asked, with a note.
    assert _fitting_concurrency(sweep, {"CPU": 2.0}, local_ray=False, log=lines.append) == 3
    assert "autoscaler" in lines[-1]
    sweep.resources.workers_per_trial = 3
    with pytest.raises(SweepError, match="3 worker"):
        _fitting_concurrency(sweep, {"CPU": 2.0}, local_ray=True, log=lines.append)


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.config = trial_id, {}


def test_asha_never_stops_a_trial_on_its_final_report():
    # 20 epochs, grace 5, factor 2: ASHA has a rung at epoch 20, the last one.
    scheduler = make_scheduler(demo_sweep())
    good, poor = _Trial("good"), _Trial("poor")
    for trial in (good, poor):
        scheduler.on_trial_add(None, trial)
    for epoch in range(1, 21):
        assert scheduler.on_trial_result(None, good, {"epochs_completed": epoch, "objective": 0.9,
                                                      "active_folds": 5}) == TrialScheduler.CONTINUE
    # A poor trial that reaches its last epoch (or whose folds all stopped) finishes and logs its
    # model; one stopped at an intermediate rung is stopped.
    final = {"epochs_completed": 20, "objective": 0.1, "active_folds": 5}
    assert scheduler.on_trial_result(None, poor, final) == TrialScheduler.CONTINUE
    early = _Trial("early")
    scheduler.on_trial_add(None, early)
    assert scheduler.on_trial_result(None, early, {"epochs_completed": 5, "objective": 0.1, "active_folds": 0}) \
        == TrialScheduler.CONTINUE
    stopped = _Trial("stopped")
    scheduler.on_trial_add(None, stopped)
    assert scheduler.on_trial_result(None, stopped, {"epochs_completed": 5, "objective": 0.1, "active_folds": 5}) \
        == TrialScheduler.STOP


def test_objective_weights_make_a_weighted_mean_of_task_aucs():
    metrics = {"a/auc": 0.9, "b/auc": 0.5, "c/auc": math.nan}
    tasks = ["a", "b", "c"]
    assert objective_score(metrics, tasks) == pytest.approx(0.7)  # NaN task left out
    assert objective_score(metrics, tasks, objective_weights={"a": 3.0, "b": 1.0}) == pytest.approx((3 * 0.9 + 0.5) / 4)
    assert objective_score(metrics, tasks, objective_tasks=["b"]) == pytest.approx(0.5)
    assert math.isnan(objective_score(metrics, tasks, objective_tasks=["c"]))


def test_sweep_objective_weights_are_checked_and_reach_the_trial_config(tmp_path: Path):
    base = REPOSITORY / "tune" / "train-demo.yaml"
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {base}\nobjective: {{weights: {{stance: 2, topic: 1}}}}\n"
                    "search: {loss.lambda_cka: {type: loguniform, low: 0.01, high: 0.1}}\n")
    config = load_sweep(path).trial_config({})
    assert config.optimization.objective_weights == {"stance": 2, "topic": 1}
    path.write_text(f"base: {base}\nobjective: {{weights: {{stance: -1}}}}\n"
                    "search: {loss.lambda_cka: {type: loguniform, low: 0.01, high: 0.1}}\n")
    with pytest.raises(ConfigError, match="weights"):
        load_sweep(path)


def test_held_out_split_keeps_speakers_apart_and_is_deterministic(tmp_path: Path):
    records = [{"doc_id": f"d{i}", "audio": "a.wav", "segments": [], "labels": {}, "group": f"s{i % 10}"}
               for i in range(100)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    development, held_out = split_held_out(manifest, 0.2, seed=3)
    dev = [json.loads(line) for line in development.read_text().splitlines()]
    out = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in dev + out) == sorted(r["doc_id"] for r in records)
    assert not {r["group"] for r in dev} & {r["group"] for r in out}
    assert len(out) == 20
    first = held_out.read_bytes()
    split_held_out(manifest, 0.2, seed=3)
    assert held_out.read_bytes() == first


def test_held_out_baseline_fits_on_training_documents_only():
    rng = np.random.default_rng(0)
    maps = LabelMaps({"t": ("x", "y")})
    train = rng.normal(size=(60, 3))
    train_labels = {"t": (train[:, 0] > 0).astype(int)}
    test = rng.normal(size=(30, 3))
    truth = {"t": (test[:, 0] > 0).astype(int)}
    assert logistic_regression_held_out(train, train_labels, test, truth, maps)["t/auc"] > 0.95
    # Scores on the held-out side use its labels only to score: flipped labels, mirrored AUC.
    flipped = {"t": 1 - truth["t"]}
    assert logistic_regression_held_out(train, train_labels, test, flipped, maps)["t/auc"] < 0.05
