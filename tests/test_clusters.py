"""Cluster definitions (ray_cluster.yaml, clusters/*): checked offline against Ray's own autoscaler
schema and config preparation, KubeRay manifests against the fields KubeRay requires, and every
file against requirements/lock.txt (the versions this project is tested with): each installs
through the lock, and every version it names is the lock's. Nothing here talks to a cloud."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

import lockfile

ROOT = Path(__file__).resolve().parents[1]
AUTOSCALER_CONFIGS = ["ray_cluster.yaml", "clusters/gcp.yaml", "clusters/local-provider.yaml"]
KUBERAY = ["clusters/kuberay-raycluster.yaml", "clusters/kuberay-rayjob.yaml"]
ALL_FILES = AUTOSCALER_CONFIGS + KUBERAY + ["clusters/Dockerfile"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
EDIT_MARKER = re.compile(r"<EDIT:[a-z0-9-]+>")
LOCKED = lockfile.pins()
# The head's MLflow server listens on loopback only; trials on other nodes log through the sweep's
# relay (hilbert/tracking/relay.py), so nothing but the head ever talks to it.
HEAD_TRACKING_URI = "http://127.0.0.1:5000"


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((ROOT / name).read_text()) if doc]


def check_with_ray(config: dict) -> dict:
    """Ray's schema, then `ray up`'s own preparation and validation (defaults merged, Docker and
    node-type checks); neither contacts the provider."""
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------------------------
# Autoscaler configs (AWS, GCP, local provider)


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_autoscaler_config_passes_rays_schema_and_preparation(name):
    prepared = check_with_ray(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["head_start_ray_commands"] and prepared["worker_start_ray_commands"]


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "clusters/gcp.yaml"])
def test_cloud_config_has_cpu_head_and_two_autoscaling_gpu_types(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_counts = sorted(t["resources"]["GPU"] for n, t in types.items() if n != config["head_node_type"])
    assert gpu_counts == [1, 4]
    for node_name, node in types.items():
        if node_name != config["head_node_type"]:
            assert node["min_workers"] == 0 and node["max_workers"] >= 1
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert 0 < config["idle_timeout_minutes"] <= 60


def check_mlflow_on_loopback(head: str, workers: str) -> None:
    """The head starts `mlflow server` bound to 127.0.0.1:5000 (never every interface), its Ray
    exports that URI for a driver on the head, and workers get no MLflow setting at all."""
    server = re.search(r"nohup \S*mlflow server (.*?) >", head)
    assert server, "the head starts no `mlflow server` in the background"
    assert re.search(r"--host 127\.0\.0\.1 --port 5000\b", server.group(1)), \
        f"MLflow is not bound to 127.0.0.1:5000: {server.group(1)!r}"
    assert "0.0.0.0" not in head, "the head binds something to every interface"
    assert f"MLFLOW_TRACKING_URI={HEAD_TRACKING_URI}" in head, "the head's Ray does not export the loopback URI"
    assert "tracking_uri" not in head, "the head still writes a network tracking URI to a file"
    assert "MLFLOW_TRACKING_URI" not in workers, "workers log through the relay, not to MLflow"


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS)
def test_head_starts_mlflow_on_loopback_in_background_and_ray_with_token_auth(name):
    config = load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    check_mlflow_on_loopback(head, workers)
    assert "--artifacts-destination" in head and "--backend-store-uri" in head
    assert "> ~/mlflow/server.log 2>&1 &" in head
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token" in commands and "RAY_AUTH_TOKEN_PATH=" in commands
    assert any("hilbert-auth" in local for local in config["file_mounts"].values())


@pytest.mark.parametrize("mutate", [
    lambda head, workers: (head.replace("--host 127.0.0.1", "--host 0.0.0.0"), workers),
    lambda head, workers: (head.replace("--host 127.0.0.1 ", ""), workers),
    lambda head, workers: (head.replace(f"MLFLOW_TRACKING_URI={HEAD_TRACKING_URI}",
                                        "MLFLOW_TRACKING_URI=$(cat ~/mlflow/tracking_uri)"), workers),
    lambda head, workers: (head, workers.replace("RAY_AUTH_MODE=token",
                                                 "RAY_AUTH_MODE=token MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000")),
], ids=["every-interface", "default-host", "uri-file", "worker-uri"])
def test_mutated_mlflow_bindings_are_rejected(mutate):
    config = load("ray_cluster.yaml")
    head, workers = mutate(" ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"]))
    with pytest.raises(AssertionError):
        check_mlflow_on_loopback(head, workers)


def test_mutated_autoscaler_configs_are_rejected():
    good = load("ray_cluster.yaml")
    unknown_key = copy.deepcopy(good) | {"worker_nodes_typo": {}}
    with pytest.raises(jsonschema.ValidationError):
        check_with_ray(unknown_key)
    bad_head = copy.deepcopy(good)
    bad_head["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        check_with_ray(bad_head)
    too_many_min = copy.deepcopy(good)
    too_many_min["available_node_types"]["gpu_1x"]["min_workers"] = good["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        check_with_ray(too_many_min)
    image_without_container = copy.deepcopy(good)
    image_without_container["docker"]["container_name"] = ""
    with pytest.raises(AssertionError):
        check_with_ray(image_without_container)


def test_mutated_local_provider_config_is_rejected():
    config = load("clusters/local-provider.yaml")
    del config["provider"]["head_ip"]
    with pytest.raises(click.ClickException, match="head_ip"):  # Ray's cli_logger.abort
        check_with_ray(config)


# ---------------------------------------------------------------------------------------------
# KubeRay manifests (no CRD schema offline: the fields KubeRay needs, checked by hand)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def check_image_pinned(image: str) -> None:
    assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"image {image!r} has no tag"
    assert not image.endswith(":latest"), f"image {image!r} is not pinned"


def check_raycluster(cluster: dict) -> None:
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == LOCKED["ray"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert _containers(head["template"])[0]["name"] == "ray-head"
    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 2
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = _containers(group["template"])[0]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert sorted(int(_containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups) == [1, 4]
    for template in [head["template"]] + [g["template"] for g in groups]:
        for container in _containers(template):
            check_image_pinned(container["image"])


def check_rayjob(job: dict) -> None:
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert re.search(r"\bhilbert sweep tune/paper\.yaml\b.*--address auto", spec["entrypoint"])
    assert "clusterSelector" in spec or "rayClusterSpec" in spec
    if "rayClusterSpec" in spec:
        check_raycluster({"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    for container in _containers(spec.get("submitterPodTemplate", {"spec": {"containers": []}})):
        check_image_pinned(container["image"])


def _env_names(container: dict) -> set[str]:
    return {variable["name"] for variable in container.get("env", [])}


def check_mlflow_sidecar(docs: list[dict]) -> None:
    """MLflow runs beside Ray in the head pod on the pod's loopback: the Ray head container points
    at 127.0.0.1:5000, worker pods get no MLflow setting, and no Service exposes port 5000."""
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = _containers(cluster["spec"]["headGroupSpec"]["template"])
    sidecars = [c for c in head if c.get("command", [])[:2] == ["mlflow", "server"]]
    assert len(sidecars) == 1, "the head pod has no MLflow sidecar"
    args = sidecars[0].get("args", [])
    assert "--host" in args and args[args.index("--host") + 1] == "127.0.0.1", f"MLflow is not on loopback: {args}"
    assert "0.0.0.0" not in args
    assert {"name": "MLFLOW_TRACKING_URI", "value": HEAD_TRACKING_URI} in head[0]["env"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        for container in _containers(group["template"]):
            assert "MLFLOW_TRACKING_URI" not in _env_names(container), f"{group['groupName']} talks to MLflow"
    for service in (d for d in docs if d["kind"] == "Service"):
        ports = {p.get(key) for p in service["spec"]["ports"] for key in ("port", "targetPort")}
        assert not ports & {5000, "mlflow"}, f"Service {service['metadata']['name']} exposes MLflow"


def test_kuberay_raycluster_has_head_gpu_groups_pinned_images_and_mlflow_on_loopback():
    docs = load_all("clusters/kuberay-raycluster.yaml")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1
    check_raycluster(clusters[0])
    check_mlflow_sidecar(docs)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    volumes = clusters[0]["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"hilbert-shared", "hilbert-mlflow"} <= claims, "the shared volume or the MLflow database has no PVC"
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "hilbert-mlflow" for v in volumes)
    selector = load("clusters/kuberay-rayjob.yaml")["spec"]["clusterSelector"]
    assert selector == {"ray.io/cluster": clusters[0]["metadata"]["name"]}


def test_kuberay_rayjob_runs_the_paper_sweep_logging_to_the_head_loopback():
    job = load("clusters/kuberay-rayjob.yaml")
    check_rayjob(job)
    assert f"--tracking-uri {HEAD_TRACKING_URI}" in job["spec"]["entrypoint"], "the driver must log to the sidecar"


def _sidecar_args(docs: list[dict]) -> list[str]:
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    return next(c for c in _containers(cluster["spec"]["headGroupSpec"]["template"]) if c["name"] == "mlflow")["args"]


@pytest.mark.parametrize("mutate", [
    lambda docs: _sidecar_args(docs).__setitem__(1, "0.0.0.0"),
    lambda docs: docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hilbert-mlflow"},
                              "spec": {"ports": [{"name": "mlflow", "port": 5000, "targetPort": 5000}]}}),
    lambda docs: _containers(next(d for d in docs if d["kind"] == "RayCluster")["spec"]["workerGroupSpecs"][0]["template"])[0]
    .update(env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://hilbert-mlflow:5000"}]),
], ids=["sidecar-every-interface", "mlflow-service", "worker-uri"])
def test_mutated_mlflow_sidecar_is_rejected(mutate):
    docs = load_all("clusters/kuberay-raycluster.yaml")
    mutate(docs)
    with pytest.raises(AssertionError):
        check_mlflow_sidecar(docs)


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(apiVersion="ray.io/v1alpha1"),
    lambda c: c["spec"]["headGroupSpec"].pop("rayStartParams"),
    lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(image="rayproject/ray:latest"),
    lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas=-1),
    lambda c: c["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
], ids=["api-version", "rayStartParams", "latest-image", "max-replicas", "gpu-limit"])
def test_mutated_raycluster_is_rejected(mutate):
    cluster = next(d for d in load_all("clusters/kuberay-raycluster.yaml") if d["kind"] == "RayCluster")
    mutate(cluster)
    with pytest.raises((AssertionError, KeyError)):
        check_raycluster(cluster)


def test_mutated_rayjob_is_rejected():
    job = load("clusters/kuberay-rayjob.yaml")
    job["spec"]["entrypoint"] = "python train.py"
    with pytest.raises(AssertionError):
        check_rayjob(job)


# ---------------------------------------------------------------------------------------------
# Versions and placeholders, every file


def check_versions(text: str, locked: dict[str, str] = LOCKED, python: str = lockfile.python_version()) -> None:
    """Every version a file names is the lock's: Ray images (and their Python), KubeRay's
    rayVersion, and any `package==version` pin."""
    for version, major, minor in re.findall(r"rayproject/ray:([\d.]+)-py(\d)(\d+)", text):
        assert version == locked["ray"], f"Ray versions: image {version} != the lock's {locked['ray']}"
        assert f"{major}.{minor}" == python, f"image Python {major}.{minor} != the lock's {python}"
    for version in re.findall(r'rayVersion: "([\d.]+)"', text):
        assert version == locked["ray"], f"Ray versions: rayVersion {version} != the lock's {locked['ray']}"
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)(?:\[[\w,]+\])?==([\w.+!-]+)", text):
        name = lockfile.canonicalize_name(name)
        assert locked.get(name) == version, f"{name} pins {version}, the lock {locked.get(name, 'nothing')}"


def pip_installs(name: str, config: dict | None = None) -> list[str]:
    """The pip install commands a file runs (its setup commands, or the Dockerfile's RUN lines)."""
    if name.endswith("Dockerfile"):
        commands = [line for line in (ROOT / name).read_text().splitlines() if line.startswith("RUN ")]
    else:
        config = config or load(name)
        commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                    for c in config.get(key, [])]
    return [command for command in commands if "pip install" in command]


