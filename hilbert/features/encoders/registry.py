"""The registry: spec kind -> factory, for audio and text encoders separately.

A factory is called as ``factory(spec: EncoderSpec, device: str)`` and returns an encoder. The
decorators accept either such a function or an encoder class with a ``from_spec`` classmethod
of that signature, so users add their own encoders the same way the built-in ones are added::

    @register_audio_encoder("myfeatures")
    class MyFeatures(AudioEncoder):
        @classmethod
        def from_spec(cls, spec, device): ...

A kind whose encoder is expensive to build can also register ``fingerprint=``, a function of the
spec that returns the same fingerprint without loading weights; :func:`encoder_fingerprint`
uses it, and otherwise builds the encoder on the CPU and asks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

from hilbert.features.encoders.base import AudioEncoder, TextEncoder, resolve_device
from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError, parse_encoder_spec

Factory = Callable[[EncoderSpec, str], object]
FingerprintFunction = Callable[[EncoderSpec], dict]
T = TypeVar("T")


@dataclass(frozen=True)
class _Registration:
    factory: Factory
    fingerprint: FingerprintFunction | None


_REGISTRATIONS: dict[str, dict[str, _Registration]] = {"audio": {}, "text": {}}


def register_audio_encoder(kind: str, *, fingerprint: FingerprintFunction | None = None) -> Callable[[T], T]:
    """Decorator: make ``kind`` (as in ``kind:name?options``) build audio encoders with the target."""
    return _registrar("audio", kind, fingerprint)


def register_text_encoder(kind: str, *, fingerprint: FingerprintFunction | None = None) -> Callable[[T], T]:
    """Decorator: make ``kind`` build text encoders with the target."""
    return _registrar("text", kind, fingerprint)


def _registrar(modality: str, kind: str, fingerprint: FingerprintFunction | None) -> Callable[[T], T]:
    registrations = _REGISTRATIONS[modality]

    def register(target: T) -> T:
        factory = target.from_spec if isinstance(target, type) else target
        existing = registrations.get(kind)
        # Re-importing a module (notebook reloads) registers the same factory again; that is fine.
        if existing is not None and _qualified_name(existing.factory) != _qualified_name(factory):
            raise ValueError(f"{modality} encoder kind {kind!r} is already registered by "
                             f"{_qualified_name(existing.factory)}")
        registrations[kind] = _Registration(factory, fingerprint)
        return target

    return register


def _qualified_name(factory: Factory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def build_audio_encoder(spec: str, device: str | None = None) -> AudioEncoder:
    """The audio encoder ``spec`` names, on ``device`` (default: cuda if available, else cpu)."""
    parsed, registration = _lookup("audio", spec)
    encoder = registration.factory(parsed, resolve_device(device))
    assert isinstance(encoder, AudioEncoder), f"factory for {spec!r} returned {type(encoder).__name__}"
    return encoder


def build_text_encoder(spec: str, device: str | None = None) -> TextEncoder:
    """The text encoder ``spec`` names, on ``device`` (default: cuda if available, else cpu)."""
    parsed, registration = _lookup("text", spec)
    encoder = registration.factory(parsed, resolve_device(device))
    assert isinstance(encoder, TextEncoder), f"factory for {spec!r} returned {type(encoder).__name__}"
    return encoder


def encoder_fingerprint(modality: Literal["audio", "text"], spec: str) -> dict:
    """What ``build_<modality>_encoder(spec).fingerprint()`` returns, on any device, without
    loading weights where the kind registered a way to avoid it (``hf:`` does)."""
    parsed, registration = _lookup(modality, spec)
    if registration.fingerprint is not None:
        return registration.fingerprint(parsed)
    return registration.factory(parsed, "cpu").fingerprint()


def _lookup(modality: str, spec: str) -> tuple[EncoderSpec, _Registration]:
    if modality not in _REGISTRATIONS:
        raise ValueError(f"modality must be 'audio' or 'text', got {modality!r}")
    parsed = parse_encoder_spec(spec)
    registrations = _REGISTRATIONS[modality]
    if parsed.kind not in registrations:
        other = "text" if modality == "audio" else "audio"
        hint = f"{parsed.kind!r} is a {other} encoder; " if parsed.kind in _REGISTRATIONS[other] else ""
        raise EncoderSpecError(
            f"encoder spec {spec!r}: {hint}{modality} encoder kinds are {', '.join(sorted(registrations))}"
        )
    return parsed, registrations[parsed.kind]
