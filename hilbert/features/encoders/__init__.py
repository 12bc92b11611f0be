"""Frozen-encoder registry: spec strings -> audio and text encoders that map segments to vectors.

Built-in kinds: ``logmel`` (audio) and ``hashngram`` (text), weight-free and offline; ``hf:<model
id or folder>`` (audio or text, decided by the checkpoint's model type) for Hugging Face models;
``ct2:<folder>`` (audio) for Whisper's encoder on CTranslate2 (the optional ``ctranslate2`` package).
"""

from hilbert.features.encoders.base import AudioEncoder, TextEncoder
from hilbert.features.encoders.registry import (
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
    register_audio_encoder,
    register_text_encoder,
)
from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError, parse_encoder_spec

# Imported for their registrations.
from hilbert.features.encoders import ct2_whisper, hashngram, huggingface, logmel  # noqa: E402,F401  isort: skip

__all__ = [
    "AudioEncoder",
    "TextEncoder",
    "EncoderSpec",
    "EncoderSpecError",
    "build_audio_encoder",
    "build_text_encoder",
    "encoder_fingerprint",
    "parse_encoder_spec",
    "register_audio_encoder",
    "register_text_encoder",
]
