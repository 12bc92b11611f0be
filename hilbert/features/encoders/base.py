"""What every frozen encoder promises: one float32 vector per segment, and a fingerprint.

The fingerprint is what the feature cache keys on, so it must change whenever an encoder's
outputs could change (weights, layer, chunking, sample rate, our own code's version) and stay
put otherwise: options that only affect speed, such as ``batch_size``, are left out of it, and
so is the device (GPU float16 and CPU float32 vectors agree to float16 rounding, and features
extracted on a GPU cluster must be found again on a CPU machine).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class AudioEncoder(ABC):
    """Maps mono waveforms at ``sample_rate`` to vectors of size ``dim``."""

    spec: str  # canonical registry string it was built from
    sample_rate: int
    dim: int

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-serialisable identity of everything that determines the outputs, the same on every device."""

    @abstractmethod
    def encode(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """Float32 ``[len(waveforms), dim]``, one vector per mono float32 waveform."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, dim={self.dim}, sample_rate={self.sample_rate})"


class TextEncoder(ABC):
    """Maps strings to vectors of size ``dim``."""

    spec: str
    dim: int

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-serialisable identity of everything that determines the outputs, the same on every device."""

    @abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Float32 ``[len(texts), dim]``, one vector per text."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, dim={self.dim})"


def resolve_device(device: str | None) -> str:
    """``None`` means the GPU when there is one."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def as_mono_waveform(waveform: np.ndarray, index: int) -> np.ndarray:
    """``waveform`` as a contiguous 1-D float32 array; a clear error for stereo or non-finite input."""
    array = np.asarray(waveform, dtype=np.float32)
    if array.ndim != 1:
        raise ValueError(
            f"waveform {index} has shape {array.shape}; encoders take mono 1-D waveforms "
            "(hilbert.data.audio.load_mono downmixes)"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"waveform {index} holds NaN or infinite samples")
    return np.ascontiguousarray(array)


def as_text(text: str, index: int) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text {index} is {type(text).__name__}, expected str (use '' for a segment without text)")
    return text
