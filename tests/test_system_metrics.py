"""A trial run's system metrics: sampled in the background under MLflow's names, a sample per
interval plus one at the end, nothing after it, and never an error for the run they describe."""

from __future__ import annotations

import time

import psutil
import pytest

from hilbert.tracking.runs import SweepTracker, TrialTracker
from hilbert.tracking.store import Experiment
from hilbert.tracking.system_metrics import SystemMetrics


@pytest.fixture
def run(tmp_path):
    experiment = Experiment.open(f"sqlite:///{tmp_path / 'mlruns.db'}", "system")
    sweep = SweepTracker.start(experiment, "sweep", search_space={}, objective={"mode": "max"})
    with TrialTracker(experiment, sweep.run_id, "t0") as trial:
        yield experiment, trial.run_id


def history(experiment: Experiment, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in experiment.client.get_metric_history(run_id, key))


def test_samples_arrive_every_interval_and_stop_with_the_context(run):
    experiment, run_id = run
    with SystemMetrics(experiment, run_id, interval_s=0.1) as metrics:
        deadline = time.monotonic() + 10
        while metrics.samples < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    logged = metrics.samples
    assert logged >= 4  # three in the background, one at the end
    time.sleep(0.3)
    assert metrics.samples == logged  # the thread is gone

    cpu = history(experiment, run_id, "system/cpu_utilization_percentage")
    assert [step for step, _ in cpu] == list(range(logged))
    assert all(0.0 <= value <= 100.0 * psutil.cpu_count() for _, value in cpu)
    memory = history(experiment, run_id, "system/system_memory_usage_megabytes")
    assert len(memory) == logged
    assert all(0 < value <= psutil.virtual_memory().total / 2**20 for _, value in memory)
    percent = history(experiment, run_id, "system/system_memory_usage_percentage")
    assert all(0 < value <= 100 for _, value in percent)


def test_an_interval_of_zero_logs_nothing(run):
    experiment, run_id = run
    with SystemMetrics(experiment, run_id, interval_s=0) as metrics:
        time.sleep(0.1)
    assert metrics.samples == 0
    assert not [key for key in experiment.client.get_run(run_id).data.metrics if key.startswith("system/")]
    with pytest.raises(ValueError, match="interval_s"):
        SystemMetrics(experiment, run_id, interval_s=-1)


class RefusingClient:
    def log_batch(self, *args, **kwargs):
        raise ConnectionError("the store went away")


def test_a_store_that_refuses_a_sample_does_not_fail_the_run(run):
    experiment, run_id = run
    broken = Experiment(experiment.uri, experiment.experiment_id, experiment.name, relayed=RefusingClient())
    with SystemMetrics(broken, run_id, interval_s=0.05):
        time.sleep(0.2)  # several refused samples in the thread, and one at the end: none raises
