"""The MLflow model registry for hilbert checkpoints: register, resolve, promote by alias.

A registered version is a folder of run artifacts, ``<run>/model/``: the inference half of a
checkpoint (``model.safetensors`` + ``checkpoint.json``, per fold for a fold folder), a
``signature.json`` that says what goes in and comes out, and beside them an MLflow
``python_function`` model written as *models from code* (``MLmodel``, ``pyfunc_model.py``, the
environment files and an input example: :mod:`hilbert.serving.pyfunc`). No pickle: the weights
stay safetensors + JSON, and the same folder opens with ``hilbert.predict.load_predictor``,
``mlflow.pyfunc.load_model("models:/NAME@alias")`` and ``mlflow models serve``.
``MlflowClient.create_model_version(name, source=<run artifact URI>/model, run_id=...)``
registers it; MLflow resolves such a version to that folder. Versions registered before the
flavour existed hold no ``MLmodel``: ``hilbert predict`` still opens them, and
:func:`add_pyfunc_flavour` (``hilbert add-pyfunc``) writes the flavour beside their files.

Stages are deprecated since MLflow 2.9; versions move through aliases instead: a new version
becomes the ``challenger``, and :func:`promote` moves ``champion`` to it only when it scores
better (or when forced), writing the scores and the decision into the version's tags and
description.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from hilbert.tracking.store import NoTrackingStore, mlflow_client, resolve_tracking_uri  # first: telemetry off

import mlflow.artifacts  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from hilbert.serving.pyfunc import write_pyfunc_files  # noqa: E402
from hilbert.tracking.names import to_json  # noqa: E402
from hilbert.train.checkpoint import CheckpointInfo, load_info  # noqa: E402

MODEL_FOLDER = "model"
CHALLENGER, CHAMPION = "challenger", "champion"
INFERENCE_FILES = ("model.safetensors", "checkpoint.json")  # optimizer and resume state stay behind
SIGNATURE_FORMAT = "hilbert-signature/1"
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))/?")


class RegistryError(ValueError):
    """A model URI, alias or folder that does not lead to a hilbert model."""


def registry_client(tracking_uri: str | None) -> tuple[str, MlflowClient]:
    """The store to use: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``
    (:func:`~hilbert.tracking.store.resolve_tracking_uri` without a default folder)."""
    try:
        uri = resolve_tracking_uri(tracking_uri, None)
    except NoTrackingStore as error:
        raise RegistryError(str(error)) from None
    return uri, mlflow_client(uri)


# ---------------------------------------------------------------------------------------------
# Register


def checkpoint_folders(folder: str | Path) -> dict[str, Path]:
    """``{"": folder}`` for one checkpoint, ``{"fold_0": ..., ...}`` for a folder of folds."""
    folder = Path(folder)
    if (folder / "checkpoint.json").is_file():
        found = {"": folder}
    else:
        found = {p.name: p for p in sorted(folder.glob("fold_*")) if (p / "checkpoint.json").is_file()}
    if not found:
        raise RegistryError(f"{folder} holds no hilbert checkpoint (checkpoint.json) nor fold_*/ checkpoints")
    for relative, path in found.items():
        missing = [name for name in INFERENCE_FILES if not (path / name).is_file()]
        if missing:
            raise RegistryError(f"checkpoint {path} lacks {', '.join(missing)}")
    return found


def signature(info: CheckpointInfo, folds: int) -> dict[str, Any]:
    """What the model takes and gives, for people and tools that read the registry."""
    model = info.model
    dims = {"audio": model.audio_dim, "text": model.text_dim}
    embeddings = [*model.modalities, "joint"]
    timing = info.features.get("timing")  # segment timing columns after the encoder's (absent: none)

    def description(modality: str) -> str:
        text = f"one row per segment, features of the frozen {modality} encoder"
        return text + (f", then segment timing columns {', '.join(timing[modality])}" if timing else "")

    return {
        "format": SIGNATURE_FORMAT,
        "inputs": {m: {"dtype": "float32", "shape": ["segments", dims[m]],
                       "encoder": info.features.get(f"{m}_encoder"), "description": description(m)}
                   for m in model.modalities},
        "outputs": {
            "probabilities": {task: {"dtype": "float32", "shape": [len(names)], "classes": list(names)}
                              for task, names in info.label_maps.classes.items()},
            "embeddings": {m: {"dtype": "float32", "shape": [model.d_embed]} for m in embeddings},
        },
        "folds": folds,
        "ensemble": "class probabilities averaged over folds; embeddings from the best fold" if folds > 1 else None,
        "load_with": "hilbert.predict.load_predictor(<downloaded folder>), or mlflow.pyfunc.load_model(<model URI>)",
    }


def stage_model(checkpoint_dir: str | Path, destination: Path, *, pyfunc: bool = True) -> dict[str, Any]:
    """Copy the inference files of a checkpoint (or folds), write ``signature.json`` and (with
    ``pyfunc``) the MLflow ``python_function`` flavour beside them."""
    folders = checkpoint_folders(checkpoint_dir)
    for relative, source in folders.items():
        target = destination / relative
        target.mkdir(parents=True, exist_ok=True)
        for name in INFERENCE_FILES:
            shutil.copy2(source / name, target / name)
    info = load_info(next(iter(folders.values())))
    described = signature(info, len(folders))
    (destination / "signature.json").write_text(to_json(described, indent=1) + "\n", encoding="utf-8")
    if pyfunc:
        write_pyfunc_files(destination, info, len(folders))
    return described


def log_model(run_id: str, checkpoint_dir: str | Path, *, tracking_uri: str | None = None,
              client: MlflowClient | None = None) -> dict[str, Any]:
    """Log a checkpoint (or fold folder) as ``model/`` of run ``run_id`` (inference files and
    ``signature.json``) in the store of ``tracking_uri``, or through ``client``; returns the
    signature."""
    if client is None:
        _, client = registry_client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="hilbert-register-") as staging:
        described = stage_model(checkpoint_dir, Path(staging))
        _refuse_stale_files(client, run_id, Path(staging))
        client.log_artifacts(run_id, staging, MODEL_FOLDER)
    return described


def register_logged_model(run_id: str, model_name: str, alias: str | None = CHALLENGER, description: str | None = None,
                          *, tracking_uri: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Register the ``model/`` that run ``run_id`` logged as a new version of ``model_name``
    (created if missing) and point ``alias`` at it; returns the version."""
    store, client = registry_client(tracking_uri)
    if not _artifact_files(client, run_id, MODEL_FOLDER):
        raise RegistryError(f"run {run_id} has no {MODEL_FOLDER}/ artifact to register")
    with tempfile.TemporaryDirectory(prefix="hilbert-register-") as folder:
        signature_file = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{client.get_run(run_id).info.artifact_uri}/{MODEL_FOLDER}/signature.json", dst_path=folder,
            tracking_uri=store)
        described = json.loads(Path(signature_file).read_text(encoding="utf-8"))
    _ensure_registered_model(client, model_name)
    version = client.create_model_version(
        model_name, source=f"{client.get_run(run_id).info.artifact_uri}/{MODEL_FOLDER}", run_id=run_id,
        description=description or f"hilbert model of run {run_id}: {described['folds']} fold model(s), tasks "
                                   f"{', '.join(described['outputs']['probabilities'])}",
        tags={"format": SIGNATURE_FORMAT, "folds": str(described["folds"]), **(tags or {})})
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return str(version.version)


