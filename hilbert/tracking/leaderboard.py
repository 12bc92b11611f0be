"""A sweep's results read back from MLflow: its trials ranked, their end states, and finding a
sweep by name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from hilbert.tracking.runs import ROLE_TAG, TRIAL_ID_TAG, child_runs
from hilbert.tracking.store import Experiment, mlflow_client

_NOT_KEY_METRICS = ("train/", "time/")


def leaderboard(experiment: Experiment, parent_run_id: str, objective: str = "objective", mode: str = "max"
                ) -> list[dict[str, Any]]:
    """The sweep's trials, best ``objective`` first (trials without one last), each with its run
    id, status, params and key metrics (the last value of every metric but training losses and
    timings)."""
    assert mode in ("max", "min"), mode
    rows = []
    for run in child_runs(experiment, parent_run_id):
        metrics = run.data.metrics
        value = metrics.get(objective, math.nan)
        rows.append({
            "trial_id": run.data.tags.get(TRIAL_ID_TAG), "run_id": run.info.run_id, "name": run.info.run_name,
            "status": run.info.status, "objective": value, "stopped_by": run.data.tags.get("stopped_by"),
            "params": dict(run.data.params),
            "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith(_NOT_KEY_METRICS)},
        })
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda row: (not math.isfinite(row["objective"]),
                                         sign * row["objective"] if math.isfinite(row["objective"]) else 0.0))


def find_sweep(uri: str, name: str | None = None, experiment: str | None = None) -> tuple[Experiment, Any]:
    """The parent run of sweep ``name`` (the latest sweep when None) in ``experiment`` (or any
    experiment of the store); LookupError names what exists when nothing matches."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise LookupError(f"no MLflow store at {uri} (pass --tracking-uri, e.g. sqlite:///hilbert-demo/runs/mlruns.db)")
    client = mlflow_client(uri)
    experiments = ([Experiment.open(uri, experiment)] if experiment else
                   [Experiment(uri, e.experiment_id, e.name) for e in client.search_experiments()])
    query = f"tags.`{ROLE_TAG}` = 'sweep'" + (f" and attributes.run_name = '{name}'" if name else "")
    found = []
    for candidate in experiments:
        found += [(candidate, run) for run in client.search_runs([candidate.experiment_id], query,
                                                                  order_by=["attributes.start_time DESC"])]
    if not found:
        every = [run.info.run_name for e in experiments
                 for run in client.search_runs([e.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")]
        raise LookupError(f"no sweep {name + ' ' if name else ''}in {uri}"
                          + (f" (sweeps: {', '.join(sorted(set(every)))})" if every else " (no sweeps at all)"))
    return max(found, key=lambda pair: pair[1].info.start_time)


def status_counts(rows: list[Mapping[str, Any]]) -> dict[str, int]:
    """How many runs of a leaderboard ended in each status."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
