"""The configs `hilbert demo` runs, shipped inside the package so the demo works from any folder.

``demo.yaml`` (the sweep) and ``train-demo.yaml`` (its base training config) are the files users
edit as ``tune/demo.yaml`` and ``tune/train-demo.yaml``: those are links to these, so there is one
copy of each. Their paths (``hilbert-demo/...``) are relative to the folder a command runs in.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_SWEEP = "demo.yaml"


def packaged(name: str) -> Path:
    """The path of config ``name`` of this package (installed as plain files, editable or not)."""
    path = resources.files(__name__) / name
    if not path.is_file():
        raise FileNotFoundError(f"hilbert ships no config {name!r}")
    return Path(str(path))
