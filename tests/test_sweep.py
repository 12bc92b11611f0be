"""Sweeps end to end on a 2-CPU local Ray: Optuna proposes, ASHA prunes, every trial a k-fold
Ray Train DDP run, MLflow keeps a parent run and one child run per trial, the best trial's model
is registered as the ``challenger`` and predicts from its alias in a fresh process; a trial that
raises ends FAILED while the sweep goes on; a sweep whose driver was SIGKILLed resumes without
re-running what had finished.

The corpus is small (36 demo documents), the encoders weight-free (``logmel`` and a 256-d
``hashngram``) and the model tiny, so a trial costs Ray's fixed overhead (a Tune actor, a Train
controller and its workers: about 15 s on 2 cores) more than training.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from hilbert.cli import app
from hilbert.data.demo import DEMO_TASKS, write_demo_corpus
from hilbert.data.manifest import load_manifest
from hilbert.features.cache import FeatureCache
from hilbert.features.extract import extract_features
from hilbert.sweep.runner import run_sweep
from hilbert.sweep.resume import saved_study
from hilbert.tracking.runs import FAILED, FINISHED, KILLED, PARENT_TAG, ROLE_TAG, RUNNING, TRIAL_ID_TAG
from conftest import extract_in_process
from sessions import communicate_or_explain, kill_session

pytestmark = pytest.mark.slow
REPOSITORY = Path(__file__).parents[1]
HILBERT = str(Path(sys.executable).parent / "hilbert")  # the console script, as users run it
TEXT_256, TEXT_128 = "hashngram?dim=256", "hashngram?dim=128"
DOCUMENTS = 36
EPOCHS = 4
FOLDS = 3

# ---------------------------------------------------------------------------------------------
# A corpus, a base training config and a sweep definition, all under tmp folders


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The demo corpus, small: its four tasks (one needs both modalities) and imbalanced classes."""
    return write_demo_corpus(tmp_path_factory.mktemp("sweep-corpus"), n_documents=DOCUMENTS, seed=4)


@pytest.fixture(scope="module")
def shared_cache(corpus: Path, tmp_path_factory) -> Path:
    """A feature cache the sweeps share, filled once in this process (Ray Data's extraction has
    its own tests): every sweep below, in this process or a new one, finds its features cached."""
    cache = tmp_path_factory.mktemp("sweep-cache")
    manifest = load_manifest(corpus)
    for text in (TEXT_256, TEXT_128):
        extract_in_process(manifest, "logmel", text, cache)
    return cache


@pytest.fixture(scope="module")
def held_out_corpus(shared_cache: Path, tmp_path_factory) -> Path:
    """Other recordings of the same tasks, which no sweep trains on: what promotion is scored on
    (its features in the shared cache, as for the corpus)."""
    held_out = write_demo_corpus(tmp_path_factory.mktemp("held-out-corpus"), n_documents=DOCUMENTS, seed=5)
    extract_in_process(load_manifest(held_out), "logmel", TEXT_256, shared_cache)
    return held_out


