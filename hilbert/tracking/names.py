"""Names and values MLflow accepts: sanitised keys, finite metrics, JSON of configs, params as
dotted keys.

MLflow refuses ``@``, ``(``, ``//`` ... in keys; NaN and infinite values it stores, but its charts
break on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hilbert.config import dotted_keys

# MLflow's limit (mlflow.utils.validation): keys up to 250 characters.
_MAX_KEY = 250
# The portable subset of what MLflow accepts in a key (it also allows ':' except on Windows).
_BAD_KEY_CHARACTERS = re.compile(r"[^\w.\- /]")


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric/param key: ``@`` reads ``_at_``, other refused characters
    become ``_``, and path tricks (``//``, ``..``, a leading ``/``) are removed."""
    name = _BAD_KEY_CHARACTERS.sub("_", str(name).replace("@", "_at_"))
    parts = [part for part in name.split("/") if part not in ("", ".", "..")]
    return "/".join(parts)[:_MAX_KEY] or "_"


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The real-valued, finite entries of ``metrics`` under sanitised keys (bools, strings, NaN
    and infinities are dropped)."""
    kept = {}
    for name, value in metrics.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        if math.isfinite(float(value)):
            kept[metric_key(name)] = float(value)
    return kept


def to_json(value: Any, **dumps) -> str:
    """JSON for configs that may hold dataclasses, paths, tuples or numpy scalars."""
    return json.dumps(value, default=_json_default, **dumps)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested mappings become dotted keys; lists and other values become compact JSON strings."""
    return {metric_key(name): value if isinstance(value, str) else to_json(value, separators=(",", ":"))
            for name, value in dotted_keys(params).items()}