def check_installs_through_the_lock(name: str, config: dict | None = None) -> None:
    """Every pip install is constrained by the lock, which the config copies to each node."""
    installs = pip_installs(name, config)
    assert installs, f"{name} installs nothing"
    for command in installs:
        lock = re.search(r"(?:--constraint|-c) (\S+)/lock\.txt\b", command)
        assert lock, f"{name}: installs without the lock: {command}"
        if not name.endswith("Dockerfile"):  # the image copies the whole repository, lock included
            mounts = (config or load(name))["file_mounts"]
            assert mounts.get(lock.group(1)) == "./requirements", f"{name}: {lock.group(1)} is not the mounted lock folder"


def check_placeholders(text: str) -> None:
    """Only `<EDIT:name>` markers may be left to fill in: no other <...>, TODO, changeme."""
    rest = EDIT_MARKER.sub("", text)
    leftovers = re.findall(r"<[A-Za-z][\w -]*>|\bTODO\b|\bFIXME\b|\bXXX\b|changeme|your-bucket", rest)
    leftovers = [m for m in leftovers if m not in ("<registry>", "<tag>", "<account>", "<name>", "<token>")]
    assert not leftovers, f"un-marked placeholders: {leftovers}"


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_version_named_is_the_locks(name):
    text = (ROOT / name).read_text()
    check_versions(text)
    if name == "clusters/local-provider.yaml":  # no image: a virtualenv of the lock's Python on each machine
        assert f"python{lockfile.python_version()} -m venv" in text
    elif name != "clusters/kuberay-rayjob.yaml":  # the job runs on the cluster's image
        assert f"rayproject/ray:{LOCKED['ray']}-py" in text or f'rayVersion: "{LOCKED["ray"]}"' in text


