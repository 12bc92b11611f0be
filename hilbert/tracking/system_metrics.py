"""A run's system metrics: this machine's CPU, memory and GPUs while the run trains.

Logged under the names MLflow's own system-metrics logging uses (``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``, ...), so the
MLflow UI shows them in the run's *System metrics* tab and trials compare on them. MLflow's
monitor (``mlflow.start_run(log_system_metrics=True)``) is not used because it opens its own
client to the tracking URI: a trial on another node of a cluster reaches the store only through
the sweep's relay (:mod:`hilbert.tracking.relay`), so the samples go through the experiment's
client like every other metric of the trial.

CPU and memory come from psutil (the whole machine: a node runs the trial's workers beside it);
GPU memory from torch, and GPU utilisation from NVML where ``pynvml`` is installed.
"""

from __future__ import annotations

import threading
from typing import Any

import psutil

from hilbert.tracking.runs import log_step
from hilbert.tracking.store import Experiment

PREFIX = "system/"


def sample() -> dict[str, float]:
    """One reading of this machine, keyed as MLflow's system metrics (without ``system/``).
    CPU utilisation is over the time since the previous call (the first call primes it)."""
    memory = psutil.virtual_memory()
    readings = {"cpu_utilization_percentage": psutil.cpu_percent(interval=None),
                "system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
                "system_memory_usage_percentage": memory.percent}
    readings.update(_gpu_readings())
    return readings


def _gpu_readings() -> dict[str, float]:
    import torch  # imported by every trial already; cuda is only queried when present

    readings: dict[str, float] = {}
    if not torch.cuda.is_available():
        return readings
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        readings[f"gpu_{index}_memory_usage_megabytes"] = (total - free) / 2**20
        readings[f"gpu_{index}_memory_usage_percentage"] = 100.0 * (total - free) / total
        try:
            readings[f"gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
        except Exception:  # no NVML (pynvml) here: memory only
            pass
    return readings


class SystemMetrics:
    """Sample every ``interval_s`` in a background thread and log each sample to ``run_id`` as
    step 0, 1, ...; a last sample when the context ends. ``interval_s`` 0 logs nothing."""

    def __init__(self, experiment: Experiment, run_id: str, interval_s: float = 10.0):
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.experiment = experiment
        self.run_id = run_id
        self.interval_s = interval_s
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "SystemMetrics":
        if self.interval_s > 0:
            sample()  # primes psutil's CPU counter: the first logged value covers the first interval
            self._thread = threading.Thread(target=self._run, name="hilbert-system-metrics", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._log()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._log()

    def _log(self) -> None:
        try:
            log_step(self.experiment, self.run_id, {PREFIX + key: value for key, value in sample().items()},
                     self.samples)
            self.samples += 1
        except Exception:  # a lost sample must never fail the trial it describes
            pass

