"""Sweeps on Ray Tune: Optuna proposes, ASHA prunes, each trial is a k-fold Ray Train DDP run,
MLflow records everything, and the best trial's model is registered as the ``challenger``.

Who runs where:

- the **driver** (``hilbert sweep``) validates the corpus, makes sure the features of every
  encoder pair are cached, fixes the folds, opens the sweep's parent MLflow run and runs the
  ``Tuner``. Its :class:`TrialRunsCallback` logs every epoch a trial reports and ends trial runs
  the trials cannot end themselves: stopped by the scheduler (KILLED) or crashed (FAILED).
- a **trial** (:func:`hilbert_trial`, a Tune function trainable) opens its child run, builds a
  ``TorchTrainer`` whose workers train every fold in lockstep and report one result per epoch
  through ``TuneReportCallback`` (a one-worker trial runs the same loop in its own actor instead:
  no DDP to set up, and ~11 s a trial less; and Tune hands that actor the next trial, so its
  imports, MLflow store and features are paid once per actor, not per trial), then logs the fold
  table, figures and the model (safetensors + JSON) to its run.

Resources: a DDP trial asks Tune for no CPU (only a token of memory, since Tune refuses an empty
bundle); its Train workers ask for ``workers_per_trial x cpus_per_worker``. A trial that also
held a CPU would, on a 2-CPU machine, wait forever for workers that cannot be placed next to it.
Concurrency is capped so that the trials' workers fit the cluster.

Resuming: Tune's experiment state (with the Optuna study inside the searcher's state), each
trial's latest epoch checkpoint (:class:`TrialCheckpoints` for one-worker trials, Train's for
DDP trials) and ``sweep.json`` (the parent run, the tracking store) live in the sweep folder: a
local path, or on a cluster a shared file system or an object-store URI. ``hilbert sweep
--resume NAME`` restores the Tuner (after :func:`~hilbert.sweep.search.repair_saved_search`
makes the searcher's saved state agree with the saved trials); finished trials are kept,
unfinished ones continue from their last epoch checkpoint, and with ``retry_failed`` errored
ones run again. A trial whose node died is restarted by Tune (``max_failures``) from the same
checkpoint, on any node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ray.tune import Callback

from hilbert import storage
from hilbert.config import from_dict, to_dict
from hilbert.ray_runtime import connect, dashboard_url, installed_versions, require_versions
from hilbert.sweep.config import SweepConfig, load_sweep
from hilbert.sweep.relay import needs_relay, start_relay
from hilbert.sweep.search import OBJECTIVE, TIME_ATTR, make_scheduler, make_searcher, repair_saved_search
from hilbert.sweep.tracking import (ERROR_TAG, FAILED, FINISHED, KILLED, Experiment, SweepTracker, TrialTracker,
                                    end_trial, find_trial_run, leaderboard, log_step, resolve_tracking_uri,
                                    source_tags, status_counts)
from hilbert.train.config import TrainConfig

STATE_FILE = "sweep.json"
RESTORED = "restored_from_mlflow"  # a result re-reported from a finished run, not a new epoch
# What a trial reports that belongs in MLflow (Tune adds pids, hostnames, timestamps, ...).
TEST_OBJECTIVE = "test/objective"  # the final report's mean over folds of the test score
_REPORTED = ("objective", TEST_OBJECTIVE, "epoch_score", "epoch", "epochs_completed", "active_folds")
_REPORTED_PREFIXES = ("val/", "train/", "time/")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours in Ray's error text


class SweepError(RuntimeError):
    """A sweep that cannot start or resume as asked (the message says what to change)."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl-C): its run ends KILLED, nothing is
    registered, and ``--resume`` continues it."""


# ---------------------------------------------------------------------------------------------
# Where a sweep keeps its state


@dataclass(frozen=True)
class SweepFolder:
    """``<sweeps dir>/<name>/``: ``sweep.json``, Tune's state (``tune/``: the Optuna study, trial
    results) and the trials' epoch checkpoints (``train/<trial_id>/``: one-worker trials'
    :class:`TrialCheckpoints`, DDP trials' Train runs). A local path, or a URI
    (``s3://bucket/sweeps/NAME``) that every node of a cluster reaches."""

    root: str

    @classmethod
    def of(cls, sweeps_dir: str | Path, name: str) -> "SweepFolder":
        return cls(storage.join(storage.absolute(sweeps_dir), name))

    @property
    def name(self) -> str:
        return storage.name_of(self.root)

    @property
    def parent(self) -> str:
        return storage.parent_of(self.root)

    @property
    def state_file(self) -> str:
        return storage.join(self.root, STATE_FILE)

    @property
    def tune(self) -> str:
        return storage.join(self.root, "tune")

    @property
    def train(self) -> str:
        return storage.join(self.root, "train")


def sweeps_dir_for(config: TrainConfig) -> str:
    return storage.join(str(config.output_dir), "sweeps")


@dataclass
class SweepState:
    """What ``sweep.json`` holds: enough to resume without the YAML files."""

    name: str
    sweep: dict[str, Any]
    base_config: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    created: str
    registered_version: str | None = None
    registered_run_id: str | None = None

    def sweep_config(self) -> SweepConfig:
        # base_config is derived (init=False): it is stored apart, as base_config.
        sweep = from_dict(SweepConfig, {k: v for k, v in self.sweep.items() if k != "base_config"})
        sweep.base_config = from_dict(TrainConfig, self.base_config)
        return sweep

    def write(self, folder: SweepFolder) -> None:
        storage.write_text(folder.state_file, json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, folder: SweepFolder) -> "SweepState":
        try:
            return cls(**json.loads(storage.read_text(folder.state_file)))
        except FileNotFoundError:
            raise SweepError(f"no sweep at {folder.root} (no {STATE_FILE}): check the name and --sweeps-dir") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise SweepError(f"{folder.state_file} is unreadable ({error})") from error


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Tune actor)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent once through Ray's object store)."""

    sweep: SweepConfig
    plans: dict[str, dict[str, Any]]  # encoder pair key -> training plan (the config is replaced per trial)
    classes: dict[str, list[str]]
    experiment: Experiment
    parent_run_id: str
    folder: SweepFolder
    run_tags: dict[str, str] = dataclasses.field(default_factory=dict)  # user, source, commit for each trial
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # the driver's (ray_runtime.installed_versions)


