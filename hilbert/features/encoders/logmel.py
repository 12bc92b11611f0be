"""``logmel``: log-mel statistics plus prosody, a weight-free audio baseline that runs anywhere.

Per segment (16 kHz mono), the vector is, in this order:

- the mean and the standard deviation over 25 ms frames (10 ms hop) of each log-mel band
  (natural log of power, floored at 1e-6 so silence stays finite): ``2 * n_mels`` values;
- pitch: the fraction of voiced frames, and the mean, standard deviation and 5-95 % range of F0
  over voiced frames, in octaves relative to 100 Hz (all 0 when nothing is voiced). F0 comes from
  a normalised cross-correlation (NCCF) per frame over 60-400 Hz; a frame is voiced when its
  NCCF peak is a true local maximum above 0.55 and its level is within 35 dB of the segment's
  loudest frame and above -55 dBFS;
- energy: mean, standard deviation and 5-95 % range of frame RMS level, in bels (dBFS / 10);
- zero-crossing rate: mean and standard deviation over frames (crossings per sample);
- speaking-rate proxies: energy-envelope peaks per second (syllable nuclei, roughly: peaks at
  least 100 ms apart that rise 3 dB above the dips on both sides) and the mean and standard
  deviation of spectral flux (mean positive change of the log-mel bands between frames).

The units differ from feature to feature (nats, octaves, bels, per second), so downstream models
should standardise the vector. Segments shorter than the pitch analysis frame (about 42 ms,
including empty ones) are zero-padded to it, and every value is finite on any finite input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchaudio
from numpy.lib.stride_tricks import sliding_window_view

from hilbert.features.encoders.base import AudioEncoder, as_mono_waveform
from hilbert.features.encoders.registry import register_audio_encoder
from hilbert.features.encoders.spec import EncoderSpec, Option, integer_between, read_options, reject_name

SAMPLE_RATE = 16_000
FRAME = 400  # 25 ms analysis window
HOP = 160  # 10 ms
PITCH_MIN_HZ, PITCH_MAX_HZ = 60.0, 400.0
SHORTEST_LAG = int(SAMPLE_RATE / PITCH_MAX_HZ)  # 40 samples
LONGEST_LAG = int(np.ceil(SAMPLE_RATE / PITCH_MIN_HZ))  # 267 samples
PITCH_FRAME = FRAME + LONGEST_LAG + 1  # a window plus every lag we compare it with
PITCH_FFT = 768  # > PITCH_FRAME, a fast size (2**8 * 3)
VOICING_THRESHOLD = 0.55
LEVEL_FLOOR_DB = -55.0
MEL_FLOOR = 1e-6

PROSODY_FEATURES = (
    "voiced_fraction", "f0_mean_octaves", "f0_std_octaves", "f0_range_octaves",
    "energy_mean_bels", "energy_std_bels", "energy_range_bels",
    "zero_crossing_rate_mean", "zero_crossing_rate_std",
    "energy_peaks_per_second", "spectral_flux_mean", "spectral_flux_std",
)


@register_audio_encoder("logmel")
class LogMelProsodyEncoder(AudioEncoder):
    """Log-mel band statistics and prosodic statistics; deterministic, CPU only, no weights."""

    CODE_VERSION = 1
    OPTIONS = {"n_mels": Option(integer_between(8, 128), 64)}

    def __init__(self, n_mels: int = 64, spec: str | None = None):
        self.n_mels = n_mels
        self.sample_rate = SAMPLE_RATE
        self.dim = 2 * n_mels + len(PROSODY_FEATURES)
        self.spec = spec or (f"logmel?n_mels={n_mels}" if n_mels != 64 else "logmel")
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=FRAME, win_length=FRAME, hop_length=HOP, n_mels=n_mels, power=2.0
        )

    @classmethod
    def from_spec(cls, spec: EncoderSpec, device: str) -> "LogMelProsodyEncoder":
        # Small per-segment tensors run fastest on the CPU, whatever device is offered.
        reject_name(spec)
        return cls(**read_options(spec, cls.OPTIONS), spec=str(spec))

    @property
    def feature_names(self) -> list[str]:
        bands = range(self.n_mels)
        return [f"log_mel_mean_{b}" for b in bands] + [f"log_mel_std_{b}" for b in bands] + list(PROSODY_FEATURES)

    def fingerprint(self) -> dict:
        return {"encoder": "logmel", "code_version": self.CODE_VERSION, "sample_rate": self.sample_rate,
                "n_mels": self.n_mels, "dim": self.dim}

    def encode(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        vectors = np.zeros((len(waveforms), self.dim), dtype=np.float32)
        for index, waveform in enumerate(waveforms):
            vectors[index] = self._features(as_mono_waveform(waveform, index))
        assert np.isfinite(vectors).all(), "logmel produced a non-finite feature"
        return vectors

    def _features(self, waveform: np.ndarray) -> np.ndarray:
        seconds = max(len(waveform), HOP) / SAMPLE_RATE
        samples = np.pad(waveform, (0, max(0, PITCH_FRAME - len(waveform)))).astype(np.float64)
        with torch.inference_mode():
            log_mel = torch.log(self._mel(torch.from_numpy(samples.astype(np.float32))) + MEL_FLOOR).numpy()
        level_db = frame_levels_db(samples)
        return np.concatenate([
            log_mel.mean(axis=1), log_mel.std(axis=1),
            pitch_statistics(samples, level_db),
            energy_statistics(level_db),
            zero_crossing_statistics(samples),
            [energy_peaks(level_db) / seconds],
            spectral_flux_statistics(log_mel),
        ])


def frames_of(samples: np.ndarray, length: int) -> np.ndarray:
    """``[n_frames, length]`` views, hop 10 ms; ``samples`` is at least ``length`` long."""
    return sliding_window_view(samples, length)[::HOP]


def frame_levels_db(samples: np.ndarray) -> np.ndarray:
    """RMS level of each 25 ms frame in dBFS, floored at -100 dB for digital silence."""
    rms = np.sqrt(np.mean(frames_of(samples, FRAME) ** 2, axis=1))
    return 20.0 * np.log10(rms + 1e-5)


def pitch_statistics(samples: np.ndarray, level_db: np.ndarray) -> list[float]:
    f0, voiced = estimate_f0(samples, level_db)
    if not voiced.any():
        return [0.0, 0.0, 0.0, 0.0]
    octaves = np.log2(f0[voiced] / 100.0)
    low, high = np.percentile(octaves, [5, 95])
    return [float(voiced.mean()), float(octaves.mean()), float(octaves.std()), float(high - low)]


def estimate_f0(samples: np.ndarray, level_db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F0 in Hz and a voicing decision per 10 ms frame, from the normalised cross-correlation.

    The NCCF compares a 25 ms window with the same-length window ``lag`` samples later; unlike
    the plain autocorrelation it does not decay with lag, so the first strong peak is the period
    and not a multiple of it.
    """
    frames = frames_of(samples, PITCH_FRAME)
    correlation = cross_correlation(frames)
    energy = np.cumsum(np.pad(frames**2, ((0, 0), (1, 0))), axis=1)
    lagged_energy = energy[:, FRAME : FRAME + LONGEST_LAG + 1] - energy[:, : LONGEST_LAG + 1]
    nccf = correlation / np.sqrt(lagged_energy[:, :1] * lagged_energy + 1e-12)

    candidates = nccf[:, SHORTEST_LAG : LONGEST_LAG + 1]
    best = candidates.max(axis=1, keepdims=True)
    # First lag that comes close to the best peak, then the top of that peak: avoids octave errors.
    first = SHORTEST_LAG + np.argmax(candidates >= 0.9 * best, axis=1)
    search = np.minimum(first[:, None] + np.arange(24), LONGEST_LAG - 1)
    rows = np.arange(len(frames))[:, None]
    lag = search[rows[:, 0], np.argmax(nccf[rows, search], axis=1)]

    left, peak, right = (nccf[rows[:, 0], lag + shift] for shift in (-1, 0, 1))
    curvature = left - 2 * peak + right
    offset = np.where(curvature < 0, 0.5 * (left - right) / np.where(curvature < 0, curvature, -1.0), 0.0)
    f0 = SAMPLE_RATE / (lag + np.clip(offset, -0.5, 0.5))

    frame_level = level_db[: len(frames)]
    is_peak = (peak >= left) & (peak >= right)
    loud = (frame_level > LEVEL_FLOOR_DB) & (frame_level > level_db.max() - 35.0)
    return f0, is_peak & (peak >= VOICING_THRESHOLD) & loud


