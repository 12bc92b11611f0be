"""Jobs on a real two-node Ray cluster on this machine, submitted as users do it on a cluster.

One Ray head (``ray start --head``, 1 CPU, token authentication, 127.0.0.1 only) serves the
module; each test joins a second node of its own (see ``loopback_ray_node.py``) and loses it:

- A second node runs another MLflow (a distribution of another version first on its path, as a
  stale install would be): `hilbert sweep` and `hilbert train` submitted to it must refuse before
  the first trial, naming the package and both versions.
- `hilbert predict --address auto` submitted with ``ray job submit --working-dir`` runs one
  model actor on each node, and writes the rows of the single-process path.
- `hilbert sweep --address auto` submitted the same way, as ``clusters/README.md`` tells users to,
  with an MLflow tracking server (``mlflow server``) on 127.0.0.1: the driver runs on the head,
  logs over HTTP. When a trial on the second node has trained an epoch, the test SIGKILLs that
  node (its raylet, agents and workers). The sweep must finish on the head: the lost trial retried
  from its last checkpointed epoch, every trial FINISHED in MLflow, nothing left RUNNING, the best
  one registered. Where the trials ran is read from Ray's State API.

Everything the tests started is killed at the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from conftest import extract_in_process
from hilbert.data.demo import write_demo_corpus
from hilbert.data.manifest import load_manifest
from hilbert.predict import load_predictor, predict_probabilities, predictions_table
from hilbert.tracking.runs import FINISHED, PARENT_TAG, ROLE_TAG, RUNNING, TRIAL_ID_TAG
from sessions import kill_session
from test_batch_inference import AUDIO as BATCH_AUDIO, TEXT as BATCH_TEXT, fold_checkpoints, write_corpus
from test_sweep import (REPOSITORY, HILBERT, assert_challenger_is, best_finished, free_port, objective_history,
                        write_sweep)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
EPOCHS = 8
TRIALS = 3


@dataclass
class Cluster:
    """A head node, shared by this module's tests; each test joins the second node it needs
    (:meth:`join`) and the node is gone again when the test ends."""

    env: dict[str, str]  # what every process of the cluster and every client of it runs with
    gcs_address: str
    dashboard: str  # http://127.0.0.1:PORT: jobs and the State API
    head: subprocess.Popen
    head_node_id: str
    logs: Path
    stack: ExitStack
    second: subprocess.Popen | None = None
    second_node_id: str = ""

    def ray(self, *args: str, timeout: float = 120) -> str:
        """A ``ray`` CLI command against this cluster; returns its stdout."""
        done = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def listed(self, kind: str, *filters: str) -> list[dict]:
        """``ray list KIND --detail`` as dicts (Ray's State API)."""
        options = [option for value in filters for option in ("--filter", value)]
        output = self.ray("list", kind, "--address", self.dashboard, "--detail", "--format", "json",
                          "--limit", "10000", *options)
        return state_rows(output)

    def join(self, second_env: dict[str, str] | None = None) -> str:
        """Start a second node (running with ``second_env`` over the cluster's environment) and
        wait until the head lists it alive; returns its node id."""
        assert self.second is None, "one second node at a time"
        # `ray start` gives a node 30 s (fixed in Ray) to register; on 2 busy cores a raylet can take
        # longer, and the command then exits: start it again rather than fail the test.
        for attempt in range(3):
            second = start_ray_node(
                [sys.executable, str(REPOSITORY / "tests" / "loopback_ray_node.py"), "start",
                 f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                 *node_ports()], {**self.env, **(second_env or {})}, self.logs / f"second-{attempt}.log")
            self.stack.callback(kill_session, second.pid)

            def joined_or_gave_up():
                nodes = alive_nodes(self.env, self.dashboard)
                return nodes if len(nodes) == 2 else ("gave up" if second.poll() is not None else None)

            nodes = wait_for(joined_or_gave_up, 120, "the second node to join")
            if nodes != "gave up":
                break
            kill_session(second.pid)
        else:
            raise AssertionError("the second node did not start in 3 attempts: see " + str(self.logs))
        self.second = second
        self.second_node_id = next(n["node_id"] for n in nodes if n["node_id"] != self.head_node_id)
        return self.second_node_id

    def kill_second(self) -> None:
        """SIGKILL the second node (raylet, agents, workers) and wait until the head lists it dead."""
        if self.second is None:
            return
        kill_session(self.second.pid)
        self.second = None
        wait_for(lambda: [n["node_id"] for n in alive_nodes(self.env, self.dashboard)] == [self.head_node_id], 60,
                 "the head to see the second node dead")


def state_rows(output: str) -> list[dict]:
    """``ray list --format json`` prints a JSON list, or a sentence when there is nothing to list."""
    return json.loads(output) if output.lstrip().startswith("[") else []


def cluster_env(temp_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
        env.pop(name, None)
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray process listens on 127.0.0.1 only
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),  # as ray_cluster.yaml sets it up
        # The head declares a node dead after ~3 missed 1 s health checks instead of ~15 s.
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    })
    return env


