"""Connecting to Ray: an embedded local instance on a laptop, or a cluster by address.

Every Ray-using command goes through :func:`connect` so that the same code path runs on a
laptop (no address: a local Ray is started in-process and shut down at exit) and on a cluster
(``--address auto`` or ``ray://head:10001``). The difference is configuration, never code.
"""

from __future__ import annotations

import os
from typing import Any


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's total resources.

    ``address`` None (or ``local``) starts a private local Ray bound to 127.0.0.1; anything else
    is passed to ``ray.init`` (``auto`` joins the cluster this machine belongs to).
    """
    local = address in (None, "", "local")
    if local:
        _bind_to_loopback()
    import ray

    if not ray.is_initialized():
        # Keep Ray Data's and Train's console noise to progress bars and warnings.
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        if local:
            # Train's controller looks at its workers (and collects their reports) every 2 s by
            # default: on short trials that is seconds of waiting per trial and per epoch.
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
            # The dashboard serves Ray's State API, which Train needs to free the workers of a
            # trial that a Tune scheduler stopped early; loopback only.
            port = _free_port()
            kwargs.update(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
            # Train's placement-group cleaner finds the State API by looking for "the" local Ray;
            # with two on one machine (two sweeps, a test beside a sweep) that lookup raises, the
            # cleaner dies, and a trial stopped by ASHA keeps its workers' CPUs forever, so the
            # next trial never starts. Name this instance's API server for every process it starts
            # (Ray's processes inherit the driver's environment).
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        else:
            kwargs.update(address=address)
        ray.init(**kwargs)
    return dict(ray.cluster_resources())


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bind_to_loopback() -> None:
    """Make an embedded local Ray listen and talk on 127.0.0.1 only.

    Ray replaces "127.0.0.1" given as ``_node_ip_address`` by the machine's routable address
    unless cluster mode is off (its macOS/Windows default). A local Ray needs no other address,
    and nothing it starts should be reachable from the network.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by Ray's own processes
    try:
        from ray._private import ray_constants  # already imported: patch the value it read
    except ImportError:
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def dashboard_url() -> str | None:
    """``http://host:port`` of the Ray dashboard of the connected cluster, when it runs one."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # public in spirit: what ray.init prints
    except Exception:  # an older or newer Ray without it: no link rather than no sweep
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"