def cross_correlation(frames: np.ndarray) -> np.ndarray:
    """``[n_frames, LONGEST_LAG + 1]``: each frame's first 25 ms against itself shifted by each lag.

    Through the FFT in float32 (torch's is about twice as fast as numpy's here). ``PITCH_FFT``
    only needs to exceed the frame length: the circular wrap-around reaches no lag we read.
    """
    frames32 = torch.from_numpy(np.asarray(frames, dtype=np.float32))
    spectrum = torch.fft.rfft(frames32[:, :FRAME], PITCH_FFT).conj() * torch.fft.rfft(frames32, PITCH_FFT)
    return torch.fft.irfft(spectrum, PITCH_FFT)[:, : LONGEST_LAG + 1].double().numpy()


def energy_statistics(level_db: np.ndarray) -> list[float]:
    bels = level_db / 10.0
    low, high = np.percentile(bels, [5, 95])
    return [float(bels.mean()), float(bels.std()), float(high - low)]


def zero_crossing_statistics(samples: np.ndarray) -> list[float]:
    signs = np.signbit(frames_of(samples, FRAME))
    rates = np.mean(signs[:, 1:] != signs[:, :-1], axis=1)
    return [float(rates.mean()), float(rates.std())]


def energy_peaks(level_db: np.ndarray) -> int:
    """Syllable-like peaks of the 50 ms-smoothed level: local maxima over +-50 ms that stand
    3 dB above the lowest level within 150 ms on each side and are within 25 dB of the loudest."""
    envelope = np.convolve(np.pad(level_db, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    padded = np.pad(envelope, 15, mode="edge")
    n = len(envelope)
    neighbourhood_max = sliding_window_view(padded[10 : n + 20], 11).max(axis=1)
    left_dip = sliding_window_view(padded[:n + 15], 16).min(axis=1)
    right_dip = sliding_window_view(padded[15:], 16).min(axis=1)
    rising = envelope > np.concatenate([[np.inf], envelope[:-1]])
    prominent = envelope - np.maximum(left_dip, right_dip) >= 3.0
    loud = (envelope > envelope.max() - 25.0) & (envelope > LEVEL_FLOOR_DB)
    return int(np.sum((envelope >= neighbourhood_max) & rising & prominent & loud))


def spectral_flux_statistics(log_mel: np.ndarray) -> list[float]:
    if log_mel.shape[1] < 2:
        return [0.0, 0.0]
    flux = np.maximum(np.diff(log_mel, axis=1), 0.0).mean(axis=0)
    return [float(flux.mean()), float(flux.std())]
