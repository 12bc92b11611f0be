"""Segment timing as model input: when each segment was said, for how long, after how long a
pause, and how many words it holds.

Every corpus knows these from its manifest alone, and rate, pausing and latency are among the
best-known markers in clinical speech; the frozen encoders do not carry them (a speech encoder
sees one segment's samples, not where the segment sits in the recording; a normalised text
vector has lost its length). :func:`segment_timing` computes them for one document, in the
driver, without any encoder; extraction caches them beside the encoder features
(:mod:`hilbert.features.extract`), and the model reads the audio-side columns as extra columns
of its audio stream and the text-side ones as extra columns of its text stream
(:class:`hilbert.features.batches.DocumentFeatures`). A segment's speech rate (words per second)
is then a relation between the two streams, learnable only where they meet: in the cross-modal
layers and the joint embedding.

For segments ``i = 0 .. S-1`` in manifest order, with start ``s_i`` and end ``e_i`` in seconds
and transcript ``x_i``, and ``slog(v) = sign(v) * ln(1 + |v|)``:

Audio side (:data:`AUDIO_COLUMNS`):

- ``log_duration = ln(1 + (e_i - s_i))``: the segment's length (> 0: the manifest refuses
  ``end <= start``).
- ``pause = slog(g_i)``, the gap before the segment: ``g_i = s_i - max{e_j : segment j starts
  before i}`` (ties in start: the one earlier in the manifest counts as before), and ``g_i = s_i``
  for the segment that starts first (the latency to the first utterance). For sorted,
  non-overlapping segments that is "start minus the previous segment's end". Overlapping speech
  gives a negative gap (the seconds of overlap with the speech still running), kept negative by
  the signed log rather than clipped to 0; the latest end so far, not the previous segment's,
  is the reference, so a short backchannel inside a long turn does not make the turn's next
  segment look as if it followed a silence.
- ``position = s_i / T`` with ``T = max_j e_j`` (the end of the last speech): how far through
  the recording, in [0, 1).
- ``log_elapsed = ln(1 + s_i)``: how long into the recording, in seconds (fatigue and warm-up
  are about time spent, which ``position`` normalises away).

Text side (:data:`TEXT_COLUMNS`):

- ``log_words = ln(1 + w_i)``, ``w_i`` the number of whitespace-separated words of ``x_i``;
- ``log_characters = ln(1 + c_i)``, ``c_i`` the number of characters of ``x_i`` that are not
  whitespace (so spacing conventions do not count).

An empty (or whitespace-only) transcript has ``w_i = c_i = 0``, hence exactly 0 in both columns.
Durations, gaps and counts are right-skewed (a 40 s monologue beside 0.3 s backchannels), hence
the logarithms; ``ln(1 + v)`` keeps 0 at 0. The model standardises every column with the
training fold's statistics, so units and offsets need no further care here. ``ln(1 + w) - ln(1 +
d)`` is close to the log speech rate for all but the shortest segments.

:data:`TIMING_VERSION` is part of the cache key and of :func:`timing_fingerprint`, which feature
sets and checkpoints record: bump it whenever a formula changes, so that old entries are not
reused and a model is never fed timing columns computed differently from those it was trained on.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hilbert.data.manifest import Segment

TIMING_VERSION = 1
AUDIO_COLUMNS = ("log_duration", "pause", "position", "log_elapsed")
TEXT_COLUMNS = ("log_words", "log_characters")


def timing_fingerprint() -> dict[str, Any]:
    """What the timing columns are: recorded in feature sets and in the checkpoints of models
    trained with them."""
    return {"features": "segment-timing", "version": TIMING_VERSION, "audio": list(AUDIO_COLUMNS),
            "text": list(TEXT_COLUMNS)}


def timing_label(fingerprint: dict[str, Any] | None) -> str:
    """How timing entries are named where encoders are (their headers' ``encoder``, cache info)."""
    return f"segment-timing v{(fingerprint or {}).get('version', '?')}"


def segment_timing(segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """The timing columns of one document: audio ``[S, len(AUDIO_COLUMNS)]`` and text
    ``[S, len(TEXT_COLUMNS)]``, float32, rows in the order of ``segments`` (formulas in the
    module docstring)."""
    if not segments:
        raise ValueError("a document needs at least one segment to have timing features")
    starts = np.array([s.start for s in segments], dtype=np.float64)
    ends = np.array([s.end for s in segments], dtype=np.float64)
    audio = np.stack([np.log1p(ends - starts), _signed_log1p(_gaps(starts, ends)),
                      starts / ends.max(), np.log1p(starts)], axis=1)
    words = np.array([len(s.text.split()) for s in segments], dtype=np.float64)
    characters = np.array([len("".join(s.text.split())) for s in segments], dtype=np.float64)
    text = np.stack([np.log1p(words), np.log1p(characters)], axis=1)
    return audio.astype(np.float32), text.astype(np.float32)


def _gaps(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``g_i``: start minus the latest end of the segments that start before it; the first start
    for the segment that starts first."""
    order = np.argsort(starts, kind="stable")
    latest_before = np.concatenate([[0.0], np.maximum.accumulate(ends[order])[:-1]])
    gaps = np.empty_like(starts)
    gaps[order] = starts[order] - latest_before
    return gaps


def _signed_log1p(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


def split_timing(rows: np.ndarray, fingerprint: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A cached timing entry ``[S, audio + text columns]`` back into its audio and text columns,
    as ``fingerprint`` (the one it was computed with) lays them out."""
    audio_columns = len(fingerprint["audio"])
    if rows.ndim != 2 or rows.shape[1] != audio_columns + len(fingerprint["text"]):
        raise ValueError(f"timing rows of shape {rows.shape} do not match {fingerprint}")
    return rows[:, :audio_columns], rows[:, audio_columns:]
