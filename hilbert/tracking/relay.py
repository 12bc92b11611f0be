"""Trials on other nodes log to a store only the driver's machine can reach, through Ray.

On a cluster the tracking server listens on the head's loopback (nothing on the network can
reach it; users port-forward its UI), or the store is a sqlite file on the head's disk. A trial
on a worker node cannot open either. Instead of exposing the store, the sweep starts one small
actor on the driver's node that holds the MLflow client, and trials call it through Ray's own
(token-authenticated) channel: :class:`RelayedClient` offers the :class:`mlflow.MlflowClient`
methods the trials use, and ships the bytes of local files (artifacts, figures) instead of their
paths, which mean nothing on the head. A tracking server that every node can reach (an address
other than loopback) is used directly: no relay.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hilbert.tracking.store import mlflow_client

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def needs_relay(tracking_uri: str, *, local_ray: bool) -> bool:
    """Whether trials can only reach ``tracking_uri`` through the driver's node: the store is a
    local file (sqlite, a folder) or a server on loopback, and Ray may run trials elsewhere."""
    if local_ray:
        return False
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        return (parsed.hostname or "") in LOOPBACK_HOSTS
    return parsed.scheme not in ("databricks", "postgresql", "mysql", "mssql")  # sqlite, file, a bare path


class MlflowRelay:
    """The driver-side end: one MLflow client, called by trials (a Ray actor; see start_relay)."""

    def __init__(self, tracking_uri: str):
        self.client = mlflow_client(tracking_uri)

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.client, method)(*args, **kwargs)

    def log_files(self, run_id: str, files: dict[str, bytes], artifact_path: str | None) -> None:
        """Write ``files`` (relative path -> bytes) to a folder here and log it as artifacts."""
        with tempfile.TemporaryDirectory(prefix="hilbert-relay-") as folder:
            for relative, content in files.items():
                target = Path(folder, relative)
                if Path(folder) not in target.resolve().parents:
                    raise ValueError(f"artifact path {relative!r} leaves its folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            self.client.log_artifacts(run_id, folder, artifact_path)


def start_relay(tracking_uri: str):
    """Start the relay on this (the driver's) node; returns its actor handle (kill it after)."""
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(MlflowRelay).options(
        num_cpus=0, max_concurrency=8,  # trials log at once; the client is thread-safe HTTP/SQL
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(tracking_uri)
    ray.get(actor.call.remote("search_experiments", (), {"max_results": 1}))  # reachable from there, or fail now
    return actor


class RelayedClient:
    """The trial-side end: :class:`mlflow.MlflowClient`'s methods, run by the relay (what an
    :class:`~hilbert.tracking.store.Experiment` hands its users as ``client`` when ``relayed``)."""

    def __init__(self, relay):
        self._relay = relay

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def relayed(*args, **kwargs):
            return ray.get(self._relay.call.remote(method, args, kwargs))

        return relayed

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        files = {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}
        self._send(run_id, files, artifact_path)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        self._send(run_id, {path.name: path.read_bytes()}, artifact_path)

    def log_figure(self, run_id: str, figure, artifact_file: str, *, save_kwargs: dict | None = None) -> None:
        buffer = io.BytesIO()
        suffix = Path(artifact_file).suffix.lstrip(".") or "png"
        figure.savefig(buffer, format=suffix, **(save_kwargs or {}))
        folder, _, name = artifact_file.rpartition("/")
        self._send(run_id, {name: buffer.getvalue()}, folder or None)

    def _send(self, run_id: str, files: dict[str, bytes], artifact_path: str | None) -> None:
        ray.get(self._relay.log_files.remote(run_id, files, artifact_path))
