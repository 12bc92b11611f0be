"""Trials that cannot reach the MLflow store log through a relay actor on the driver's node:
what they log (params, metrics, text, figures, folders of files) arrives as if logged directly."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from hilbert.tracking.relay import RelayedClient, needs_relay, start_relay  # noqa: E402
from hilbert.tracking.runs import TrialTracker  # noqa: E402
from hilbert.tracking.store import Experiment  # noqa: E402


@pytest.mark.parametrize("uri, local_ray, relayed", [
    ("http://127.0.0.1:5000", False, True),      # the head's loopback server, trials elsewhere
    ("http://localhost:5000/", False, True),
    ("sqlite:////home/ray/mlflow.db", False, True),  # a file on the driver's disk
    ("file:///home/ray/mlruns", False, True),
    ("http://10.0.0.5:5000", False, False),      # a server every node reaches: used directly
    ("https://mlflow.example.org", False, False),
    ("postgresql://user@db/mlflow", False, False),
    ("sqlite:////tmp/mlruns.db", True, False),   # an embedded local Ray: one machine, no relay
    ("http://127.0.0.1:5000", True, False),
])
def test_relay_only_when_trials_could_not_reach_the_store(uri: str, local_ray: bool, relayed: bool):
    assert needs_relay(uri, local_ray=local_ray) is relayed


def test_what_a_trial_logs_through_the_relay_lands_in_the_store(local_ray, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    direct = Experiment.open(uri, "relayed")
    relay = start_relay(uri)
    try:
        relayed = Experiment(direct.uri, direct.experiment_id, direct.name, relayed=RelayedClient(relay))
        assert relayed == direct  # the relay is how, not where
        folder = tmp_path / "model"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "fold_0" / "weights.safetensors").write_bytes(b"\x00\x01binary\xff")
        (folder / "config.json").write_text('{"d": 16}')
        figure, axes = plt.subplots()
        axes.plot([0, 1], [1, 0])

        with TrialTracker(relayed, "parent-run", "t1", {"lr": 0.01, "model": {"d": 16}}) as run:
            run.log_epoch({"loss": 0.5, "val/topic/auc": 0.75}, step=3)
            run.log_fold_table({0: {"auc": 0.7}, 1: {"auc": 0.8}})
            run.log_figures({"roc": figure})
            run.log_artifacts(folder, "model")
        plt.close(figure)

        client = direct.client
        logged = client.get_run(run.run_id)
        assert logged.info.status == "FINISHED"
        assert logged.data.params["lr"] == "0.01" and logged.data.params["model.d"] == "16"
        assert logged.data.metrics["val/topic/auc"] == 0.75 and logged.data.metrics["cv_mean/auc"] == 0.75
        downloaded = Path(client.download_artifacts(run.run_id, "", str(tmp_path / "download")))
        assert (downloaded / "model" / "fold_0" / "weights.safetensors").read_bytes() == b"\x00\x01binary\xff"
        assert (downloaded / "model" / "config.json").read_text() == '{"d": 16}'
        assert (downloaded / "figures" / "roc.png").read_bytes().startswith(b"\x89PNG")
        assert (downloaded / "folds" / "metrics.csv").is_file()
    finally:
        local_ray.kill(relay)
