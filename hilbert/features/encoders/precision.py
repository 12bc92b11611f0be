"""How frozen models run on a device: float16 autocast on CUDA, plain float32 elsewhere.

Fingerprints leave the device out on purpose: GPU and CPU outputs agree to float16 rounding,
and the features a GPU cluster extracts must be found again by a CPU-only training machine (and
by the driver that plans extraction before any GPU actor exists).
"""

from __future__ import annotations

import contextlib

import torch


def precision_on(device: str) -> str:
    """The arithmetic the Hugging Face encoders use on ``device``, for logs and reports."""
    return "float16-autocast" if device.startswith("cuda") else "float32"


def autocast_on(device: str) -> contextlib.AbstractContextManager:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
