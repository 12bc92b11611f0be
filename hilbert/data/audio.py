"""Audio decoding, downmixing, resampling and segment slicing.

Decoding goes through libsndfile (``soundfile``) because it reads WAV, FLAC, OGG and friends
without FFmpeg; resampling goes through ``torchaudio.functional.resample`` (band-limited sinc).
Every function works on float32 numpy arrays so callers never see a format-specific dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import soundfile


class AudioError(ValueError):
    """An audio file that is missing, cannot be decoded, or holds no samples."""


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says, without decoding the samples."""

    path: Path
    sample_rate: int
    frames: int
    channels: int
    format: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def audio_info(path: str | Path) -> AudioInfo:
    """Read the header of ``path``; raise :class:`AudioError` if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        info = soundfile.info(str(path))
    except Exception as error:  # libsndfile raises several types (RuntimeError, LibsndfileError)
        raise AudioError(f"audio file cannot be decoded: {path} ({error})") from error
    return AudioInfo(path, int(info.samplerate), int(info.frames), int(info.channels), str(info.format))


def load_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode ``path`` to a mono float32 waveform in [-1, 1] and its sample rate.

    Multi-channel audio is downmixed by averaging channels: it keeps the level of a centred
    voice and is what speech encoders were trained on.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:
        raise AudioError(f"audio file cannot be decoded: {path} ({error})") from error
    if samples.shape[0] == 0:
        raise AudioError(f"audio file holds no samples: {path}")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(sample_rate)


@lru_cache(maxsize=32)
def _resampler_kernel_key(orig: int, new: int) -> tuple[int, int]:
    # Reduce the ratio once; torchaudio works with the gcd-reduced rates internally too.
    divisor = gcd(orig, new)
    return orig // divisor, new // divisor


def resample(waveform: np.ndarray, orig_sample_rate: int, new_sample_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D float32 waveform (identity when the rates agree)."""
    if orig_sample_rate == new_sample_rate:
        return waveform
    # torch only where a file needs resampling: validating a manifest (every CLI command's
    # first step) reads audio headers only, and importing torch takes seconds.
    import torch
    import torchaudio.functional as AF

    orig, new = _resampler_kernel_key(orig_sample_rate, new_sample_rate)
    tensor = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    return AF.resample(tensor, orig, new).numpy()


def load_for_encoder(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode, downmix and resample ``path`` to ``sample_rate``: what a speech encoder needs."""
    mono, native_rate = load_mono(path)
    return resample(mono, native_rate, sample_rate)


def slice_seconds(waveform: np.ndarray, sample_rate: int, start: float, end: float) -> np.ndarray:
    """The samples of ``waveform`` between ``start`` and ``end`` seconds, clipped to the signal."""
    first = max(0, int(round(start * sample_rate)))
    last = min(len(waveform), int(round(end * sample_rate)))
    return waveform[first:max(first, last)]
