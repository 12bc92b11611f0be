"""Provenance of a sweep: which code (git commit), libraries and user produced it, in MLflow's
own tags where it has them (its UI shows user, source and commit)."""

from __future__ import annotations

import getpass
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any, Mapping

from hilbert.tracking.names import metric_key, to_json

PACKAGES = ("hilbert", "torch", "ray", "mlflow", "optuna")


def git_commit(folder: str | Path) -> tuple[str, bool] | None:
    """(commit, has uncommitted changes) of the git checkout holding ``folder``; None outside one."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def source_tags() -> dict[str, str]:
    """Who ran it and from which code: MLflow's own tags, which its UI shows (user, source, commit)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": "hilbert sweep", "mlflow.source.type": "LOCAL"}
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        sha, dirty = commit
        tags["mlflow.source.git.commit"] = sha
        tags["git_dirty"] = str(dirty).lower()
    return tags


def provenance_tags(manifest_fingerprint: str | None, encoders: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags that say which code, libraries, corpus and cached features a sweep used."""
    tags = {f"version/{name}": version for name, version in package_versions().items()}
    tags.update(source_tags())
    if manifest_fingerprint:
        tags["manifest_fingerprint"] = manifest_fingerprint
    for modality, key in (encoders or {}).items():
        tags[f"encoder/{metric_key(modality)}"] = key if isinstance(key, str) else to_json(key, sort_keys=True)[:5000]
    return tags
