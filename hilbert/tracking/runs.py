"""MLflow runs of sweeps: one parent run per sweep, one nested child run per trial, and the
queries that find them again.

What a trial needs to find its run is plain and picklable: an :class:`Experiment` (URI, id,
name), the parent run id and the trial id. Nesting uses MLflow's own ``mlflow.parentRunId`` tag
(the UI draws the tree from it); a ``trial_id`` tag lets a resumed sweep find a trial's run again,
reopen it and continue, instead of leaving a RUNNING orphan beside a new run. Runs end FINISHED
on success, FAILED on an exception, KILLED on Ctrl-C, SIGTERM or a scheduler stop;
:func:`close_unfinished_runs` ends whatever a killed process could not.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from hilbert.tracking.store import Experiment  # first: turns MLflow telemetry off

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402

from hilbert.evaluation.summary import FoldTable  # noqa: E402
from hilbert.tracking.names import finite_metrics, flatten_params, metric_key, to_json  # noqa: E402
from hilbert.tracking.provenance import provenance_tags  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
TRIAL_ID_TAG = "trial_id"
ROLE_TAG = "hilbert.role"  # "sweep" or "trial": lets queries tell the two apart
LOST_TAG = "lost"  # set on a trial run that the sweep, not the trial, had to end
ERROR_TAG = "error"  # why a trial failed (the end of its traceback)
PREVIOUS_ERROR_TAG = "previous_error"  # why its last attempt failed, on a trial that runs again
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"

# MLflow's limits (mlflow.utils.validation): 100 params and 1000 metrics per log_batch call.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


# ---------------------------------------------------------------------------------------------
# Ending runs: FINISHED, FAILED or KILLED, never left RUNNING


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks run and runs end KILLED."""


