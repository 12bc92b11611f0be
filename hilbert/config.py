"""Typed configuration: dataclasses in, YAML out and back, with errors that name the field.

Every config in hilbert is a plain ``@dataclass`` (see :class:`FeatureConfig` below and the
model, training and sweep configs in their own modules). :func:`from_dict` builds one from
parsed YAML, checking every key and type against the annotations, so a typo such as
``lamda_cka`` fails before a cluster spins up, with the path to the field and a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is unknown, missing, of the wrong type or out of range."""


@dataclasses.dataclass
class FeatureConfig:
    """Which frozen encoders turn segments into features, and where the features are cached."""

    audio_encoder: str = "logmel"
    text_encoder: str = "hashngram"
    cache_dir: str = "cache"


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating keys and types recursively."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of fields, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_join(where, key)}: unknown field{hint}; valid fields: {', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], _join(where, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required field is missing")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError) and str(error).startswith(label):
            raise
        raise ConfigError(f"{label}: {error}") from error


def to_dict(config: Any) -> Any:
    """The plain-data (YAML/JSON-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(value) for value in config]
    if isinstance(config, Path):
        return str(config)
    return config


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read ``path`` and build ``cls`` from it; errors are prefixed with the file name."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def dotted_keys(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted paths: ``{"loss": {"tau": 0.1}}`` -> ``{"loss.tau": 0.1}`` (the
    way sweeps name config fields); an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping) and value:
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _join(where: str, name: Any) -> str:
    return f"{where}.{name}" if where else str(name)


# Not pydantic's TypeAdapter: it reads dicts into stdlib dataclasses only leniently ("5" as int) or via JSON.
def _coerce(annotation: Any, value: Any, where: str) -> Any:
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = get_args(annotation) or (Any,)
        items = [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(annotation) or (Any, Any)
        return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{where}: cannot read {value!r} as {getattr(annotation, '__name__', annotation)}")