def start_ray_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a session of its own: the node's raylet, agents and workers
    stay in that session, so killing the session is killing the node."""
    with open(log, "wb") as out:
        return subprocess.Popen([*command, "--block", "--disable-usage-stats"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def node_ports() -> list[str]:
    """Ports that default to fixed numbers: two nodes on one machine must not share them."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive_nodes(env: dict[str, str], dashboard: str) -> list[dict]:
    done = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--format", "json",
                           "--filter", "state=ALIVE"], env=env, capture_output=True, text=True)
    return state_rows(done.stdout) if done.returncode == 0 else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head (1 CPU) on 127.0.0.1 with token authentication, for every test of this module:
    starting one is ~10 s on 2 cores. Each test joins and loses its own second node."""
    # Unix sockets under Ray's temp folder must stay under ~107 characters: a short folder.
    temp_dir = Path(tempfile.mkdtemp(prefix="hilbert-ray-", dir="/tmp"))
    logs = tmp_path_factory.mktemp("cluster-logs")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        stack.callback(kill_processes_under, temp_dir)  # runs before the folder is removed
        env = cluster_env(temp_dir)
        gcs_port, dashboard_port = free_port(), free_port()
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        head = start_ray_node(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--num-cpus=1", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir={temp_dir / 'ray'}", *node_ports()], env, logs / "head.log")
        stack.callback(kill_session, head.pid)
        nodes = wait_for(lambda: alive_nodes(env, dashboard), 90, "the head node")
        cluster = Cluster(env, f"127.0.0.1:{gcs_port}", dashboard, head, nodes[0]["node_id"], logs, stack)
        yield cluster


@pytest.fixture
def second_node_leaves(cluster: Cluster):
    """Whatever the test does, its second node is gone when it ends: the next test joins its own."""
    yield cluster
    cluster.kill_second()


def start_mlflow_server(root: Path, logs: Path, stack: ExitStack) -> str:
    port = free_port()
    with open(logs / "mlflow.log", "wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "mlflow-artifacts")],
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    stack.callback(kill_session, server.pid)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            assert server.poll() is None, (logs / "mlflow.log").read_text(errors="replace")[-3000:]
            return False

    wait_for(healthy, 120, "the MLflow server")
    return uri


def kill_processes_under(folder: Path) -> None:
    """Whatever still names the cluster's temp folder on its command line (a process that left
    the node's session): killed, so no test leaves Ray behind."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def trial_runs(client: MlflowClient) -> tuple[str | None, list]:
    experiment = client.get_experiment_by_name("exp-cluster")
    if experiment is None:
        return None, []
    parents = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")
    if not parents:
        return None, []
    parent_id = parents[0].info.run_id
    runs = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=100)
    return parent_id, runs


