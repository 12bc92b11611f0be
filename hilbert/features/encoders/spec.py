"""Encoder spec strings: ``kind[:name][?option=value&...]``, parsed, validated and made canonical.

A spec names a frozen encoder the way a user writes it in a config file, for example ``logmel``,
``hashngram?dim=1024`` or ``hf:facebook/wav2vec2-base?layer=6``. Parsing only checks the shape of
the string; which options a kind accepts, and what their values mean, is up to its encoder, which
reads them with :func:`read_options` so that every mistake gets the same kind of message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

_KIND = re.compile(r"[a-z][a-z0-9_-]*")


class EncoderSpecError(ValueError):
    """A spec string that does not name a usable encoder: the message says which part and why."""


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec. ``str(spec)`` is its canonical form: options sorted by name."""

    kind: str
    name: str = ""
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.kind}:{self.name}" if self.name else self.kind
        if self.options:
            text += "?" + "&".join(f"{key}={self.options[key]}" for key in sorted(self.options))
        return text


def parse_encoder_spec(spec: str) -> EncoderSpec:
    """Split ``spec`` into kind, name and options; raise :class:`EncoderSpecError` if malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderSpecError(f"encoder spec must be a non-empty string like 'logmel' or 'hf:<model>', got {spec!r}")
    head, has_query, query = spec.strip().partition("?")
    kind, _, name = head.partition(":")
    if not _KIND.fullmatch(kind):
        raise EncoderSpecError(
            f"encoder spec {spec!r}: kind {kind!r} must be lower-case letters, digits, '-' or '_' "
            "(for example 'logmel', 'hashngram', 'hf:<model id or folder>')"
        )
    if ":" in head and not name:
        raise EncoderSpecError(f"encoder spec {spec!r}: nothing after '{kind}:'; give a model id or folder")
    options = _parse_options(spec, query) if has_query else {}
    return EncoderSpec(kind, name, options)


def _parse_options(spec: str, query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in query.split("&"):
        key, has_value, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not key or not has_value or not value:
            raise EncoderSpecError(f"encoder spec {spec!r}: option {pair!r} must read 'name=value'")
        if key in options:
            raise EncoderSpecError(f"encoder spec {spec!r}: option {key!r} is given twice")
        options[key] = value
    return options


@dataclass(frozen=True)
class Option:
    """One ``?name=value`` option an encoder accepts.

    ``read`` turns the text into a value and raises ``ValueError("expected ...")`` when it cannot;
    ``default`` is the value when the option is absent.
    """

    read: Callable[[str], Any]
    default: Any = None


def read_options(spec: EncoderSpec, accepted: Mapping[str, Option]) -> dict[str, Any]:
    """Every option of ``accepted``, read from ``spec`` or defaulted; unknown or bad ones raise."""
    unknown = sorted(set(spec.options) - set(accepted))
    if "layer" in unknown:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: kind {spec.kind!r} has no layers to choose from (it is not a transformer: "
            "its features are computed directly), so it takes no 'layer' option; 'layer' (an index, last, avg, all) "
            "is for hf: encoders"
        )
    if unknown:
        valid = ", ".join(sorted(accepted)) if accepted else "none"
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: unknown option {unknown[0]!r} for kind {spec.kind!r}; valid options: {valid}"
        )
    values = {}
    for key, option in accepted.items():
        if key not in spec.options:
            values[key] = option.default
            continue
        try:
            values[key] = option.read(spec.options[key])
        except ValueError as error:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: option {key}={spec.options[key]!r} is invalid: {error}"
            ) from None
    return values


def reject_name(spec: EncoderSpec) -> None:
    """For kinds that are fully described by their options (``logmel``, ``hashngram``)."""
    if spec.name:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: kind {spec.kind!r} takes no name after ':'; "
            f"write '{spec.kind}' or '{spec.kind}?option=value'"
        )


# Option readers. Each raises ValueError("expected ...") so read_options can say what was wanted.

def integer_between(low: int, high: int) -> Callable[[str], int]:
    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return read


def positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if value < 1:
        raise ValueError("expected a positive integer")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a positive number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a positive number of seconds")
    return value


def layer_choice(text: str) -> int | str:
    """``last`` (the model's final output), ``avg`` (mean over all hidden states), ``all`` (every
    hidden state, side by side, for a model that learns to weight them) or an index."""
    if text in ("last", "avg", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError("expected 'last', 'avg', 'all' or an index into the hidden states "
                         "(negative allowed)") from None


def plain_text(text: str) -> str:
    return text
