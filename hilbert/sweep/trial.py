"""One sweep trial, in its Tune actor: train one configuration under k-fold CV and log it to the
trial's MLflow run.

A trial trains one of two ways (:func:`train_trial`): with several workers, a Ray Train
``TorchTrainer`` whose DDP workers train every fold in lockstep and report each epoch through
``TuneReportCallback``; with one worker, the same loop in the trial's own actor (no DDP to set
up, ~11 s a trial less on 2 cores; docs/benchmarks.md), reporting through ``tune.report`` and
checkpointing each epoch into the sweep folder itself (:class:`TrialCheckpoints`). Either way a
restarted trial (its node died, or the sweep resumed) continues from its last epoch. Then the
fold table, figures, test predictions and the model (safetensors + JSON) go to the trial's run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from hilbert import storage
from hilbert.config import dotted_keys, to_dict
from hilbert.ray_runtime import require_versions
from hilbert.sweep.config import SweepConfig
from hilbert.sweep.diagnostics import trial_figures
from hilbert.sweep.state import SweepFolder
from hilbert.tracking.registry import MODEL_FOLDER, log_model
from hilbert.tracking.runs import FINISHED, TrialTracker, find_trial_run
from hilbert.tracking.system_metrics import SystemMetrics
from hilbert.tracking.store import Experiment
from hilbert.train.config import TrainConfig
from hilbert.train.loop import WorkerContext, train_folds
from hilbert.train.out_of_fold import out_of_fold_outputs, predictions_table
from hilbert.train.report import OBJECTIVE, epoch_metrics
from hilbert.train.run import build_trainer, collect_fold_models, fold_models_from_checkpoint

RESTORED = "restored_from_mlflow"  # a result re-reported from a finished run, not a new epoch


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
    """Tune's function trainable: train one configuration under k-fold CV and log it to the
    trial's run."""
    entered = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    # A node the autoscaler started after the sweep's own check (ray_runtime.connect) is checked here.
    require_versions(setup.versions, f"the node of trial {trial_id} ({_node_tags()['ray.node_ip']})")
    if _report_if_already_finished(setup, trial_id):
        return
    # Tune hands the sampled values back as given (dotted keys), or nested should it split them.
    values = setup.sweep.trial_values(dotted_keys(sampled))
    config = setup.sweep.trial_config(values)
    trained = to_dict(config.variant("hilbert"))
    plan = {**setup.plans[pair_key(config.data.audio_encoder, config.data.text_encoder)], "config": trained}
    # Every hyperparameter of the trial: the searched values, then the whole training config.
    params = {**values, "config": trained}
    with TrialTracker(setup.experiment, setup.parent_run_id, trial_id, params, name=trial_run_name(trial_id),
                      tags={**setup.run_tags, **_node_tags()}) as run:
        # The best fold models, on this node only until they are logged (the run keeps them).
        scratch = Path(tempfile.mkdtemp(prefix=f"hilbert-trial-{trial_id}-"))
        try:
            fitting = time.perf_counter()
            with SystemMetrics(setup.experiment, run.run_id, setup.sweep.tracking.system_metrics_seconds):
                per_fold, models = train_trial(plan, config, trial_id, setup.folder, scratch / "model")
            fitted = time.perf_counter()
            run.log_fold_table(per_fold)
            outputs = out_of_fold_outputs(Path(models), plan)
            run.log_figures(trial_figures(outputs, setup.classes))
            # Every test prediction (doc_id, fold, task, class probabilities): what the trial's
            # test figures came from, for any later analysis or paired comparison.
            table = predictions_table(outputs.test_predictions({}), setup.classes)
            storage.write_parquet(table, scratch / "test_predictions" / "hilbert.parquet")
            run.log_artifacts(scratch / "test_predictions", "test_predictions")
            log_model(run.run_id, models, client=setup.experiment.client)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # Where a trial's time goes beyond its epochs (docs/benchmarks.md): before Train starts,
        # Train's whole fit (worker start-up + epochs), and logging results afterwards.
        run.log_epoch({"time/trial_setup_seconds": fitting - entered, "time/fit_seconds": fitted - fitting,
                       "time/trial_logging_seconds": time.perf_counter() - fitted}, step=0)


# ---------------------------------------------------------------------------------------------
# The two ways a trial trains


def train_trial(plan: dict[str, Any], config: TrainConfig, trial_id: str, folder: SweepFolder, destination: Path
                ) -> tuple[dict[int, dict[str, float]], str]:
    """Train the plan's folds, reporting every epoch to Tune, resuming from the trial's last epoch
    checkpoint in ``folder`` if it has one; returns fold -> result and the folder of the chosen
    fold models (``destination``)."""
    if config.scaling.num_workers > 1:
        return _train_on_ray_train(plan, config, trial_id, folder, destination)
    return _train_in_actor(plan, config, trial_id, folder, destination)


def _train_on_ray_train(plan: dict[str, Any], config: TrainConfig, trial_id: str, folder: SweepFolder,
                        destination: Path) -> tuple[dict[int, dict[str, float]], str]:
    """DDP over ``scaling.num_workers`` Ray Train workers. The Train run is named after the trial,
    so every attempt of the trial resumes from that run's latest checkpoint."""
    trainer = build_trainer(plan, config, trial_id, folder.train, callbacks=[TuneReportCallback()])
    return collect_fold_models(trainer.fit(), destination)


def _train_in_actor(plan: dict[str, Any], config: TrainConfig, trial_id: str, folder: SweepFolder,
                    destination: Path) -> tuple[dict[int, dict[str, float]], str]:
    """One worker: the same loop in this Tune actor, with the same per-epoch reports; each epoch's
    checkpoint goes to the sweep's storage (:class:`TrialCheckpoints`)."""
    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    checkpoints = storage.join(folder.train, trial_id)
    stored = TrialCheckpoints(checkpoints)

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            stored.save(checkpoint, int(metrics["epoch"]))
        tune.report(metrics)

    train_folds(plan, WorkerContext(device=torch.device("cuda" if use_gpu else "cpu"), report=report,
                                    resume_from=stored.restore(destination.parent / "restored")))
    final = stored.restore(destination.parent / "final")  # the last epoch's (or the restored one)
    if final is None:
        raise RuntimeError(f"training wrote no checkpoint under {storage.shown(checkpoints)}")
    return fold_models_from_checkpoint(final, destination)


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

    def save(self, checkpoint: Path, epoch: int) -> None:
        name = f"checkpoint_{epoch:06d}"
        self.folder.move_in(checkpoint, name)  # the loop's temporary checkpoint: no need to copy it
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


# ---------------------------------------------------------------------------------------------
# Helpers


def _node_tags() -> dict[str, str]:
    """Where this attempt of the trial runs (its Tune actor's node and process): a trial retried
    after its node died shows the node it finished on."""
    return {"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address(),
            "ray.pid": str(os.getpid())}


def _report_if_already_finished(setup: TrialSetup, trial_id: str) -> bool:
    """A trial that finished and logged its model, but that Tune's saved state (written every few
    seconds) still shows running when the driver died, is not trained again on resume: its
    final result is reported from MLflow so the searcher still learns it."""
    run = find_trial_run(setup.experiment, setup.parent_run_id, trial_id)
    if run is None or run.info.status != FINISHED or OBJECTIVE not in run.data.metrics:
        return False
    if not setup.experiment.client.list_artifacts(run.info.run_id, MODEL_FOLDER):
        return False
    tune.report({**epoch_metrics(run.data.metrics), RESTORED: True})
    return True