def register_checkpoint(run_id: str, checkpoint_dir: str | Path, model_name: str, alias: str | None = CHALLENGER,
                        description: str | None = None, *, tracking_uri: str | None = None) -> str:
    """Log a checkpoint (or fold folder) as ``model/`` of run ``run_id``, register it as a new
    version of ``model_name`` (created if missing), point ``alias`` at it; returns the version."""
    log_model(run_id, checkpoint_dir, tracking_uri=tracking_uri)
    return register_logged_model(run_id, model_name, alias, description, tracking_uri=tracking_uri)


def add_pyfunc_flavour(uri: str, *, tracking_uri: str | None = None) -> list[str]:
    """Make a version registered before the pyfunc flavour existed (``models:/NAME/<version>``
    or ``models:/NAME@alias``) loadable by ``mlflow.pyfunc.load_model`` and ``mlflow models
    serve``: write the flavour's files beside its checkpoints in the run's ``model/`` folder
    that the version's source names (the checkpoints are not touched). Returns the files added;
    none when the version has the flavour already."""
    store, client = registry_client(tracking_uri)
    name, version = model_version(client, uri)
    found = client.get_model_version(name, version)
    run_folder = f"{client.get_run(found.run_id).info.artifact_uri}/{MODEL_FOLDER}" if found.run_id else None
    if found.source.rstrip("/") != run_folder:
        raise RegistryError(f"{uri}: version {version} of {name!r} does not come from a run's {MODEL_FOLDER}/ folder "
                            f"(source {found.source}): register its checkpoint again with register_checkpoint")
    with tempfile.TemporaryDirectory(prefix="hilbert-pyfunc-") as folder:
        downloaded = resolve_model(f"models:/{name}/{version}", Path(folder) / "model", tracking_uri=store)
        if (downloaded / "MLmodel").is_file():
            return []
        folders = checkpoint_folders(downloaded)
        written = write_pyfunc_files(downloaded, load_info(next(iter(folders.values()))), len(folders))
        for file_name in written:  # only what is new: the checkpoints the version was registered with stay
            client.log_artifact(found.run_id, str(downloaded / file_name), MODEL_FOLDER)
    client.set_model_version_tag(name, version, "pyfunc", "added")
    return written


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="hilbert document models (safetensors + JSON)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _refuse_stale_files(client: MlflowClient, run_id: str, staged: Path) -> None:
    """Refuse to mix checkpoints: files a run's ``model/`` already holds that the new checkpoint
    would not overwrite (a fold_4 of an earlier 5-fold model) would silently join the ensemble."""
    new = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    stale = sorted(set(_artifact_files(client, run_id, MODEL_FOLDER)) - new)
    if stale:
        raise RegistryError(f"run {run_id} already holds a different {MODEL_FOLDER}/ ({', '.join(stale[:3])}, ...): "
                            "register this checkpoint from a new run")