@pytest.mark.parametrize("name", AUTOSCALER_CONFIGS + ["clusters/Dockerfile"])
def test_every_install_goes_through_the_lock(name):
    check_installs_through_the_lock(name)


@pytest.mark.parametrize("name", ALL_FILES)
def test_no_placeholder_left_but_edit_markers(name):
    check_placeholders((ROOT / name).read_text())


def test_every_edit_marker_is_explained_in_the_readme():
    readme = (ROOT / "clusters/README.md").read_text()
    markers = {m for name in ALL_FILES for m in EDIT_MARKER.findall((ROOT / name).read_text())}
    assert markers and not [m for m in sorted(markers) if m not in readme]


def test_install_commands_pin_the_project_to_a_tag():
    for name in AUTOSCALER_CONFIGS:
        setup = " ".join(load(name)["setup_commands"])
        assert "'hilbert @ git+https://github.com/<EDIT:org>/hilbert@<EDIT:tag>'" in setup


def test_mutated_versions_and_placeholders_are_rejected():
    text = (ROOT / "ray_cluster.yaml").read_text()
    with pytest.raises(AssertionError, match="Ray versions"):
        check_versions(text.replace(f"rayproject/ray:{LOCKED['ray']}", "rayproject/ray:2.49.0"))
    with pytest.raises(AssertionError, match="image Python"):
        check_versions(text.replace("-py311-gpu", "-py312-gpu"))
    with pytest.raises(AssertionError, match="mlflow pins 0.0.1"):
        check_versions(text + '\n# pip install "mlflow==0.0.1"\n')
    with pytest.raises(AssertionError, match="ray pins 2.49.0"):
        check_versions(text + '\n# pip install "ray[default,tune]==2.49.0"\n')
    with pytest.raises(AssertionError, match="Ray versions"):  # the lock moved on, the file stayed behind
        check_versions(text, {**LOCKED, "ray": "2.61.0"})
    with pytest.raises(AssertionError, match="un-marked"):
        check_placeholders(text.replace("<EDIT:bucket>", "<bucket>"))
    with pytest.raises(AssertionError, match="un-marked"):
        check_placeholders(text + "\n# TODO\n")


def test_an_install_around_the_lock_is_rejected():
    around = load("ray_cluster.yaml")
    around["head_setup_commands"] = ['pip install --no-cache-dir "boto3>=1.34"']
    with pytest.raises(AssertionError, match="without the lock"):
        check_installs_through_the_lock("ray_cluster.yaml", around)
    unmounted = load("ray_cluster.yaml")
    del unmounted["file_mounts"]["/home/ray/hilbert-requirements"]
    with pytest.raises(AssertionError, match="not the mounted lock folder"):
        check_installs_through_the_lock("ray_cluster.yaml", unmounted)