def status_for(error: BaseException | None) -> str:
    """FINISHED without an error; KILLED for Ctrl-C and SIGTERM; FAILED for anything else."""
    if error is None:
        return FINISHED
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        return KILLED
    if isinstance(error, SystemExit) and error.code in (0, None):
        return FINISHED
    return FAILED


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration of the block.

    Only where that is safe: in the main thread (Python delivers signals there, and
    ``signal.signal`` refuses other threads, such as a Ray Tune trial's) and only when nothing
    else handles SIGTERM yet (Ray, a web server) -- their handler is left alone. Without this,
    SIGTERM ends the process without running any ``finally``, and the run stays RUNNING.
    """
    installable = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if not installable:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# Runs


class _TrackedRun:
    """A run this process ends: a context manager that picks the end status from the exception."""

    experiment: Experiment
    run_id: str | None = None
    _ended = False

    def __enter__(self):
        self._guard = ExitStack()
        self._guard.enter_context(sigterm_raises_terminated())
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            self.end(self._status_on_exit(error))
        finally:
            self._guard.close()
        return False

    def _status_on_exit(self, error: BaseException | None) -> str:
        return status_for(error)

    def end(self, status: str = FINISHED) -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        assert status in (FINISHED, FAILED, KILLED), status
        if self._ended or self.run_id is None:
            return
        self.experiment.client.set_terminated(self.run_id, status)
        self._ended = True

    def log_figures(self, figures: Mapping[str, "Figure"], folder: str = "figures") -> list[str]:
        """Each figure as ``<folder>/<name>.png``; returns the artifact paths."""
        paths = []
        for name, figure in figures.items():
            path = f"{folder}/{metric_key(name).replace('/', '_')}.png"
            # No bbox_inches="tight": the figures' constrained layout already keeps every label
            # on the canvas, and "tight" draws each figure twice (~0.2 s a trial).
            self.experiment.client.log_figure(self.run_id, figure, path, save_kwargs={"dpi": 100})
            paths.append(path)
        return paths

    def _log_json(self, payload: Any, artifact_file: str) -> None:
        self.experiment.client.log_text(self.run_id, to_json(payload, indent=1) + "\n", artifact_file)


class SweepTracker(_TrackedRun):
    """The parent run of a sweep: what was searched, against which code, data and features."""

    def __init__(self, experiment: Experiment, run_id: str):
        self.experiment = experiment
        self.run_id = run_id

    @classmethod
    def start(cls, experiment: Experiment, name: str, *, search_space: Mapping[str, Any],
              objective: Any, manifest_fingerprint: str | None = None,
              encoders: Mapping[str, Any] | None = None, config: Any = None,
              tags: Mapping[str, str] | None = None) -> "SweepTracker":
        """Open the parent run. ``search_space`` maps a parameter to its (JSON-able) definition;
        ``encoders`` maps a modality to its encoder cache key or fingerprint; ``config`` is the
        sweep definition, kept as an artifact."""
        all_tags = {ROLE_TAG: "sweep", **provenance_tags(manifest_fingerprint, encoders), **(tags or {})}
        run = experiment.client.create_run(experiment.experiment_id, run_name=name, tags=all_tags)
        tracker = cls(experiment, run.info.run_id)
        compact = functools.partial(to_json, separators=(",", ":"), sort_keys=True)
        params = {metric_key(f"search/{key}"): compact(value) for key, value in search_space.items()}
        params["objective"] = compact(objective)
        _log_params(experiment.client, tracker.run_id, params)
        tracker._log_json(search_space, "sweep/search_space.json")
        tracker._log_json(objective, "sweep/objective.json")
        if encoders:
            tracker._log_json(encoders, "sweep/encoders.json")
        if config is not None:
            tracker._log_json(config, "sweep/config.json")
        return tracker

    @classmethod
    def attach(cls, experiment: Experiment, run_id: str) -> "SweepTracker":
        """Re-open the parent run of a sweep being resumed (it may have ended KILLED)."""
        client = experiment.client
        run = client.get_run(run_id)
        if run.info.experiment_id != experiment.experiment_id or run.data.tags.get(ROLE_TAG) != "sweep":
            raise ValueError(f"run {run_id} is not a hilbert sweep of experiment {experiment.name!r}")
        client.update_run(run_id, status=RUNNING)
        client.set_tag(run_id, "resumes", str(int(run.data.tags.get("resumes", "0")) + 1))
        return cls(experiment, run_id)

    def trial(self, trial_id: str, params: Mapping[str, Any] | None = None, *, name: str | None = None
              ) -> "TrialTracker":
        return TrialTracker(self.experiment, self.run_id, trial_id, params, name=name)

    def end(self, status: str = FINISHED) -> None:
        """End the sweep; trial runs still RUNNING then were lost with their process: KILLED."""
        if not self._ended:
            close_unfinished_runs(self.experiment, self.run_id, KILLED)
        super().end(status)


class TrialTracker(_TrackedRun):
    """The child run of one trial (a context manager; see the module docstring for end states).

    On entry it finds the run of the same ``trial_id`` under the same parent (a restored trial)
    and reopens it, or creates one; hyperparameters are logged as params (nested mappings as
    dotted keys) and in full as ``params.json``.
    """

    def __init__(self, experiment: Experiment, parent_run_id: str, trial_id: str,
                 params: Mapping[str, Any] | None = None, *, name: str | None = None,
                 tags: Mapping[str, str] | None = None):
        if not re.fullmatch(r"[\w.\-:]+", str(trial_id)):
            raise ValueError(f"trial_id {trial_id!r}: use letters, digits, '_', '-', '.', ':' only")
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.trial_id = str(trial_id)
        self.params = dict(params or {})
        self.name = name or self.trial_id
        self.tags = dict(tags or {})
        self.stopped_by: str | None = None

    def __enter__(self) -> "TrialTracker":
        self.start()
        return super().__enter__()

    def start(self) -> str:
        """Create (or reopen) the trial's run and log its hyperparameters; returns the run id."""
        client = self.experiment.client
        existing = find_trial_run(self.experiment, self.parent_run_id, self.trial_id)
        if existing is None:
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: self.trial_id, ROLE_TAG: "trial", **self.tags}
            self.run_id = client.create_run(self.experiment.experiment_id, run_name=self.name, tags=tags).info.run_id
            logged: dict[str, str] = {}
        else:
            self.run_id = existing.info.run_id
            client.update_run(self.run_id, status=RUNNING)
            client.set_tag(self.run_id, "attempts", str(int(existing.data.tags.get("attempts", "1")) + 1))
            for key, value in self.tags.items():  # this attempt's (where it runs, say), not the last one's
                client.set_tag(self.run_id, key, value)
            if LOST_TAG in existing.data.tags:  # running again after all
                client.delete_tag(self.run_id, LOST_TAG)
            if ERROR_TAG in existing.data.tags:  # a failed trial retried: its error is history now
                client.set_tag(self.run_id, PREVIOUS_ERROR_TAG, existing.data.tags[ERROR_TAG])
                client.delete_tag(self.run_id, ERROR_TAG)
            logged = existing.data.params
        self._ended = False
        self._log_new_params(flatten_params(self.params), logged)
        if self.params:
            self._log_json(self.params, "params.json")
        return self.run_id

    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's report (keys sanitised; NaN, infinite and non-numeric values skipped)."""
        log_step(self.experiment, self.run_id, metrics, step)

    def log_fold_table(self, per_fold: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
        """Per-fold metrics as ``folds/metrics.json`` and ``folds/metrics.csv``, plus the mean and
        sample standard deviation over folds as ``cv_mean/<name>`` and ``cv_std/<name>`` (the
        conventions of :class:`hilbert.evaluation.summary.FoldTable`, also behind ``hilbert train``'s
        table) and the count of folds that defined each as ``cv_defined/<name>``.

        A fold where a metric is undefined (NaN: AUC of a fold with one class) is left out of
        that metric's mean and counted out. Returns the summary metrics that were logged.
        """
        table = FoldTable.from_folds(per_fold)
        self._log_json(table.to_json(), "folds/metrics.json")
        self.experiment.client.log_text(self.run_id, table.to_csv(), "folds/metrics.csv")
        summary = {f"cv_mean/{name}": value for name, value in table.mean.items()}
        summary.update({f"cv_std/{name}": value for name, value in table.std.items()})
        summary.update({f"cv_defined/{name}": float(count) for name, count in table.defined.items()})
        logged = finite_metrics(summary)
        self.log_epoch(logged, step=0)
        return logged

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.experiment.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def mark_stopped(self, by: str = "scheduler") -> None:
        """The trial was stopped early (ASHA): on a normal exit the run ends KILLED, tagged why."""
        self.stopped_by = by

    def end(self, status: str = FINISHED) -> None:
        """End the run unless the sweep's driver already did (a scheduler stop ends it KILLED from
        there while this process is being stopped: that verdict stands)."""
        if self._ended or self.run_id is None:
            return
        if self.experiment.client.get_run(self.run_id).info.status != RUNNING:
            self._ended = True
            return
        if self.stopped_by:
            self.experiment.client.set_tag(self.run_id, "stopped_by", self.stopped_by)
        super().end(status)

    def _status_on_exit(self, error: BaseException | None) -> str:
        status = status_for(error)
        return KILLED if status == FINISHED and self.stopped_by else status

    def _log_new_params(self, params: dict[str, str], logged: Mapping[str, str]) -> None:
        """Log what a reopened run lacks; MLflow refuses to change a param, so a changed value is
        reported and kept as it was (params.json holds the new one)."""
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value[:6000])
        if changed:
            log.warning("trial %s: params %s differ from the earlier attempt; MLflow keeps the first values",
                        self.trial_id, changed)
        _log_params(self.experiment.client, self.run_id, {k: v for k, v in params.items() if k not in logged})


