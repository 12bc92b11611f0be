"""Where MLflow runs are stored: the tracking URI, one client per store, and experiments.

Every call in hilbert goes through an explicit :class:`mlflow.MlflowClient` bound to one
tracking URI, never through MLflow's process-global "active run": trials run in other processes
(Ray actors), several can share a process, and a global run is what leaves runs stuck RUNNING.
The registry lives in the same store as the runs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shlex
from pathlib import Path
from typing import Any

# MLflow 3 reports usage to a remote service unless told not to, and decides when ``mlflow`` is
# first imported; hilbert sends nothing off the machine it was not asked to. MLflow 3.17 reads
# MLFLOW_DISABLE_TELEMETRY (or DO_NOT_TRACK), not MLFLOW_ENABLE_TELEMETRY. An explicit setting in
# the environment still wins. Every module of hilbert that imports mlflow imports this one first.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

# MLflow announces every sqlite schema check at INFO ("Creating initial MLflow database tables...").
for _chatty in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"


class NoTrackingStore(ValueError):
    """No tracking URI was given where hilbert will not make up one."""


def resolve_tracking_uri(explicit: str | None, workdir: str | Path | None) -> str:
    """The tracking URI to use: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file
    ``<workdir>/mlruns.db`` (absolute, so it does not depend on the current directory).

    With no ``workdir`` (reading a registry: a new, empty store would only hide a mistake) and
    neither of the others, :class:`NoTrackingStore`. Never MLflow's own default, a new
    ``mlflow.db`` in whatever directory the process runs in.
    """
    if explicit:
        return explicit
    if os.environ.get(ENV_TRACKING_URI):
        return os.environ[ENV_TRACKING_URI]
    if workdir is None:
        raise NoTrackingStore("no MLflow store given: pass tracking_uri (e.g. sqlite:///runs/mlruns.db) "
                              f"or set {ENV_TRACKING_URI}")
    return f"sqlite:///{Path(workdir).resolve() / 'mlruns.db'}"


def artifact_location_for(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a sqlite database file.

    A sqlite store has no artifact root of its own; MLflow would use ``./mlruns`` of whatever
    directory the process happens to run in. A server (``http://``) decides for itself: None.
    """
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    database = Path(uri[len("sqlite:///"):]).resolve()
    return (database.parent / "mlartifacts").as_uri()


def ui_command(uri: str, port: int = 5000) -> str:
    """How to open the MLflow UI on this store: the command line that serves it from this machine
    only (then http://127.0.0.1:PORT), or, for a tracking server, its address (it serves the UI)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}  (the tracking server serves it; on a cluster, port-forward it first)"
    parts = ["mlflow", "ui", "--backend-store-uri", uri]
    artifacts = artifact_location_for(uri)
    if artifacts:
        parts += ["--default-artifact-root", artifacts]  # for experiments created from the UI
    parts += ["--host", "127.0.0.1", "--port", str(port)]
    return f"{shlex.join(parts)}  (then http://127.0.0.1:{port})"


@functools.lru_cache(maxsize=None)
def mlflow_client(uri: str) -> MlflowClient:
    """One client per URI and process; the registry lives in the same store as the runs."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        Path(uri[len("sqlite:///"):]).resolve().parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An MLflow experiment in one store: plain strings, so it pickles into Ray trials. Where trials
    reach the store only through the driver's node, ``relayed`` is the client that goes there
    (:class:`hilbert.tracking.relay.RelayedClient`: the methods of :class:`mlflow.MlflowClient`)."""

    uri: str
    experiment_id: str
    name: str
    relayed: Any = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def open(cls, uri: str, name: str = "hilbert") -> "Experiment":
        """Get experiment ``name``, creating it (artifacts beside a sqlite store) if missing."""
        client = mlflow_client(uri)
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                client.create_experiment(name, artifact_location=artifact_location_for(uri))
            except MlflowException as error:  # another process created it first
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            found = client.get_experiment_by_name(name)
        assert found is not None
        if found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} in {uri} is deleted: restore it "
                             f"(mlflow experiments restore --experiment-id {found.experiment_id}) or use another name")
        return cls(uri, found.experiment_id, name)

    @property
    def client(self) -> MlflowClient:
        return self.relayed if self.relayed is not None else mlflow_client(self.uri)