def pair_key(audio_encoder: str, text_encoder: str) -> str:
    return f"{audio_encoder}|{text_encoder}"


def trial_run_name(trial_id: str) -> str:
    """``trial-3f2a1c04`` for Tune's trial id ``3f2a1c04``: what the terminal and MLflow show."""
    return f"trial-{trial_id}"


def hilbert_trial(sampled: dict[str, Any], setup: TrialSetup) -> None:
    """Train one configuration under k-fold CV on Ray Train and log it to the trial's run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hilbert.evaluation.out_of_fold import out_of_fold_outputs, predictions_table
    from hilbert.sweep.diagnostics import trial_figures
    from hilbert.sweep.registry import log_model
    from hilbert.train.run import build_trainer, collect_fold_models

    entered = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    # A node the autoscaler started after the sweep's own check (ray_runtime.connect) is checked here.
    require_versions(setup.versions, f"the node of trial {trial_id} ({_node_tags()['ray.node_ip']})")
    if _report_if_already_finished(setup, trial_id):
        return
    values = setup.sweep.trial_values(_unflatten_keys(sampled))
    config = setup.sweep.trial_config(values)
    trained = to_dict(config.variant("hilbert"))
    plan = {**setup.plans[pair_key(config.data.audio_encoder, config.data.text_encoder)], "config": trained}
    # Every hyperparameter of the trial: the searched values, then the whole training config.
    params = {**values, "config": trained}
    with TrialTracker(setup.experiment, setup.parent_run_id, trial_id, params, name=trial_run_name(trial_id),
                      tags={**setup.run_tags, **_node_tags()}) as run:
        # The best fold models, on this node only until they are logged (the run keeps them).
        local = Path(tempfile.mkdtemp(prefix=f"hilbert-trial-{trial_id}-"))
        try:
            fitting = time.perf_counter()
            if config.scaling.num_workers == 1:
                per_fold, models = _train_in_trial(plan, config, storage.join(setup.folder.train, trial_id),
                                                   local / "model")
            else:
                # Same Train run name on every attempt: a restarted trial resumes from its last epoch.
                trainer = build_trainer(plan, config, trial_id, setup.folder.train, callbacks=[TuneReportCallback()])
                per_fold, models = collect_fold_models(trainer.fit(), local / "model")
            fitted = time.perf_counter()
            run.log_fold_table(per_fold)
            outputs = out_of_fold_outputs(Path(models), plan)
            run.log_figures(trial_figures(outputs, setup.classes))
            # Every test prediction (doc_id, fold, task, class probabilities): what the trial's
            # test figures came from, for any later analysis or paired comparison.
            table = predictions_table(outputs.test_predictions({}), setup.classes)
            storage.write_parquet(table, local / "test_predictions" / "hilbert.parquet")
            run.log_artifacts(local / "test_predictions", "test_predictions")
            log_model(run.run_id, models, client=setup.experiment.client)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        # Where a trial's time goes beyond its epochs (docs/benchmarks.md): before Train starts,
        # Train's whole fit (worker start-up + epochs), and logging results afterwards.
        run.log_epoch({"time/trial_setup_seconds": fitting - entered, "time/fit_seconds": fitted - fitting,
                       "time/trial_logging_seconds": time.perf_counter() - fitted}, step=0)


def _node_tags() -> dict[str, str]:
    """Where this attempt of the trial runs (its Tune actor's node and process): a trial retried
    after its node died shows the node it finished on."""
    import ray

    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address(),
            "ray.pid": str(os.getpid())}


class TrialCheckpoints:
    """A one-worker trial's epoch checkpoints in ``<sweep>/train/<trial_id>`` (a path or a URI).

    Each checkpoint is moved (or on another file system, copied) there whole, then ``latest``
    (one small file, written in one piece) names it, then older ones are deleted: a reader finds
    the previous checkpoint or the new one, never half of one, on a file system or an object
    store, whatever moment the writer's process or node died. This does not depend on Tune's
    saved state, which may be seconds older than the last epoch when the driver is killed (on an
    object store, Tune uploads it in the background).
    """

    LATEST = "latest"

    def __init__(self, location: str):
        self.folder = storage.Folder(location)

    def save(self, local: Path, epoch: int) -> None:
        name = f"checkpoint_{epoch:06d}"
        self.folder.move_in(local, name)  # the loop's temporary checkpoint: no need to copy it
        self.folder.write_bytes(self.LATEST, name.encode("utf-8"))
        for older in self.folder.folders():
            if older.startswith("checkpoint_") and older != name:
                self.folder.remove(older)

    def restore(self, into: Path) -> Path | None:
        """The latest checkpoint, to read (not to change): in place on a local file system, else
        copied into ``into``; None when there is none yet."""
        if not self.folder.exists(self.LATEST):
            return None
        name = self.folder.read_bytes(self.LATEST).decode("utf-8").strip()
        return self.folder.local_path(name) or self.folder.download(name, into / name)


def _train_in_trial(plan: dict[str, Any], config: TrainConfig, checkpoints: str, destination: Path
                    ) -> tuple[dict[int, dict[str, float]], str]:
    """A one-worker trial trains in its own Tune actor: DDP has nothing to do with one process,
    and Ray Train's controller and worker group cost ~11 s a trial to start on 2 cores (see
    docs/benchmarks.md). Same loop, same per-epoch reports. Each epoch's checkpoint goes to the
    sweep's storage (:class:`TrialCheckpoints`), so a trial restarted on any node (its node died,
    or the driver was killed and the sweep resumed) continues from its last epoch."""
    import torch
    from ray import tune

    from hilbert.train.loop import WorkerContext, train_folds
    from hilbert.train.run import fold_models_from_checkpoint

    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    stored = TrialCheckpoints(checkpoints)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is not None:
            stored.save(folder, int(metrics["epoch"]))
        tune.report(metrics)

    train_folds(plan, WorkerContext(device=torch.device("cuda" if use_gpu else "cpu"), report=report,
                                    resume_from=stored.restore(destination.parent / "restored")))
    final = stored.restore(destination.parent / "final")  # the last epoch's (or the restored one)
    if final is None:
        raise RuntimeError(f"training wrote no checkpoint under {storage.shown(checkpoints)}")
    return fold_models_from_checkpoint(final, destination)


def _report_if_already_finished(setup: TrialSetup, trial_id: str) -> bool:
    """A trial that finished and logged its model, but that Tune's saved state (written every few
    seconds) still shows running when the driver died, is not trained again on resume: its
    final result is reported from MLflow so the searcher still learns it."""
    from ray import tune

    from hilbert.sweep.registry import MODEL_FOLDER

    run = find_trial_run(setup.experiment, setup.parent_run_id, trial_id)
    if run is None or run.info.status != FINISHED or OBJECTIVE not in run.data.metrics:
        return False
    if not setup.experiment.client.list_artifacts(run.info.run_id, MODEL_FOLDER):
        return False
    metrics = {key: value for key, value in run.data.metrics.items() if key in _REPORTED}
    tune.report({**metrics, RESTORED: True})
    return True


def _unflatten_keys(sampled: dict[str, Any]) -> dict[str, Any]:
    """Tune hands the sampled values back as given (dotted keys); a nested dict (should Tune
    unflatten ``a/b`` keys) is flattened back to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in sampled.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in _unflatten_keys(value).items()})
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------------
# The driver's view of trials: MLflow runs and a line per finished trial


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
            metrics = {k: v for k, v in result.items() if k in _REPORTED or k.startswith(_REPORTED_PREFIXES)}
            log_step(self.experiment, run_id, metrics, step=step)
        value = result.get(OBJECTIVE)
        if isinstance(value, (int, float)) and math.isfinite(value) and (self._best is None or value > self._best[0]):
            self._best = (float(value), trial_id)
        if result.get("done"):
            self._stopped.add(trial_id)
            end_trial(self.experiment, self.parent_run_id, trial_id, KILLED, stopped_by=self.scheduler)

    def _already_logged(self, run_id: str, step: int, result: dict[str, Any]) -> bool:
        """A resumed trial repeats the report of the epoch it restored (the driver that should
        have logged it may have died first): log it once."""
        from hilbert.train.loop import REPEATED_REPORT

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
        epochs = (trial.last_result or {}).get(TIME_ATTR, "?")
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
        progress = tuple((t.trial_id, t.status, (t.last_result or {}).get(TIME_ATTR)) for t in trials)
        if progress != self._last_progress:
            self._last_table, self._last_progress = time.monotonic(), progress
            self.print_line(trial_table(trials))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_table(trials) -> str:
    """Plain-text table of Tune trials: status, epochs, objective (best first)."""
    rows = []
    for trial in trials:
        result = trial.last_result or {}
        objective = result.get(OBJECTIVE)
        rows.append((trial_run_name(trial.trial_id), trial.status, str(result.get(TIME_ATTR, 0)),
                     f"{objective:.4f}" if isinstance(objective, float) and math.isfinite(objective) else "-"))
    rows.sort(key=lambda row: row[3] if row[3] != "-" else "", reverse=True)
    header = ("trial", "status", "epochs", "val objective")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepResult:
    name: str
    folder: str  # a path or a URI
    tracking_uri: str
    experiment: Experiment
    parent_run_id: str
    rows: list[dict[str, Any]]  # the leaderboard, best first
    best: dict[str, Any] | None
    model_name: str
    model_version: str | None
    seconds: float

    @property
    def counts(self) -> dict[str, int]:
        return status_counts(self.rows)