def log_step(experiment: Experiment, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Metrics of one step of run ``run_id`` (keys sanitised; NaN, infinite and non-numeric values
    skipped), in as few calls as MLflow allows."""
    timestamp = int(time.time() * 1000)
    entries = [Metric(key, value, timestamp, int(step)) for key, value in finite_metrics(metrics).items()]
    for start in range(0, len(entries), _METRICS_PER_BATCH):
        experiment.client.log_batch(run_id, metrics=entries[start:start + _METRICS_PER_BATCH])


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    entries = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(entries), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[start:start + _PARAMS_PER_BATCH])


# ---------------------------------------------------------------------------------------------
# Finding a sweep's runs again, and ending what a dead process left RUNNING


def child_runs(experiment: Experiment, parent_run_id: str, extra_filter: str = "") -> list:
    """Every (non-deleted) run nested under ``parent_run_id``, oldest first."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and {extra_filter}" if extra_filter else "")
    runs, token = [], None
    while True:
        page = experiment.client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time ASC"],
                                             page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_trial_run(experiment: Experiment, parent_run_id: str, trial_id: str):
    """The latest run of ``trial_id`` under the parent, or None."""
    runs = child_runs(experiment, parent_run_id, f"tags.{TRIAL_ID_TAG} = '{trial_id}'")
    return runs[-1] if runs else None


def close_unfinished_runs(experiment: Experiment, parent_run_id: str, status: str = KILLED,
                          include_parent: bool = False) -> int:
    """End every trial run of the sweep still RUNNING (and the parent too if asked): what a killed
    driver or trial process left behind. Returns how many runs were ended."""
    client = experiment.client
    stragglers = [run.info.run_id for run in child_runs(experiment, parent_run_id, f"attributes.status = '{RUNNING}'")]
    for run_id in stragglers:
        # Say why, in the run: a trial whose process died with a killed driver or node, or one
        # that started in the seconds before a killed driver's Tune saved its state (the resumed
        # Tune does not know it and proposes another trial in its place).
        client.set_tag(run_id, LOST_TAG, "no process was left running this trial when its sweep ended")
        client.set_terminated(run_id, status)
    if include_parent and client.get_run(parent_run_id).info.status == RUNNING:
        client.set_terminated(parent_run_id, status)
        return len(stragglers) + 1
    return len(stragglers)


def end_trial(experiment: Experiment, parent_run_id: str, trial_id: str, status: str = KILLED,
              stopped_by: str | None = None) -> bool:
    """End one trial's run from outside the trial (a Tune callback in the driver, after the
    scheduler stopped it or its process died). True if a RUNNING run was ended."""
    run = find_trial_run(experiment, parent_run_id, trial_id)
    if run is None or run.info.status != RUNNING:
        return False
    if stopped_by:
        experiment.client.set_tag(run.info.run_id, "stopped_by", stopped_by)
    experiment.client.set_terminated(run.info.run_id, status)
    return True