def _artifact_files(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    files = []
    for entry in client.list_artifacts(run_id, folder):
        if entry.is_dir:
            files += _artifact_files(client, run_id, entry.path)
        else:
            files.append(entry.path[len(MODEL_FOLDER) + 1:])
    return files


# ---------------------------------------------------------------------------------------------
# Resolve


def resolve_model(uri: str | Path, destination: str | Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """A local folder that ``hilbert.predict.load_predictor`` opens, from ``models:/NAME@alias``,
    ``models:/NAME/<version>`` (or ``/latest``), ``runs:/<run_id>/model``, another artifact URI
    (``s3://...``, ``file://...``) or a local folder.

    Remote models are downloaded into ``destination`` (default: a new temporary folder, which
    the caller owns); a local folder is returned as it is.
    """
    text = str(uri)
    if "://" not in text and not text.startswith(("models:", "runs:")):
        checkpoint_folders(text)  # a clear error here rather than in the loader
        return Path(text)
    store, source = tracking_uri, text
    if text.startswith(("models:", "runs:")):
        store, client = registry_client(tracking_uri)
        if text.startswith("models:"):
            source = _model_version_source(client, text)
    destination = Path(destination) if destination else Path(tempfile.mkdtemp(prefix="hilbert-model-"))
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination),
                                                              tracking_uri=store))
    except (MlflowException, OSError) as error:
        raise RegistryError(f"cannot download {text} ({source}): {error}") from error
    checkpoint_folders(downloaded)
    return downloaded


def _model_version_source(client: MlflowClient, uri: str) -> str:
    """Where a version's files are. Resolved here, not by MLflow's ``models:/`` artifact
    repository, which looks the name up in the process-global registry URI instead of ours."""
    return client.get_model_version_download_uri(*model_version(client, uri))


