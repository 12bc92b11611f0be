"""A sweep, wired together: Optuna proposes, ASHA prunes, each trial is a k-fold Ray Train DDP
run, MLflow records everything, and the best trial's model is registered as the ``challenger``.

Who runs where:

- the **driver** (``hilbert sweep``) validates the corpus, makes sure the features of every
  encoder pair are cached, fixes the folds, opens the sweep's parent MLflow run and runs the
  ``Tuner``. Its :class:`~hilbert.sweep.callback.TrialRunsCallback` logs every epoch a trial reports and ends trial runs
  the trials cannot end themselves: stopped by the scheduler (KILLED) or crashed (FAILED).
- a **trial** (:func:`~hilbert.sweep.trial.hilbert_trial`, a Tune function trainable) opens its
  child run, trains every fold in lockstep with one report per epoch (DDP on Ray Train, or a
  one-worker trial in its own actor, which Tune then hands the next trial, so its imports,
  MLflow store and features are paid once per actor), then logs the fold table, figures and the
  model (safetensors + JSON) to its run.

Resources: a DDP trial asks Tune for no CPU (only a token of memory, since Tune refuses an empty
bundle); its Train workers ask for ``workers_per_trial x cpus_per_worker``. A trial that also
held a CPU would, on a 2-CPU machine, wait forever for workers that cannot be placed next to it.
Concurrency is capped so that the trials' workers fit the cluster.

Resuming: Tune's experiment state (with the Optuna study inside the searcher's state), each
trial's latest epoch checkpoint (:class:`~hilbert.sweep.trial.TrialCheckpoints` for one-worker
trials, Train's for DDP trials) and ``sweep.json`` (the parent run, the tracking store) live in the sweep folder: a
local path, or on a cluster a shared file system or an object-store URI. ``hilbert sweep
--resume NAME`` restores the Tuner (after :func:`~hilbert.sweep.resume.repair_saved_search`
makes the searcher's saved state agree with the saved trials); finished trials are kept,
unfinished ones continue from their last epoch checkpoint, and with ``retry_failed`` errored
ones run again. A trial whose node died is restarted by Tune (``max_failures``) from the same
checkpoint, on any node.
"""


from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune

from hilbert import storage
from hilbert.config import to_dict
from hilbert.data.manifest import load_manifest
from hilbert.ray_runtime import connect, dashboard_url, installed_versions
from hilbert.sweep.callback import TrialRunsCallback
from hilbert.sweep.config import SweepConfig, load_sweep
from hilbert.sweep.resume import repair_saved_search
from hilbert.sweep.search import make_scheduler, make_searcher
from hilbert.sweep.state import SweepError, SweepFolder, SweepInterrupted, SweepState, sweeps_dir_for
from hilbert.sweep.trial import TrialSetup, hilbert_trial, pair_key, trial_run_name
from hilbert.sweep.views import SWEEP_FOLDER_TAG, log_sweep_views
from hilbert.tracking.leaderboard import leaderboard, status_counts
from hilbert.tracking.provenance import source_tags
from hilbert.tracking.registry import CHALLENGER, RegistryError, register_logged_model
from hilbert.tracking.relay import RelayedClient, needs_relay, start_relay
from hilbert.tracking.runs import FINISHED, SweepTracker
from hilbert.tracking.store import Experiment, resolve_tracking_uri
from hilbert.train.report import OBJECTIVE, TEST_OBJECTIVE
from hilbert.train.run import make_plan, prepare_data


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
            tags={SWEEP_FOLDER_TAG: folder.root})
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
        log_sweep_views(tracker, folder.tune, rows, log)
    return SweepResult(state.name, folder.root, uri, experiment, state.parent_run_id, rows, best,
                       sweep.tracking.model_name, version, time.perf_counter() - started)


@contextlib.contextmanager
def _working_in(folder: Path) -> Iterator[None]:
    """Run the sweep from its own folder, and come back after.

    A job submitted with ``--working-dir`` starts in Ray's copy of that folder, and Ray may
    replace the copy on the head while the job runs (when a trial is retried there after its
    node died): the driver's working directory is then gone, and Tune fails as it finishes (it
    resolves relative paths against it). The sweep folder is ours; every path the sweep uses is
    absolute by then.
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
    local_ray = address in (None, "", "local")
    resources = connect(address)
    concurrency = _fitting_concurrency(sweep, resources, local_ray=local_ray, log=log)
    url = dashboard_url()
    if url:
        log(f"Ray dashboard: {url}")
    driver_experiment = setup.experiment  # the callback logs from here, directly
    relay = None
    if needs_relay(driver_experiment.uri, local_ray=local_ray):
        relay = start_relay(driver_experiment.uri)
        setup = dataclasses.replace(setup, experiment=dataclasses.replace(driver_experiment,
                                                                          relayed=RelayedClient(relay)))
        log(f"trials log to {driver_experiment.uri} through this node (it is not reachable from other nodes)")
    try:
        _fit(sweep, setup, folder, driver_experiment, concurrency, resuming=resuming, retry_failed=retry_failed,
             log=log)
    finally:
        if relay is not None:
            ray.kill(relay)


def _fit(sweep: SweepConfig, setup: TrialSetup, folder: SweepFolder, driver_experiment: Experiment,
         concurrency: int, *, resuming: bool, retry_failed: bool, log: Callable[[str], None]) -> None:
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


def _fitting_concurrency(sweep: SweepConfig, resources: dict[str, Any], *, local_ray: bool,
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
    if fitting < 1 and local_ray:
        raise SweepError(f"a trial needs {what} and this machine has {have}: lower resources.workers_per_trial "
                         "or resources.cpus_per_worker")
    if not local_ray:  # an autoscaling cluster may grow to fit; say so and let it
        log(f"note: {sweep.concurrency} concurrent trials of {what} need more than the cluster has now ({have}); "
            "trials wait for the autoscaler")
        return sweep.concurrency
    log(f"concurrency lowered from {sweep.concurrency} to {fitting}: trials of {what} on {have}")
    return fitting


def _register_best(sweep: SweepConfig, state: SweepState, folder: SweepFolder, experiment: Experiment,
                   rows: list[dict[str, Any]], log: Callable[[str], None]) -> tuple[dict[str, Any] | None, str | None]:
    """Register the best finished trial's model as the ``challenger`` (once per sweep): best by
    the validation objective, the selection signal; its test objective is recorded beside it."""
    candidates = [row for row in rows if row["status"] == FINISHED and math.isfinite(row["objective"])]
    if not candidates:
        log("no trial finished: nothing to register")
        return None, None
    best = candidates[0]
    if state.registered_version and state.registered_run_id == best["run_id"]:
        return best, state.registered_version  # a resumed sweep that had already registered its best
    for row in candidates:
        try:
            test = row["metrics"].get(TEST_OBJECTIVE, math.nan)
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
        metrics["best_test_objective"] = best["metrics"].get(TEST_OBJECTIVE, math.nan)
        client.set_tag(tracker.run_id, "best_trial", best["name"])
        client.set_tag(tracker.run_id, "best_run_id", best["run_id"])
    if version:
        client.set_tag(tracker.run_id, "registered_version", version)
    for key, value in metrics.items():
        if math.isfinite(float(value)):  # a best trial stopped before its test folds has none
            client.log_metric(tracker.run_id, key, float(value))
