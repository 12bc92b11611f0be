"""Connecting to Ray: an embedded local instance on a laptop, or a cluster by address.

Every Ray-using command goes through :func:`connect` so that the same code path runs on a
laptop (no address: a local Ray is started in-process and shut down at exit) and on a cluster
(``--address auto`` or ``ray://head:10001``). The difference is configuration, never code.

Joining a cluster first compares the versions that must agree on every machine of a sweep (Ray,
torch, MLflow, hilbert, Python) between this driver and every node, and refuses a cluster that
differs: a trial whose worker runs another torch or MLflow fails later in ways nobody can read.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any, Mapping

# What every process of a sweep must run identically (requirements/lock.txt pins them all).
CHECKED_PACKAGES = ("ray", "torch", "mlflow", "hilbert")
# Set to 1 to warn instead of refusing (a deliberate mix, such as a patch release on one node).
ALLOW_MISMATCH_ENV = "HILBERT_ALLOW_VERSION_MISMATCH"
NODE_ANSWER_SECONDS = 120.0


class VersionMismatch(RuntimeError):
    """A node of the cluster runs other versions than the driver; the message names each."""


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's total resources.

    ``address`` None (or ``local``) starts a private local Ray bound to 127.0.0.1; anything else
    is passed to ``ray.init`` (``auto`` joins the cluster this machine belongs to).
    """
    local_ray = address in (None, "", "local")
    if local_ray:
        _bind_to_loopback()
    # Ray is imported by the functions that use it: the CLI imports this module at start-up
    # (for VersionMismatch), and importing Ray takes seconds.
    import ray

    if not ray.is_initialized():
        # Keep Ray Data's and Train's console noise to progress bars and warnings.
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
        if local_ray:
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
        if not local_ray:
            check_cluster_versions()
    return dict(ray.cluster_resources())


def actor_pool(resources: Mapping[str, float], requested: int | None, cpus_per_actor: float,
               use_gpu: bool | None, work: int) -> tuple[int, bool]:
    """How many actors a Ray Data pool starts on a cluster of ``resources`` and whether each takes
    a GPU: ``requested``, else one per GPU when GPUs are used (the default where the cluster has
    any), else one per ``cpus_per_actor`` CPUs; never more than ``work`` items, never fewer than
    one. ValueError when a GPU is asked of a cluster without one."""
    gpus = resources.get("GPU", 0.0)
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    if use_gpu and gpus == 0:
        raise ValueError("use_gpu was requested but the Ray cluster has no GPU")
    if requested is None:
        requested = int(gpus) if use_gpu else max(1, int(resources.get("CPU", 1) // max(cpus_per_actor, 1e-3)))
    return max(1, min(requested, work)), use_gpu


def installed_versions() -> dict[str, str]:
    """This process's Python (major.minor: what Ray requires to match) and the version of each
    of :data:`CHECKED_PACKAGES` as installed (its distribution's metadata)."""
    versions = {"python": ".".join(platform.python_version_tuple()[:2])}
    for name in CHECKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def version_differences(driver: Mapping[str, str], node: Mapping[str, str], where: str) -> list[str]:
    """One line for each package whose version at ``where`` differs from the driver's."""
    return [f"{name}: {node.get(name, 'unknown')} on {where}, {version} on the driver"
            for name, version in driver.items() if node.get(name) != version]


def refuse_differences(differences: list[str]) -> None:
    """Raise :class:`VersionMismatch` naming every difference, with the fix (or only warn when
    $HILBERT_ALLOW_VERSION_MISMATCH is 1)."""
    if not differences:
        return
    message = ("the cluster runs other versions than this driver:\n  " + "\n  ".join(differences) + "\n"
               "Every machine of a sweep must run the same versions: install requirements/lock.txt on the "
               "driver and on every node (pip install -c requirements/lock.txt ..., as the cluster configs "
               "do), or rebuild the image from this checkout; see clusters/README.md, 'One environment "
               f"everywhere'. To run anyway, set {ALLOW_MISMATCH_ENV}=1.")
    if os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        import warnings

        warnings.warn(message, stacklevel=2)
        return
    raise VersionMismatch(message)


def check_cluster_versions(timeout_s: float = NODE_ANSWER_SECONDS) -> dict[str, dict[str, str]]:
    """Compare :func:`installed_versions` of this driver with those of every alive node (one
    zero-CPU task pinned to each node, in the job's runtime environment, as trials see it).

    Returns node id -> versions; raises :class:`VersionMismatch` when any node differs or does
    not answer. Nodes the autoscaler starts later are installed from the same lock by the cluster
    configs, and each trial checks its own node again (:func:`require_versions`).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver = installed_versions()
    probe = ray.remote(num_cpus=0, max_retries=0)(installed_versions)
    nodes = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes() if node.get("Alive")}
    asked = {node_id: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
             for node_id in nodes}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_s)
    answers: dict[str, dict[str, str]] = {}
    differences: list[str] = []
    for node_id, reference in asked.items():
        where = f"node {nodes[node_id]} ({node_id[:12]})"
        if reference not in ready:
            ray.cancel(reference, force=True)
            differences.append(f"{where} did not answer in {timeout_s:.0f} s (is hilbert installed there?)")
            continue
        try:
            answers[node_id] = ray.get(reference)
        except Exception as error:  # hilbert not importable there, a broken environment
            differences.append(f"{where} could not report its versions: {type(error).__name__}: "
                               f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}")
            continue
        differences += version_differences(driver, answers[node_id], where)
    refuse_differences(differences)
    return answers


def require_versions(expected: Mapping[str, str], where: str) -> None:
    """Refuse to go on in a process whose versions differ from ``expected`` (the driver's): how
    a trial on a node that joined after the sweep started checks itself."""
    refuse_differences(version_differences(expected, installed_versions(), where))


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