def stale_distribution(folder: Path, name: str, version: str) -> Path:
    """A folder whose ``NAME-VERSION.dist-info`` is what ``importlib.metadata`` finds first when
    the folder leads ``PYTHONPATH``: how a node with a stale install reports itself."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_a_node_with_other_versions_is_refused_before_the_first_trial(second_node_leaves: Cluster, tmp_path: Path):
    from importlib import metadata

    cluster = second_node_leaves
    corpus = write_demo_corpus(tmp_path / "corpus", n_documents=12, seed=1)
    sweep_file = write_sweep(tmp_path, corpus, name="mixed", trials=1, epochs=1, workers=1,
                             search={"optimization.learning_rate": {"type": "loguniform", "low": 0.001, "high": 0.01}})
    stale = stale_distribution(tmp_path / "stale", "mlflow", "0.0.1")
    cluster.join(second_env={"PYTHONPATH": f"{stale}:{REPOSITORY}"})
    for command in (["sweep", str(sweep_file), "--address", "auto", "--tracking-uri",
                     f"sqlite:///{tmp_path / 'mlflow.db'}"],
                    ["train", str(tmp_path / "train.yaml"), "--address", "auto"]):
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPOSITORY),
             "--", HILBERT, *command], env=cluster.env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output[-4000:]
        assert "the cluster runs other versions than this driver" in output, output[-4000:]
        assert f"mlflow: 0.0.1 on node 127.0.0.1 ({cluster.second_node_id[:12]}), " \
               f"{metadata.version('mlflow')} on the driver" in output, output[-4000:]
        assert "requirements/lock.txt" in output and "Traceback" not in output, output[-4000:]
        assert "torch:" not in output.split("the cluster runs other versions")[1].split("Every machine")[0]
    # Refused before any trial: no trial folder, no checkpoint, no model.
    assert not list((tmp_path / "runs").rglob("trial-*")) and not list((tmp_path / "runs").rglob("*.safetensors"))


def test_batch_prediction_submitted_to_two_nodes_runs_an_actor_on_each(second_node_leaves: Cluster, tmp_path: Path):
    """``hilbert predict --address auto`` submitted as a job: one model actor per node (each node
    has one CPU), the rows those of the single-process path, in manifest order."""
    cluster = second_node_leaves
    manifest = write_corpus(tmp_path / "corpus", n=24)
    corpus = load_manifest(manifest)
    feature_set = extract_in_process(corpus, BATCH_AUDIO, BATCH_TEXT, tmp_path / "cache")
    model = fold_checkpoints(tmp_path / "model", feature_set.timing)
    cluster.join()
    out = tmp_path / "predictions.parquet"
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", "hilbert-predict",
         "--working-dir", str(REPOSITORY), "--", HILBERT, "predict", str(model), str(manifest), str(out),
         "--cache", str(tmp_path / "cache"), "--address", "auto", "--actors", "2", "--documents-per-batch", "2"],
        env=cluster.env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "24 documents in" in output and "on 2 actor(s)" in output, output[-4000:]
    actors = [actor for actor in cluster.listed("actors") if "ModelActor" in actor.get("class_name", "")]
    assert {actor["node_id"] for actor in actors} == {cluster.head_node_id, cluster.second_node_id}, actors

    predictor = load_predictor(model)
    _, probabilities = predict_probabilities(predictor, corpus, tmp_path / "cache")
    expected = predictions_table(corpus, predictor.label_maps, probabilities).to_pandas()
    got = pq.read_table(out).to_pandas()
    assert got["doc_id"].tolist() == expected["doc_id"].tolist()
    numbers = [column for column in expected.columns if "/p/" in column]
    assert np.abs(got[numbers].to_numpy(float) - expected[numbers].to_numpy(float)).max() <= 1e-6


def test_a_sweep_submitted_to_two_nodes_survives_losing_one(second_node_leaves: Cluster, tmp_path: Path):
    cluster = second_node_leaves
    logs = tmp_path / "logs"
    logs.mkdir()
    corpus = write_demo_corpus(tmp_path / "corpus", n_documents=36, seed=4)
    sweep_file = write_sweep(
        tmp_path, corpus, name="cluster", trials=TRIALS, epochs=EPOCHS, workers=1, concurrency=2, max_failures=2,
        searcher={"type": "optuna_tpe", "seed": 2, "startup_trials": 2},
        search={"optimization.learning_rate": {"type": "loguniform", "low": 0.0003, "high": 0.01}})

    with ExitStack() as stack:
        uri = start_mlflow_server(tmp_path, logs, stack)
        cluster.join()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)

        submit_log = logs / "submit.log"
        with open(submit_log, "wb") as out:
            submit = subprocess.Popen(
                [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", "hilbert-sweep",
                 "--working-dir", str(REPOSITORY), "--",
                 HILBERT, "sweep", str(sweep_file), "--address", "auto", "--name", "cluster", "--tracking-uri", uri],
                env=cluster.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(kill_session, submit.pid)

        def a_trial_trained_an_epoch_on_the_second_node():
            assert submit.poll() is None, "the job ended before the test killed a node:\n" + \
                submit_log.read_text(errors="replace")[-4000:]
            _, runs = trial_runs(client)
            for run in runs:
                if (run.info.status == RUNNING and run.data.tags.get("ray.node_id") == cluster.second_node_id
                        and len(objective_history(client, run.info.run_id)) < EPOCHS - 1
                        and objective_history(client, run.info.run_id)):
                    return run
            return None

        victim_node = cluster.second_node_id
        victim = wait_for(a_trial_trained_an_epoch_on_the_second_node, 300, "a trial to train on the second node",
                          interval=0.25)
        cluster.kill_second()  # the second node dies: raylet, agents, the trial's actor
        killed_at = len(objective_history(client, victim.info.run_id))

        try:
            submit.wait(timeout=420)
        except subprocess.TimeoutExpired:
            raise AssertionError("the sweep did not finish after the node died:\n"
                                 + submit_log.read_text(errors="replace")[-4000:]) from None
        output = submit_log.read_text(errors="replace")
        jobs = {job["submission_id"]: job["status"] for job in cluster.listed("jobs")}
        assert submit.returncode == 0 and jobs.get("hilbert-sweep") == "SUCCEEDED", (jobs, output[-4000:])

        # Ray's State API: trials ran on both nodes, and the second node is gone.
        nodes = {node["node_id"]: node["state"] for node in cluster.listed("nodes")}
        alive = {node for node, state in nodes.items() if state == "ALIVE"}
        assert alive == {cluster.head_node_id} and nodes[victim_node] == "DEAD", nodes
        trial_actors = cluster.listed("actors", "class_name=ImplicitFunc")  # Tune's function-trial actors
        assert {actor["node_id"] for actor in trial_actors} == {cluster.head_node_id, victim_node}, \
            trial_actors

        parent_id, runs = trial_runs(client)
        assert parent_id and client.get_run(parent_id).info.status == FINISHED
        assert len(runs) == TRIALS and len({run.data.tags[TRIAL_ID_TAG] for run in runs}) == TRIALS
        assert [run.info.status for run in runs] == [FINISHED] * TRIALS, output[-4000:]
        retried = client.get_run(victim.info.run_id)
        assert retried.data.tags["attempts"] == "2"
        assert retried.data.tags["ray.node_id"] == cluster.head_node_id  # finished where it could
        # From its checkpoint: no epoch reported twice (a restart from scratch would repeat the
        # first ones), none reported before the kill lost, through to the last. (An epoch whose
        # checkpoint was written in the instant before the kill, its report not yet sent, is not
        # trained again either, so its step may be missing: hence no exact range.)
        steps = [step for step, _ in objective_history(client, retried.info.run_id)]
        assert len(steps) == len(set(steps)) and set(range(killed_at)) <= set(steps), (steps, killed_at)
        assert steps[-1] == EPOCHS - 1 and len(steps) >= EPOCHS - 1, steps
        others = [run for run in runs if run.info.run_id != retried.info.run_id]
        assert all("attempts" not in run.data.tags for run in others)
        assert_challenger_is(client, "model-cluster", best_finished(runs))
        assert "registered trial-" in output and "Job 'hilbert-sweep' succeeded" in output