def run_sweep(sweep_file: str | Path | None = None, *, name: str | None = None, resume: str | None = None,
              sweeps_dir: str | Path | None = None, address: str | None = None, tracking_uri: str | None = None,
              retry_failed: bool = False, overrides: dict[str, Any] | None = None, trials: int | None = None,
              manifest=None, feature_sets: dict | None = None, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or, with ``resume=NAME``, continue) a sweep; returns its leaderboard and the model
    version registered as ``challenger``.

    ``sweep_file`` is a ``tune/*.yaml``; when resuming it may be left out (``sweep.json`` in the
    sweep folder holds the definition). ``sweeps_dir`` defaults to ``<output_dir>/sweeps`` of
    the base config (``runs/sweeps`` when resuming without a file). ``overrides`` edit the base
    training config (see :func:`load_sweep`), ``trials`` the number of trials (a new sweep only:
    the sweep folder keeps what it was started with). A caller that has validated the corpus or cached
    its features passes ``manifest`` and ``feature_sets`` (encoder pair key -> FeatureSet).
    """
    started = time.perf_counter()
    if resume:
        folder, state = _locate(resume, sweep_file, sweeps_dir, overrides)
        sweep = state.sweep_config()
    else:
        if sweep_file is None:
            raise SweepError("name a sweep file (tune/*.yaml), or --resume NAME")
        sweep = load_sweep(sweep_file, overrides)
        assert sweep.base_config is not None
        if trials is not None:
            if trials < 1:
                raise SweepError(f"trials must be >= 1, got {trials}")
            sweep.trials = trials
        name = name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = SweepFolder.of(sweeps_dir or sweeps_dir_for(sweep.base_config), name)
        if storage.exists(folder.state_file):
            raise SweepError(f"a sweep named {name!r} exists at {folder.root}: continue it with --resume {name} "
                             "or pick another --name")
        state = None
    assert sweep.base_config is not None
    uri = (state.tracking_uri if state else
           resolve_tracking_uri(tracking_uri or sweep.tracking.uri, Path(sweep.base_config.output_dir)))
    if state and tracking_uri and tracking_uri != state.tracking_uri:
        raise SweepError(f"sweep {resume!r} logs to {state.tracking_uri}; it cannot move to {tracking_uri}")

    prepared = _prepare(sweep, manifest=manifest, feature_sets=feature_sets, address=address, log=log)
    experiment = Experiment.open(uri, state.experiment if state else sweep.tracking.experiment)
    if state is None:
        tracker = SweepTracker.start(
            experiment, folder.name, search_space={k: _defined(p) for k, p in sweep.search.items()},
            objective=dataclasses.asdict(sweep.objective), manifest_fingerprint=prepared.manifest_sha256,
            encoders=prepared.encoder_keys, config={"sweep": to_dict(sweep), "base": to_dict(sweep.base_config)},
            tags={"sweep_folder": folder.root})
        state = SweepState(folder.name, to_dict(sweep), to_dict(sweep.base_config), uri, experiment.name,
                           tracker.run_id, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        state.write(folder)
    else:
        tracker = SweepTracker.attach(experiment, state.parent_run_id)
    log(f"sweep {state.name}: folder {folder.root}; MLflow {uri}, experiment {experiment.name!r}, "
        f"parent run {state.parent_run_id}")

    with tracker, _working_in(folder.root if not storage.is_uri(folder.root) else tempfile.gettempdir()):
        _run_tuner(sweep, prepared, TrialSetup(sweep, prepared.plans, prepared.classes, experiment,
                                               state.parent_run_id, folder, source_tags(), installed_versions()),
                   folder, address=address, resuming=resume is not None, retry_failed=retry_failed, log=log)
        rows = leaderboard(experiment, state.parent_run_id, OBJECTIVE)
        best, version = _register_best(sweep, state, folder, experiment, rows, log)
        _summarise_in_parent(tracker, rows, best, version)
    return SweepResult(state.name, folder.root, uri, experiment, state.parent_run_id, rows, best,
                       sweep.tracking.model_name, version, time.perf_counter() - started)


@contextlib.contextmanager
def _working_in(folder: Path) -> Iterator[None]:
    """Run the sweep from its own folder, and come back after.

    A job submitted with ``--working-dir`` starts in Ray's copy of that folder, and Ray may
    replace the copy on the head while the job runs (seen with Ray 2.60 when a node died and a
    trial was retried on the head): the driver's working directory is then gone, and Tune fails
    as it finishes (it resolves relative paths against it). The sweep folder is ours; every path
    the sweep uses is absolute by then.
    """
    try:
        previous: str | None = os.getcwd()
    except FileNotFoundError:
        previous = None
    os.chdir(folder)
    try:
        yield
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):  # by path: a replaced folder is entered anew
                os.chdir(previous)


def _defined(parameter) -> dict[str, Any]:
    """A parameter's definition without the fields it does not use (``log: false`` of a loguniform)."""
    return {key: value for key, value in dataclasses.asdict(parameter).items() if value not in (None, False)}


def _locate(name: str, sweep_file: str | Path | None, sweeps_dir: str | Path | None,
            overrides: dict[str, Any] | None) -> tuple[SweepFolder, SweepState]:
    if sweeps_dir is None:
        base = load_sweep(sweep_file, overrides).base_config if sweep_file else None
        sweeps_dir = sweeps_dir_for(base) if base else str(Path("runs") / "sweeps")
    folder = SweepFolder.of(sweeps_dir, name)
    return folder, SweepState.read(folder)


@dataclass
class _Prepared:
    plans: dict[str, dict[str, Any]]
    classes: dict[str, list[str]]
    manifest_sha256: str
    encoder_keys: dict[str, Any]


def _prepare(sweep: SweepConfig, *, manifest, feature_sets, address, log) -> _Prepared:
    """Validate the corpus once; cache the features of every encoder pair; one plan per pair."""
    from hilbert.data.manifest import load_manifest
    from hilbert.train.run import make_plan, prepare_data

    assert sweep.base_config is not None
    base = sweep.trial_config({})
    manifest = manifest if manifest is not None else load_manifest(base.data.manifest)
    plans, encoder_keys, data = {}, {}, None
    for audio_encoder, text_encoder in sweep.encoder_pairs():
        key = pair_key(audio_encoder, text_encoder)
        config = dataclasses.replace(base, data=dataclasses.replace(base.data, audio_encoder=audio_encoder,
                                                                     text_encoder=text_encoder))
        data = prepare_data(config, manifest=manifest, feature_set=(feature_sets or {}).get(key),
                            address=address, log=log)
        plans[key] = make_plan(config, data, "hilbert")
        encoder_keys[key] = {"audio": data.feature_set.audio_encoder, "text": data.feature_set.text_encoder,
                             "feature_set": data.feature_set.id}
    assert data is not None
    return _Prepared(plans, data.label_maps.classes, data.feature_set.manifest_sha256, encoder_keys)


def _run_tuner(sweep: SweepConfig, prepared: _Prepared, setup: TrialSetup, folder: SweepFolder, *,
               address: str | None, resuming: bool, retry_failed: bool, log: Callable[[str], None]) -> None:
    # Tune saves its experiment state at most every 10 s by default; a driver killed in between
    # forgets the trials that ended meanwhile. The state of a sweep is small: save it often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # A trial retried after its node died counts Tune's iterations from 1 again; Optuna, which
    # only records them here (stopping is the scheduler's), would warn at every repeated step.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step")
    local = address in (None, "", "local")
    resources = connect(address)
    concurrency = _fitting_concurrency(sweep, resources, local=local, log=log)
    url = dashboard_url()
    if url:
        log(f"Ray dashboard: {url}")
    driver_experiment = setup.experiment  # the callback logs from here, directly
    relay = None
    if needs_relay(driver_experiment.uri, local_ray=local):
        relay = start_relay(driver_experiment.uri)
        setup = dataclasses.replace(setup, experiment=dataclasses.replace(driver_experiment, relay=relay))
        log(f"trials log to {driver_experiment.uri} through this node (it is not reachable from other nodes)")
    try:
        _fit(sweep, setup, folder, driver_experiment, concurrency, resuming=resuming, retry_failed=retry_failed,
             log=log)
    finally:
        if relay is not None:
            import ray

            ray.kill(relay)


def _fit(sweep: SweepConfig, setup: TrialSetup, folder: SweepFolder, driver_experiment: Experiment,
         concurrency: int, *, resuming: bool, retry_failed: bool, log: Callable[[str], None]) -> None:
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(hilbert_trial, setup=setup), _trial_resources(sweep))
    if resuming and tune.Tuner.can_restore(folder.tune):
        log(f"resuming: finished trials are kept{', failed ones run again' if retry_failed else ''}")
        for repair in repair_saved_search(folder.tune, retry_failed=retry_failed):
            log(f"searcher state repaired to match the saved trials: {repair}")
        tuner = tune.Tuner.restore(folder.tune, trainable, resume_unfinished=True, resume_errored=retry_failed)
    else:
        callback = TrialRunsCallback(driver_experiment, setup.parent_run_id, sweep.scheduler.type)  # pickled with the Tuner
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=make_searcher(sweep), scheduler=make_scheduler(sweep),
                                        num_samples=sweep.trials, max_concurrent_trials=concurrency,
                                        reuse_actors=_reuses_actors(sweep),
                                        trial_name_creator=lambda trial: trial_run_name(trial.trial_id),
                                        trial_dirname_creator=lambda trial: trial_run_name(trial.trial_id)),
            run_config=tune.RunConfig(name=storage.name_of(folder.tune), storage_path=folder.root,
                                      # Tune's own tables print every metric of every
                                      # report; the callback prints one line a trial.
                                      callbacks=[callback], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
        )
    grid = tuner.fit()
    ended = grid.num_terminated + grid.num_errors
    if ended < sweep.trials:
        # Tune turns Ctrl-C (SIGINT) into a saved, stopped experiment and returns normally.
        raise SweepInterrupted(f"sweep {folder.name!r} stopped with {ended} of {sweep.trials} trials ended; "
                               f"continue it with: hilbert sweep --resume {folder.name} "
                               f"--sweeps-dir {shlex.quote(folder.parent)}")


def _reuses_actors(sweep: SweepConfig) -> bool:
    """Whether a finished trial's actor runs the next trial. A one-worker trial trains in its
    actor, and a fresh actor costs a process start, imports (torch, MLflow, matplotlib), the
    MLflow store's set-up and reading the features: ~5 s a trial on 2 cores (docs/benchmarks.md).
    Not for DDP trials: their actor waits in ``trainer.fit()``, and a trial stopped by the
    scheduler does not end within the 2 s Tune gives before it resets an actor for the next one,
    and Tune then fails that next trial (``_AbortTrialExecution``)."""
    return sweep.resources.workers_per_trial == 1


def _trial_resources(sweep: SweepConfig) -> dict[str, float]:
    """What a trial asks Tune for. A DDP trial: nothing but a token of memory (Tune refuses an
    empty bundle): its Train workers hold the CPUs, and a trial that also held one would wait
    forever on a small machine for workers that cannot be placed beside it. A one-worker trial
    trains in its own actor, so it holds the worker's resources itself."""
    need = sweep.resources
    if need.workers_per_trial == 1:
        return {"cpu": need.cpus_per_worker, "gpu": need.gpus_per_worker, "memory": 1024 ** 2}
    return {"cpu": 0, "memory": 1024 ** 2}


def _fitting_concurrency(sweep: SweepConfig, resources: dict[str, Any], *, local: bool,
                         log: Callable[[str], None]) -> int:
    """How many trials can train at once: trials x workers x CPUs (and GPUs) must fit the cluster,
    or Train workers wait for resources their siblings hold."""
    need = sweep.resources
    fits = []
    if need.cpus_per_worker > 0:
        fits.append(int(resources.get("CPU", 0) // (need.workers_per_trial * need.cpus_per_worker)))
    if need.gpus_per_worker > 0:
        fits.append(int(resources.get("GPU", 0) // (need.workers_per_trial * need.gpus_per_worker)))
    fitting = min(fits) if fits else sweep.concurrency
    if fitting >= sweep.concurrency:
        return sweep.concurrency
    what = (f"{need.workers_per_trial} worker(s) x {need.cpus_per_worker} CPU"
            + (f" x {need.gpus_per_worker} GPU" if need.gpus_per_worker else ""))
    have = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    if fitting < 1 and local:
        raise SweepError(f"a trial needs {what} and this machine has {have}: lower resources.workers_per_trial "
                         "or resources.cpus_per_worker")
    if not local:  # an autoscaling cluster may grow to fit; say so and let it
        log(f"note: {sweep.concurrency} concurrent trials of {what} need more than the cluster has now ({have}); "
            "trials wait for the autoscaler")
        return sweep.concurrency
    log(f"concurrency lowered from {sweep.concurrency} to {fitting}: trials of {what} on {have}")
    return fitting


def _register_best(sweep: SweepConfig, state: SweepState, folder: SweepFolder, experiment: Experiment,
                   rows: list[dict[str, Any]], log: Callable[[str], None]) -> tuple[dict[str, Any] | None, str | None]:
    """Register the best finished trial's model as the ``challenger`` (once per sweep): best by
    the validation objective, the selection signal; its test objective is recorded beside it."""
    from hilbert.sweep.registry import CHALLENGER, RegistryError, register_logged_model

    candidates = [row for row in rows if row["status"] == FINISHED and math.isfinite(row["objective"])]
    if not candidates:
        log("no trial finished: nothing to register")
        return None, None
    best = candidates[0]
    if state.registered_version and state.registered_run_id == best["run_id"]:
        return best, state.registered_version  # a resumed sweep that had already registered its best
    for row in candidates:
        try:
            test = row["metrics"].get("test/objective", math.nan)
            version = register_logged_model(
                row["run_id"], sweep.tracking.model_name, CHALLENGER,
                description=f"best trial ({row['name']}) of sweep {state.name} by validation objective "
                            f"{row['objective']:.4f} (mean over folds of the chosen epoch's validation score); "
                            f"test objective {test:.4f} (the outer test folds at that epoch, chosen among "
                            f"{len(candidates)} trial(s): a little flattered; promotion's held-out score is not)",
                tracking_uri=experiment.uri, tags={"sweep": state.name, "trial_id": str(row["trial_id"]),
                                                   "objective": f"{row['objective']:.6f}",
                                                   "test_objective": f"{test:.6f}"})
        except RegistryError as error:
            log(f"{row['name']}: {error}; trying the next best")
            continue
        state.registered_version, state.registered_run_id = version, row["run_id"]
        state.write(folder)
        log(f"registered {row['name']} (val objective {row['objective']:.4f}, test "
            f"{row['metrics'].get('test/objective', math.nan):.4f}) as {sweep.tracking.model_name} "
            f"version {version}, alias {CHALLENGER}")
        return row, version
    return best, None


def _summarise_in_parent(tracker: SweepTracker, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                         version: str | None) -> None:
    client = tracker.experiment.client
    metrics = {f"trials_{status.lower()}": count for status, count in status_counts(rows).items()}
    if best is not None:
        metrics["best_objective"] = best["objective"]
        metrics["best_test_objective"] = best["metrics"].get("test/objective", math.nan)
        client.set_tag(tracker.run_id, "best_trial", best["name"])
        client.set_tag(tracker.run_id, "best_run_id", best["run_id"])
    if version:
        client.set_tag(tracker.run_id, "registered_version", version)
    for key, value in metrics.items():
        if math.isfinite(float(value)):  # a best trial stopped before its test folds has none
            client.log_metric(tracker.run_id, key, float(value))
