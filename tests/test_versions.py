"""The version check of a cluster: what it compares, what its refusal says, and its Ray path on a
local Ray (the two-node refusal is in test_cluster_sweep.py)."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from hilbert.ray_runtime import (ALLOW_MISMATCH_ENV, CHECKED_PACKAGES, VersionMismatch, check_cluster_versions,
                                 installed_versions, refuse_differences, require_versions, version_differences)


def test_installed_versions_are_this_process_python_and_packages():
    versions = installed_versions()
    assert versions["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert set(versions) == {"python", *CHECKED_PACKAGES}
    assert versions["torch"] == metadata.version("torch") and versions["hilbert"] == metadata.version("hilbert")


def test_a_difference_names_the_package_both_versions_and_the_fix():
    driver = {"python": "3.11", "ray": "2.60.0", "torch": "2.14.1", "mlflow": "3.17.2", "hilbert": "0.1.0"}
    node = {**driver, "mlflow": "3.16.0", "torch": "not installed"}
    differences = version_differences(driver, node, "node 10.0.0.7 (abc)")
    assert differences == ["torch: not installed on node 10.0.0.7 (abc), 2.14.1 on the driver",
                           "mlflow: 3.16.0 on node 10.0.0.7 (abc), 3.17.2 on the driver"]
    with pytest.raises(VersionMismatch) as refused:
        refuse_differences(differences)
    message = str(refused.value)
    assert "mlflow: 3.16.0 on node 10.0.0.7" in message and "requirements/lock.txt" in message
    assert ALLOW_MISMATCH_ENV in message
    assert version_differences(driver, dict(driver), "node x") == []
    refuse_differences([])  # nothing to refuse


def test_a_deliberate_mix_only_warns(monkeypatch):
    monkeypatch.setenv(ALLOW_MISMATCH_ENV, "1")
    with pytest.warns(UserWarning, match="ray: 2.59.0 on trial"):
        refuse_differences(["ray: 2.59.0 on trial t1, 2.60.0 on the driver"])


def test_a_trial_on_a_node_with_other_versions_refuses_to_run():
    expected = {**installed_versions(), "torch": "9.9.9"}
    with pytest.raises(VersionMismatch, match=r"torch: .* on trial 1a2b, 9\.9\.9 on the driver"):
        require_versions(expected, "trial 1a2b")
    require_versions(installed_versions(), "trial 1a2b")


@pytest.mark.slow
def test_every_node_of_a_local_ray_answers_with_the_drivers_versions(local_ray):
    answers = check_cluster_versions(timeout_s=60)
    alive = [node["NodeID"] for node in local_ray.nodes() if node["Alive"]]
    assert sorted(answers) == sorted(alive) and len(alive) == 1
    assert list(answers.values()) == [installed_versions()]


def test_actor_pools_take_one_actor_per_gpu_or_per_cpus_and_never_more_than_the_work():
    from hilbert.ray_runtime import actor_pool

    assert actor_pool({"CPU": 16.0}, None, 1.0, None, 100) == (16, False)
    assert actor_pool({"CPU": 16.0}, None, 4.0, None, 100) == (4, False)
    assert actor_pool({"CPU": 16.0, "GPU": 2.0}, None, 1.0, None, 100) == (2, True)  # GPUs by default
    assert actor_pool({"CPU": 16.0, "GPU": 2.0}, None, 1.0, False, 100) == (16, False)
    assert actor_pool({"CPU": 16.0}, 8, 1.0, None, 3) == (3, False)  # no idle actors for 3 items
    assert actor_pool({"CPU": 0.5}, None, 1.0, None, 10) == (1, False)
    with pytest.raises(ValueError, match="no GPU"):
        actor_pool({"CPU": 4.0}, None, 1.0, True, 10)