def model_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/NAME@alias``, ``models:/NAME/<version>`` or ``models:/NAME/latest``."""
    match = _MODELS_URI.fullmatch(uri)
    if not match:
        raise RegistryError(f"{uri!r}: expected models:/NAME@alias, models:/NAME/<version> or models:/NAME/latest")
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        raise RegistryError(f"{uri}: no registered model named {name!r}") from error
    if alias:
        if alias not in registered.aliases:
            raise RegistryError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: "
                                f"{', '.join(sorted(registered.aliases)) or 'none'})")
        return name, str(registered.aliases[alias])
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RegistryError(f"{uri}: model {name!r} has no versions")
        return name, str(max(int(v.version) for v in versions))
    try:
        client.get_model_version(name, version)
    except MlflowException as error:
        raise RegistryError(f"{uri}: model {name!r} has no version {version}") from error
    return name, version


# ---------------------------------------------------------------------------------------------
# Promote


@dataclass
class PromotionDecision:
    model_name: str
    challenger_version: str
    challenger_score: float | None
    champion_version: str | None  # before the decision; None: there was no champion
    champion_score: float | None
    promoted: bool
    forced: bool
    reason: str
    decided_at: str  # ISO 8601, UTC


def promote(model_name: str, evaluate: Callable[[Path], float], force: bool = False, *,
            tracking_uri: str | None = None, challenger: str = CHALLENGER, champion: str = CHAMPION,
            metric: str | None = None) -> PromotionDecision:
    """Score the ``challenger`` and the ``champion`` version with ``evaluate`` (a local model
    folder -> a score, higher is better) and move ``champion`` to the challenger when it scores
    higher, when there is no champion (or the champion cannot be scored: NaN), or when ``force``.
    The decision and both scores go into the challenger's tags and description; ``metric`` says
    what the score is (e.g. "mean macro AUC on held_out.jsonl"), recorded beside it."""
    store, client = registry_client(tracking_uri)
    aliases = _aliases(client, model_name)
    if challenger not in aliases:
        raise RegistryError(f"model {model_name!r} has no {challenger!r} alias to promote "
                            f"(aliases: {', '.join(sorted(aliases)) or 'none'})")
    new, old = aliases[challenger], aliases.get(champion)
    decided_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if new == old:
        return PromotionDecision(model_name, new, None, old, None, False, False,
                                 f"version {new} is already the {champion}", decided_at)
    new_score = _score(store, model_name, new, evaluate)
    old_score = _score(store, model_name, old, evaluate) if old else None
    better, why = _compare(new_score, old_score)
    decision = PromotionDecision(model_name, new, new_score, old, old_score, better or force, force and not better,
                                 why if better or not force else f"forced: {why}", decided_at)
    if decision.promoted:
        client.set_registered_model_alias(model_name, champion, new)
    _record(client, decision, champion)
    if metric:
        client.set_model_version_tag(model_name, new, "promotion.metric", metric)
    return decision


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    try:
        return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    except MlflowException as error:
        raise RegistryError(f"no registered model named {name!r}") from error


def _score(store: str, name: str, version: str, evaluate: Callable[[Path], float]) -> float:
    with tempfile.TemporaryDirectory(prefix="hilbert-promote-") as folder:
        return float(evaluate(resolve_model(f"models:/{name}/{version}", folder, tracking_uri=store)))


def _compare(new: float, old: float | None) -> tuple[bool, str]:
    if old is None:
        return True, f"no champion yet; challenger scores {new:.4f}"
    if math.isnan(new):
        return False, f"challenger cannot be scored (NaN); champion scores {old:.4f}"
    if math.isnan(old):
        return True, f"champion cannot be scored (NaN); challenger scores {new:.4f}"
    if new > old:
        return True, f"challenger scores higher: {new:.4f} > {old:.4f}"
    return False, f"champion kept: challenger {new:.4f} <= champion {old:.4f}"


def _record(client: MlflowClient, decision: PromotionDecision, champion: str) -> None:
    """Scores and decision in the challenger's tags and description (and on the replaced champion)."""
    name, new = decision.model_name, decision.challenger_version
    verdict = "promoted (forced)" if decision.forced else "promoted" if decision.promoted else "not promoted"
    tags = {"promotion.decision": verdict, "promotion.date": decision.decided_at,
            "promotion.challenger_score": repr(decision.challenger_score),
            "promotion.champion_version": decision.champion_version or "none",
            "promotion.champion_score": repr(decision.champion_score), "promotion.reason": decision.reason}
    for key, value in tags.items():
        client.set_model_version_tag(name, new, key, value)
    line = f"{decision.decided_at}: {verdict} to {champion}: {decision.reason}"
    _append_description(client, name, new, line)
    if decision.promoted and decision.champion_version:
        client.set_model_version_tag(name, decision.champion_version, "promotion.replaced_by", new)
        _append_description(client, name, decision.champion_version,
                            f"{decision.decided_at}: replaced as {champion} by version {new}: {decision.reason}")


def _append_description(client: MlflowClient, name: str, version: str, line: str) -> None:
    current = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{current}\n\n{line}".strip())
