"""Ray Train paths on a 2-CPU local Ray: 2-worker DDP (gloo) training, and recovery after a worker dies."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from hilbert.config import from_dict
from hilbert.train.checkpoint import load_model
from hilbert.train.config import TrainConfig
from hilbert.train.run import collect_fold_models, build_trainer
from test_training import synthetic_plan

pytestmark = pytest.mark.slow


def two_worker_config(plan: dict) -> TrainConfig:
    config = from_dict(TrainConfig, plan["config"])
    config.scaling.num_workers = 2
    config.scaling.cpus_per_worker = 1.0
    config.scaling.max_failures = 2
    return config


def test_two_worker_ddp_run_trains_every_fold_and_checkpoints(local_ray, tmp_path: Path):
    plan = synthetic_plan(tmp_path, epochs=3)
    fit = build_trainer(plan, two_worker_config(plan), "ddp", tmp_path / "ray").fit()
    assert fit.error is None
    assert fit.metrics["epoch"] == 2 and fit.metrics["objective"] > 0.55 and fit.metrics["test/objective"] > 0.55
    folds, folder = collect_fold_models(fit, tmp_path / "models")
    assert sorted(folds) == [0, 1] and all(f["test/loud/auc"] > 0.7 for f in folds.values())
    model, info = load_model(Path(folder) / "fold_0")
    assert info.label_maps.tasks == ["loud", "topic"] and info.training["variant"] == "hilbert"


def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(local_ray, tmp_path: Path):
    from ray.util.state import list_actors

    plan = synthetic_plan(tmp_path, epochs=6)
    storage = tmp_path / "ray"
    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if any(storage.rglob("state.json")):
                workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                           if "TrainWorker" in (a.class_name or "")]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(workers[-1].pid)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True)
    killer.start()
    fit = build_trainer(plan, two_worker_config(plan), "fault", storage).fit()
    killer.join(timeout=5)
    assert killed, "the test never found a worker to kill"
    assert fit.error is None and fit.metrics["epoch"] == 5
    with fit.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text())
    assert state["epoch"] == 5
