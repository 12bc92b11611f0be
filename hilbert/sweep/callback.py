"""The sweep driver's view of its trials (a Tune callback): every epoch a trial reports goes to
its MLflow run, the end states a trial cannot write itself are written here, and a line per
trial (and a table every minute) goes to the terminal."""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback
from rich import box
from rich.console import Console
from rich.table import Table

from hilbert.sweep.trial import RESTORED, trial_run_name
from hilbert.tracking.runs import ERROR_TAG, FAILED, FINISHED, KILLED, TrialTracker, end_trial, find_trial_run, log_step
from hilbert.tracking.store import Experiment
from hilbert.train.report import EPOCHS_COMPLETED, OBJECTIVE, REPEATED_REPORT, TEST_OBJECTIVE, epoch_metrics

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours in Ray's error text


def _print_line(line: str) -> None:
    """The callback's default output. Not ``print`` itself: Tune pickles the callback with its
    state, and a process where Ray Train has run replaces ``builtins.print``, which then no longer
    pickles by reference."""
    print(line, flush=True)


class TrialRunsCallback(Callback):
    """Per-epoch metrics into each trial's run, and the end state the trial could not write.

    A result that Tune marks ``done`` before the trial returned means a scheduler (ASHA) stopped
    the trial: its run ends KILLED, tagged ``stopped_by``. A trial that errors ends FAILED with
    the error in a tag (a run is created for it if it died before opening one).
    """

    def __init__(self, experiment: Experiment, parent_run_id: str, scheduler: str,
                 print_line: Callable[[str], None] | None = _print_line):
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.scheduler = scheduler
        self.print_line = print_line
        self._run_ids: dict[str, str] = {}
        self._stopped: set[str] = set()
        self._best: tuple[float, str] | None = None
        self._last_table = time.monotonic()
        self._last_progress: tuple = ()
        self._started: dict[str, float] = {}

    def _run_id(self, trial_id: str) -> str | None:
        if trial_id not in self._run_ids:
            run = find_trial_run(self.experiment, self.parent_run_id, trial_id)
            if run is None:
                return None
            self._run_ids[trial_id] = run.info.run_id
        return self._run_ids[trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.time()
        if self.print_line is not None:
            sampled = ", ".join(f"{key}={_short(value)}" for key, value in sorted(_config_of(trial).items()))
            self.print_line(f"{trial_run_name(trial.trial_id)} started: {sampled}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id = trial.trial_id
        run_id = self._run_id(trial_id)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if run_id is not None and not result.get(RESTORED) and not self._already_logged(run_id, step, result):
            log_step(self.experiment, run_id, epoch_metrics(result), step=step)
        value = result.get(OBJECTIVE)
        if isinstance(value, (int, float)) and math.isfinite(value) and (self._best is None or value > self._best[0]):
            self._best = (float(value), trial_id)
        if result.get("done"):
            self._stopped.add(trial_id)
            end_trial(self.experiment, self.parent_run_id, trial_id, KILLED, stopped_by=self.scheduler)

    def _already_logged(self, run_id: str, step: int, result: dict[str, Any]) -> bool:
        """A resumed trial repeats the report of the epoch it restored (the driver that should
        have logged it may have died first): log it once."""
        if not result.get(REPEATED_REPORT):
            return False
        return any(m.step == step for m in self.experiment.client.get_metric_history(run_id, OBJECTIVE))

    def on_trial_complete(self, iteration, trials, trial, **info):
        stopped = trial.trial_id in self._stopped
        run_id = self._run_id(trial.trial_id)
        if run_id is not None and trial.trial_id in self._started:  # from Tune's start to Tune's end
            self.experiment.client.log_metric(run_id, "time/trial_wall_seconds",
                                              time.time() - self._started[trial.trial_id])
        end_trial(self.experiment, self.parent_run_id, trial.trial_id, KILLED if stopped else FINISHED,
                  stopped_by=self.scheduler if stopped else None)
        epochs = (trial.last_result or {}).get(EPOCHS_COMPLETED, "?")
        objective = (trial.last_result or {}).get(OBJECTIVE, math.nan)
        test = (trial.last_result or {}).get(TEST_OBJECTIVE)
        self._say(f"{trial_run_name(trial.trial_id)} {'stopped by ' + self.scheduler if stopped else 'finished'} "
                  f"after {epochs} epoch(s): val objective {objective:.4f}"
                  + (f", test {test:.4f}" if test is not None else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        message = _error_summary(trial)
        if not end_trial(self.experiment, self.parent_run_id, trial.trial_id, FAILED):
            if find_trial_run(self.experiment, self.parent_run_id, trial.trial_id) is None:
                # Died before opening its run: record the failure anyway.
                with TrialTracker(self.experiment, self.parent_run_id, trial.trial_id, _config_of(trial),
                                  name=trial_run_name(trial.trial_id)) as tracker:
                    tracker.end(FAILED)
        run = find_trial_run(self.experiment, self.parent_run_id, trial.trial_id)
        if run is not None:  # the cause is at the end of a traceback: keep the end
            self.experiment.client.set_tag(run.info.run_id, ERROR_TAG, message[-5000:])
        self._say(f"{trial_run_name(trial.trial_id)} FAILED: {message.splitlines()[-1] if message else 'no message'}")

    def _say(self, line: str) -> None:
        if self.print_line is None:
            return
        best = f" | best val so far {self._best[0]:.4f} ({trial_run_name(self._best[1])})" if self._best else ""
        self.print_line(line + best)

    def on_step_end(self, iteration, trials, **info):
        # A status table every minute: which trials run, how far, how good.
        if self.print_line is None or time.monotonic() - self._last_table < 60:
            return
        progress = tuple((t.trial_id, t.status, (t.last_result or {}).get(EPOCHS_COMPLETED)) for t in trials)
        if progress != self._last_progress:
            self._last_table, self._last_progress = time.monotonic(), progress
            self.print_line(trial_table(trials))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_table(trials) -> str:
    """Text table of Tune trials: status, epochs, validation objective (best first)."""
    rows = []
    for trial in trials:
        result = trial.last_result or {}
        objective = result.get(OBJECTIVE)
        rows.append((trial_run_name(trial.trial_id), trial.status, str(result.get(EPOCHS_COMPLETED, 0)),
                     f"{objective:.4f}" if isinstance(objective, float) and math.isfinite(objective) else "-"))
    rows.sort(key=lambda row: row[3] if row[3] != "-" else "", reverse=True)
    table = Table("trial", "status", "epochs", "val objective", box=box.SIMPLE_HEAD, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    text = Console(file=io.StringIO(), width=200, color_system=None)  # to text: the log may be a file
    text.print(table)
    return text.file.getvalue().rstrip("\n")


def _config_of(trial) -> dict[str, Any]:
    return dict(getattr(trial, "config", {}) or {})


def _error_summary(trial) -> str:
    """The error a trial raised, as text (Tune keeps it in a file beside the trial's state)."""
    for attribute in ("error_msg", "error_message"):
        text = getattr(trial, attribute, None)
        if isinstance(text, str) and text:
            return _ANSI.sub("", text)
    path = getattr(trial, "error_file", None)
    try:
        return _ANSI.sub("", Path(path).read_text(encoding="utf-8", errors="replace").strip()) if path else ""
    except OSError:
        return ""