def write_sweep(root: Path, manifest: Path, *, name: str, trials: int, search: dict[str, Any],
                cache: Path | None = None, epochs: int = EPOCHS, workers: int = 2, concurrency: int = 1,
                scheduler: dict[str, Any] | None = None, searcher: dict[str, Any] | None = None,
                max_failures: int = 1, overrides: dict[str, Any] | None = None) -> Path:
    """``root/train.yaml`` (absolute paths) and ``root/sweep.yaml``; returns the sweep file."""
    base = {
        "name": name,
        "output_dir": str(root / "runs"),
        "data": {"manifest": str(manifest), "cache_dir": str(cache or root / "cache"), "audio_encoder": "logmel",
                 "text_encoder": TEXT_256, "max_segments": 32},
        "model": {"d_model": 16, "d_embed": 16, "n_heads": 2, "n_cross_layers": 1, "pooling_heads": 1,
                  "dropout": 0.1, "n_experts": 2, "expert_hidden": 16, "head": "moe"},
        "optimization": {"epochs": epochs, "batch_size": 8, "learning_rate": 0.003, "patience": epochs},
        "cv": {"folds": FOLDS, "stratify": "topic"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "variants": ["hilbert"],
        "baseline": False,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    sweep = {
        "name": name,
        "base": "train.yaml",
        "trials": trials,
        "concurrency": concurrency,
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 1},
        "scheduler": scheduler or {"type": "none"},
        "searcher": searcher or {"type": "optuna_tpe", "seed": 0, "startup_trials": 2},
        "max_failures": max_failures,
        "tracking": {"experiment": f"exp-{name}", "model_name": f"model-{name}"},
        "search": search,
    }
    if overrides:
        sweep["overrides"] = overrides
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep), encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    """The environment of a CLI run in a new process: this checkout, no inherited Ray cluster or
    MLflow store (they are passed explicitly or started fresh)."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def store(root: Path) -> str:
    return f"sqlite:///{root / 'mlruns.db'}"


def children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


def artifact_paths(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, folder or None):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def objective_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "objective"))


def best_finished(runs: list) -> Any:
    finished = [r for r in runs if r.info.status == FINISHED and math.isfinite(r.data.metrics.get("objective", math.nan))]
    assert finished, "no trial finished"
    return max(finished, key=lambda r: r.data.metrics["objective"])


def assert_challenger_is(client: MlflowClient, model_name: str, run) -> str:
    version = client.get_model_version_by_alias(model_name, "challenger")
    assert version.run_id == run.info.run_id, (version.run_id, run.info.run_id)
    return str(version.version)


# ---------------------------------------------------------------------------------------------
# 1. A whole sweep: 3 trials of 2 DDP workers on 2 CPUs, ASHA, MLflow, registry, predict by alias


def test_sweep_tracks_every_trial_registers_the_best_and_predicts_from_its_alias(local_ray, corpus: Path,
                                                                                  held_out_corpus: Path,
                                                                                  shared_cache: Path, tmp_path: Path):
    sweep_file = write_sweep(
        tmp_path, corpus, name="full", trials=3, cache=shared_cache,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        searcher={"type": "optuna_tpe", "seed": 0, "startup_trials": 2},
        search={"optimization.learning_rate": {"type": "loguniform", "low": 0.0003, "high": 0.01},
                "loss.lambda_cka": {"type": "loguniform", "low": 0.005, "high": 0.2}})
    uri = store(tmp_path)
    lines: list[str] = []
    result = run_sweep(sweep_file, name="full", tracking_uri=uri, log=lines.append)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == FINISHED and parent.data.tags[ROLE_TAG] == "sweep"
    runs = children(client, result.experiment.experiment_id, result.parent_run_id)
    assert len(runs) == 3, [r.info.run_name for r in runs]
    assert len({r.data.tags[TRIAL_ID_TAG] for r in runs}) == 3
    assert all(r.data.tags[ROLE_TAG] == "trial" for r in runs)
    assert all({"optimization.learning_rate", "loss.lambda_cka"} <= set(r.data.params) for r in runs)
    statuses = [r.info.status for r in runs]
    assert set(statuses) <= {FINISHED, KILLED}, statuses
    assert {row["run_id"]: row["status"] for row in result.rows} == {r.info.run_id: r.info.status for r in runs}

    for run in runs:
        history = objective_history(client, run.info.run_id)
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)) and len(steps) >= 1, (run.info.run_name, history)
        assert all(0.0 <= value <= 1.0 for _, value in history)
        if run.info.status == KILLED:  # stopped by ASHA before its last epoch
            assert run.data.tags.get("stopped_by") == "asha", run.data.tags
            assert len(steps) < EPOCHS, f"{run.info.run_name} was stopped at its last epoch, before logging its model"
            continue
        assert len(steps) == EPOCHS, (run.info.run_name, history)
        # The machine while it trained, under MLflow's system-metric names (the UI's System metrics tab).
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
        artifacts = artifact_paths(client, run.info.run_id)
        assert "folds/metrics.csv" in artifacts and "model/signature.json" in artifacts
        assert any(path.startswith("figures/") and path.endswith(".png") for path in artifacts)
        # The outer test folds, scored once at each fold's chosen epoch, and every test prediction.
        assert "test_predictions/hilbert.parquet" in artifacts
        assert 0.0 <= run.data.metrics["test/objective"] <= 1.0 and "cv_mean/test/topic/auc" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "test/objective")) == 1
        assert {f"model/fold_{fold}/model.safetensors" for fold in range(FOLDS)} <= artifacts
        table = client.download_artifacts(run.info.run_id, "folds/metrics.csv", str(tmp_path))
        assert Path(table).read_text().splitlines()[0].startswith("fold,")

    best = best_finished(runs)
    assert result.best is not None and result.best["run_id"] == best.info.run_id
    version = assert_challenger_is(client, result.model_name, best)
    assert result.model_version == version
    assert parent.data.tags["best_run_id"] == best.info.run_id and parent.data.tags["registered_version"] == version
    assert any(f"version {version}, alias challenger" in line for line in lines), lines
    # What users compare trials by in the parent run: a table of every trial and the study's views.
    assert {"sweep/trials.csv", "sweep/views/optimization_history.png",
            "sweep/views/parallel_coordinate.png"} <= artifact_paths(client, parent.info.run_id)
    trials = client.download_artifacts(parent.info.run_id, "sweep/trials.csv", str(tmp_path / "parent"))
    assert sorted(line.split(",")[0] for line in Path(trials).read_text().splitlines()[1:]) == \
        sorted(r.info.run_name for r in runs)

    # A new process knows nothing but the store and the alias.
    out = tmp_path / "predictions.parquet"
    done = subprocess.run([HILBERT, "predict", f"models:/{result.model_name}@challenger", str(corpus), str(out),
                           "--cache", str(shared_cache), "--tracking-uri", uri],
                          env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pq.read_table(out).to_pandas()
    assert len(table) == DOCUMENTS and table["doc_id"].is_unique
    for task in DEMO_TASKS:
        columns = [c for c in table.columns if c.startswith(f"{task.name}/p/")]
        assert sorted(c.split("/")[-1] for c in columns) == sorted(task.classes)
        np.testing.assert_allclose(table[columns].sum(axis=1), 1.0, rtol=1e-5)

    # Promotion from the command line (in this process: the new-process path is predict's, above).
    # Scored on the documents the trials trained on, it is refused and moves no alias ...
    runner = CliRunner()
    done = runner.invoke(app, ["promote", result.model_name, "--manifest", str(corpus), "--cache", str(shared_cache),
                               "--tracking-uri", uri])
    assert done.exit_code == 2 and "not held-out" in " ".join(done.output.split()), done.output
    assert "champion" not in client.get_registered_model(result.model_name).aliases
    # ... on held-out documents, with no champion yet, the challenger becomes it, with the
    # held-out score and what it measures recorded on the version.
    done = runner.invoke(app, ["promote", result.model_name, "--manifest", str(held_out_corpus),
                               "--cache", str(shared_cache), "--tracking-uri", uri])
    assert done.exit_code == 0 and "promoted" in done.output, done.output
    assert str(client.get_model_version_by_alias(result.model_name, "champion").version) == version
    tags = client.get_model_version(result.model_name, version).tags
    assert tags["promotion.decision"] == "promoted" and "macro one-vs-rest ROC AUC" in tags["promotion.metric"]
    # The leaderboard from MLflow in the terminal: every trial, and how to open the UI.
    done = runner.invoke(app, ["runs", "--tracking-uri", uri], env={"COLUMNS": "250"})
    assert done.exit_code == 0, done.output
    assert all(run.info.run_name in done.output for run in runs) and "mlflow ui --backend-store-uri" in done.output


# ---------------------------------------------------------------------------------------------
# 2. A trial that raises ends FAILED, and the sweep goes on


def test_a_failing_trial_ends_failed_and_the_sweep_goes_on(local_ray, corpus: Path, shared_cache: Path,
                                                          tmp_path: Path):
    manifest = load_manifest(corpus)
    sets = {text: extract_features(manifest, "logmel", text, shared_cache, progress=False).feature_set
            for text in (TEXT_256, TEXT_128)}
    # Break the 128-d pair (which no other test uses): one document's text entry loses its last
    # segment row. It is still a well-formed safetensors entry (the cache's has() accepts it, so
    # nothing is extracted again) but its segments no longer match the audio's: loading it raises.
    broken = sorted(sets[TEXT_128].documents)[0]
    key = sets[TEXT_128].documents[broken]["text"]
    assert key != sets[TEXT_256].documents[broken]["text"]
    entries = FeatureCache(shared_cache)
    features = entries.get("text", key)
    assert features.shape[0] >= 2
    entries.put("text", key, features[:-1], doc_id=broken, encoder=TEXT_128)
    assert entries.has("text", key)

    sweep_file = write_sweep(
        tmp_path, corpus, name="failing", trials=2, cache=shared_cache, workers=1, max_failures=0,
        overrides={"scaling": {"max_failures": 0}},
        # Random search with this seed samples the broken pair, then the intact one (Optuna
        # samples a choice as its index); asserted below.
        searcher={"type": "random", "seed": 8},
        search={"data.encoders": {"type": "choice", "values": [["logmel", TEXT_256], ["logmel", TEXT_128]]}})
    uri = store(tmp_path)
    result = run_sweep(sweep_file, name="failing", tracking_uri=uri, log=lambda line: None)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(result.parent_run_id).info.status == FINISHED
    runs = children(client, result.experiment.experiment_id, result.parent_run_id)
    assert len({r.data.tags[TRIAL_ID_TAG] for r in runs}) == len(runs) == 2
    text_encoders = [r.data.params.get("config.data.text_encoder") for r in runs]
    assert text_encoders == [TEXT_128, TEXT_256], text_encoders  # oldest first: the broken pair failed first
    failed, finished = runs
    assert failed.info.status == FAILED, failed.info.status
    error = failed.data.tags.get("error", "")
    assert f"doc_id {broken!r}" in error and "CacheError" in error, error
    assert finished.info.status == FINISHED and "error" not in finished.data.tags
    assert len(objective_history(client, finished.info.run_id)) == EPOCHS
    assert result.counts == {FAILED: 1, FINISHED: 1}
    assert result.best is not None and result.best["run_id"] == finished.info.run_id
    assert_challenger_is(client, result.model_name, finished)

    # The cause fixed (the entry whole again), `--resume --retry-failed` runs the failed trial
    # again in its own run, keeps the finished one as it was, and the study learns the new score.
    entries.put("text", key, features, doc_id=broken, encoder=TEXT_128)
    lines: list[str] = []
    retried = run_sweep(resume="failing", sweeps_dir=tmp_path / "runs" / "sweeps", retry_failed=True,
                        log=lines.append)
    assert any("failed ones run again" in line for line in lines), lines
    after = children(client, result.experiment.experiment_id, result.parent_run_id)
    assert [run.info.run_id for run in after] == [failed.info.run_id, finished.info.run_id]
    again, kept = after
    assert again.info.status == FINISHED and again.data.tags["attempts"] == "2"
    assert "error" not in again.data.tags and "CacheError" in again.data.tags["previous_error"]
    assert len(objective_history(client, again.info.run_id)) == EPOCHS
    assert kept.info.status == FINISHED and "attempts" not in kept.data.tags
    assert objective_history(client, kept.info.run_id) == objective_history(client, finished.info.run_id)
    assert retried.counts == {FINISHED: 2}
    assert_challenger_is(client, result.model_name, best_finished(after))
    tune_folder = tmp_path / "runs" / "sweeps" / "failing" / "tune"
    study = saved_study(str(tune_folder))
    values = sorted(trial.value for trial in study.trials if trial.value is not None)
    assert values == sorted(run.data.metrics["objective"] for run in after)


# ---------------------------------------------------------------------------------------------
# 2b. One-worker trials run one after another in the same Tune actor, also after ASHA stops one


def test_one_worker_trials_reuse_their_actor_after_a_scheduler_stop(local_ray, corpus: Path, shared_cache: Path,
                                                                    tmp_path: Path, caplog):
    # Random learning rates from 1e-5 to 3e-2: with this seed the later trials include one that
    # ASHA stops at its first rung (the training is seeded, so this is the same on every run).
    sweep_file = write_sweep(
        tmp_path, corpus, name="reused", trials=4, cache=shared_cache, workers=1,
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        searcher={"type": "random", "seed": 3},
        search={"optimization.learning_rate": {"type": "loguniform", "low": 0.00001, "high": 0.03}})
    uri = store(tmp_path)
    with caplog.at_level("ERROR"):
        result = run_sweep(sweep_file, name="reused", tracking_uri=uri, log=lambda line: None)
    # Tune resets a finished trial's actor for the next trial; had the reset failed (a trial
    # thread still running), the next trial would have errored.
    assert not [r for r in caplog.records if "re-use actor" in r.getMessage()], caplog.text

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = children(client, result.experiment.experiment_id, result.parent_run_id)
    statuses = [run.info.status for run in runs]
    assert len(runs) == 4 and set(statuses) == {FINISHED, KILLED}, statuses
    stopped = statuses.index(KILLED)
    assert stopped < 3, f"no trial ran after the stopped one: {statuses}"
    assert runs[stopped].data.tags.get("stopped_by") == "asha"
    processes = {run.data.tags["ray.pid"] for run in runs}
    assert len(processes) == 1, processes  # one trial at a time: every trial in the first one's actor
    for run in runs:  # a reused actor starts each trial afresh: its own epochs, its own model
        steps = [step for step, _ in objective_history(client, run.info.run_id)]
        if run.info.status == KILLED:
            assert steps and len(steps) < EPOCHS and "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}
        else:
            assert steps == list(range(EPOCHS)), (run.info.run_name, steps)
            assert {f"model/fold_{fold}/model.safetensors" for fold in range(FOLDS)} <= artifact_paths(
                client, run.info.run_id)
    assert_challenger_is(client, result.model_name, best_finished(runs))


# ---------------------------------------------------------------------------------------------
# 3. The driver is SIGKILLed mid-sweep; `hilbert sweep --resume` finishes it


@pytest.fixture
def object_store(tmp_path: Path):
    """An S3 server on 127.0.0.1 (moto) with an empty bucket; yields (sweeps dir URI, environment
    with its test credentials, pyarrow file system). Nothing may look for cloud credentials
    elsewhere (no instance-metadata lookups)."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        fs = pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                     endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                     allow_bucket_creation=True)
        fs.create_dir("sweeps-bucket")
        uri = f"s3://sweeps-bucket/sweeps?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        yield uri, credentials, fs
    finally:
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("storage", ["local folder", "object store"])
def test_a_killed_sweep_resumes_keeping_finished_trials(corpus: Path, shared_cache: Path, tmp_path: Path,
                                                         storage: str, request):
    epochs = 8  # the interrupted trial is still training when the test sees its first epoch
    sweep_file = write_sweep(
        tmp_path, corpus, name="killed", trials=3, cache=shared_cache, epochs=epochs, workers=1,
        searcher={"type": "optuna_tpe", "seed": 1, "startup_trials": 2},
        search={"optimization.learning_rate": {"type": "loguniform", "low": 0.0003, "high": 0.01}})
    uri = store(tmp_path)
    command = [HILBERT, "sweep", str(sweep_file), "--tracking-uri", uri]
    env = subprocess_env()
    tune_state = local_tune_state(tmp_path / "runs" / "sweeps" / "killed" / "tune")
    if storage == "object store":  # Tune's state, the checkpoints and sweep.json all in S3
        sweeps_uri, credentials, bucket = request.getfixturevalue("object_store")
        command += ["--sweeps-dir", sweeps_uri]
        env.update(credentials)
        tune_state = stored_tune_state(bucket, "sweeps-bucket/sweeps/killed/tune")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()  # creates the store's tables now, not in a race with the driver

    # The driver in a session of its own, with a Ray of its own (no address: it starts one).
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen([*command, "--name", "killed"], env=env, cwd=tmp_path,
                                  start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        parent_id = wait_for_a_finished_and_a_training_trial(client, "exp-killed", driver, tmp_path / "first.log",
                                                             tune_state, timeout=240)
    finally:
        kill_session(driver.pid)  # the driver and every Ray process it started
        driver.wait()
    experiment_id = client.get_run(parent_id).info.experiment_id
    before = {run.data.tags[TRIAL_ID_TAG]: run for run in children(client, experiment_id, parent_id)}
    finished_before = {tid for tid, run in before.items() if run.info.status == FINISHED}
    interrupted = {tid for tid, run in before.items() if run.info.status == RUNNING}
    assert finished_before and interrupted, {tid: run.info.status for tid, run in before.items()}
    histories = {tid: objective_history(client, before[tid].info.run_id) for tid in finished_before}
    assert client.get_run(parent_id).info.status == RUNNING  # nobody ended it: the driver was killed
    if storage == "local folder":  # `hilbert runs` draws the views the killed driver never logged
        assert not artifact_paths(client, parent_id, "sweep/views")
        shown = CliRunner().invoke(app, ["runs", "killed", "--tracking-uri", uri], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert "sweep/views/optimization_history.png" in shown.output
        assert {"sweep/trials.csv", "sweep/views/optimization_history.png"} <= artifact_paths(client, parent_id)

    resumed = subprocess.Popen([*command, "--resume", "killed"], env=env, cwd=tmp_path,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = communicate_or_explain(resumed, timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming" in output

    parent = client.get_run(parent_id)
    assert parent.info.status == FINISHED and parent.data.tags.get("resumes") == "1"
    runs = children(client, experiment_id, parent_id)
    trial_ids = [run.data.tags[TRIAL_ID_TAG] for run in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3, trial_ids  # every trial asked for, one run each
    assert [run.info.status for run in runs] == [FINISHED] * 3
    assert set(before) < set(trial_ids)  # the searcher went on after the restore
    for run in runs:
        trial_id = run.data.tags[TRIAL_ID_TAG]
        history = objective_history(client, run.info.run_id)
        if trial_id in finished_before:  # kept as it was, not trained again
            assert "attempts" not in run.data.tags, (run.info.run_name, run.data.tags.get("attempts"))
            assert history == histories[trial_id]
        elif trial_id in interrupted:  # reopened; went on from its last checkpointed epoch
            assert run.data.tags.get("attempts") == "2"
            assert [step for step, _ in history] == list(range(epochs)), history  # no epoch trained twice
        else:  # proposed after the restore
            assert "attempts" not in run.data.tags and [step for step, _ in history] == list(range(epochs))
    assert_challenger_is(client, "model-killed", best_finished(runs))
    if storage == "object store":
        import pyarrow.fs

        stored = [info.path for info in bucket.get_file_info(pyarrow.fs.FileSelector("sweeps-bucket/sweeps/killed",
                                                                                      recursive=True))]
        assert "sweeps-bucket/sweeps/killed/sweep.json" in stored
        assert any("/tune/experiment_state" in path or "/tune/searcher" in path for path in stored), stored[:20]
        assert any("/checkpoint_" in path for path in stored), stored[:20]
        assert not (tmp_path / "runs" / "sweeps").exists()  # nothing of the sweep on local disk


def local_tune_state(folder: Path) -> Callable[[], str]:
    """The text of Tune's saved experiment state files in a local folder."""
    return lambda: "".join(path.read_text(errors="replace") for path in folder.glob("experiment_state*.json"))


def stored_tune_state(bucket, folder: str) -> Callable[[], str]:
    """The text of Tune's saved experiment state files in an object store folder."""
    import pyarrow.fs

    def read() -> str:
        infos = bucket.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        texts = []
        for info in infos:
            if info.base_name.startswith("experiment_state") and info.base_name.endswith(".json"):
                with bucket.open_input_stream(info.path) as stream:
                    texts.append(stream.read().decode(errors="replace"))
        return "".join(texts)
    return read


def wait_for_a_finished_and_a_training_trial(client: MlflowClient, experiment: str, driver: subprocess.Popen,
                                             log: Path, tune_state: Callable[[], str], timeout: float) -> str:
    """Poll until one trial run is FINISHED and another RUNNING one has logged an epoch and is
    in Tune's saved experiment state; returns the sweep's parent run id.

    Tune saves its state every 2 s: a trial that started after the last save is unknown to the
    resumed Tune, which proposes another in its place (the lost trial's run ends KILLED when
    the resumed sweep ends). Waiting for the save makes this test the resume of a known trial.

    The kill may land before Tune's saved state knows the finished trial ended; the resumed
    sweep must then take its result from MLflow instead of training it again, which the test's
    assertions (no second attempt, same history) check either way.
    """
    deadline = time.time() + timeout
    seen: dict[str, Any] = {}
    while time.time() < deadline:
        if driver.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {driver.returncode}) before the test could kill it:\n"
                                 + log.read_text(errors="replace")[-3000:])
        found = client.get_experiment_by_name(experiment)
        parents = client.search_runs([found.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'") if found else []
        if parents:
            runs = children(client, found.experiment_id, parents[0].info.run_id)
            finished = {r.data.tags[TRIAL_ID_TAG] for r in runs if r.info.status == FINISHED}
            training = {r.data.tags[TRIAL_ID_TAG] for r in runs if r.info.status == RUNNING
                        and client.get_metric_history(r.info.run_id, "objective")}
            if training:
                saved = tune_state()
                training = {trial_id for trial_id in training if trial_id in saved}
            seen = {"finished in MLflow": finished, "training": training}
            if finished and training:
                return parents[0].info.run_id
        time.sleep(0.25)
    raise AssertionError(f"no trial finished while another trained, in {timeout:.0f} s: {seen}")
