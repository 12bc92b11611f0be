"""How frozen models run on a device: ``precision=auto`` (the default) is float16 autocast on
CUDA and plain float32 elsewhere; ``float32``, ``float16`` (CUDA only) and ``bfloat16`` ask
for one.

Fingerprints leave the precision and the device out on purpose: the floating-point kinds agree
to their rounding (bfloat16, the coarsest, to about three significant digits), and the features
a GPU cluster extracts must be found again by a CPU-only training machine (and by the driver
that plans extraction before any GPU actor exists).
"""

from __future__ import annotations

import contextlib

import torch

from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError

PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def precision_choice(text: str) -> str:
    if text not in PRECISIONS:
        raise ValueError(f"expected one of {', '.join(PRECISIONS)}")
    return text


def resolve_precision(precision: str, device: str) -> str:
    """The arithmetic ``precision`` means on ``device``; float16 on a CPU is refused (CPU kernels
    for it are slow or missing), so a spec written for a GPU cluster says so where it cannot run."""
    if precision == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if precision == "float16" and not device.startswith("cuda"):
        raise ValueError(f"precision=float16 needs a CUDA device, not {device!r}: use bfloat16 or float32 there")
    return precision


def checked_precision(spec: EncoderSpec, precision: str, device: str) -> str:
    """``precision`` as given (``auto`` stays ``auto``), refused with the spec named where
    ``device`` cannot run it."""
    try:
        resolve_precision(precision, device)
    except ValueError as error:
        raise EncoderSpecError(f"encoder spec {str(spec)!r}: {error}") from None
    return precision


def autocast_on(device: str, precision: str = "auto") -> contextlib.AbstractContextManager:
    resolved = resolve_precision(precision, device)
    if resolved == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, resolved))
