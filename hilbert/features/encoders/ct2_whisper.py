"""``ct2:<folder>``: Whisper's encoder on CTranslate2, the engine faster-whisper runs.

The folder is a CTranslate2 conversion of a Whisper checkpoint (``model.bin``, ``config.json``;
``ct2-transformers-converter --model openai/whisper-small --output_dir DIR --copy_files
preprocessor_config.json``), as faster-whisper downloads them. Segments are chunked, padded to
the 30-second window and pooled over the frames of real samples by the same code as
``hf:<Whisper folder>`` (:class:`~hilbert.features.encoders.hf_speech.WhisperWindow`), so the two
give the same vectors for the same weights. For the encoder alone, CTranslate2 float32 took
1-10 % longer than PyTorch on a 2-core CPU and int8 13-20 % less than float32
(docs/benchmarks.md; faster-whisper's published speed-ups are for transcription, which also
decodes): ``ct2:`` is the way to use faster-whisper folders as they are, and to quantise.

Options:

- ``layer``: ``last`` only. CTranslate2 returns the encoder's final output and no hidden states;
  for another layer, ``avg`` or ``all`` use ``hf:`` on the Hugging Face folder of the same weights.
- ``compute_type``: CTranslate2's arithmetic. Default ``float32`` on CPU, ``float16`` on CUDA;
  these two (and ``bfloat16``) share a cache key, like ``hf:``'s fp16 autocast on GPU. ``int8``
  (``int8_float32``, ``int8_float16``, ``int8_bfloat16``) and ``int16`` quantise the weights,
  which changes the vectors, so the quantisation is part of the fingerprint.
- ``chunk_seconds``: at most the window (the default), as for ``hf:`` Whisper.
- ``batch_size`` (chunks per call; default 1 on CPU, where one 30-second window at a time was
  12-20 % faster per window than 8 with tiny.en, and 8 on CUDA) and ``intra_threads`` (CPU
  threads; default what torch uses in this process, i.e. an extraction actor's CPU share): speed
  only.

The log-mel front end is transformers' ``WhisperFeatureExtractor`` as the folder's
``preprocessor_config.json`` configures it (faster-whisper reads the same file), else 80 mel
bins at 16 kHz, 30 s, the setting of every Whisper before large-v3; loading checks it against
the mel bins the weights expect. The fingerprint (SHA-256 of ``model.bin`` and ``config.json``,
the mel settings, quantisation, chunking) is read without loading the model or importing
CTranslate2, which is an optional dependency imported only when the encoder is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hilbert.features.encoders.base import AudioEncoder
from hilbert.features.encoders.hf_checkpoint import _file_sha256
from hilbert.features.encoders.hf_speech import ChunkedSpeechEncoder, WhisperWindow, chunk_seconds_for
from hilbert.features.encoders.pooling import length_mask, masked_sums
from hilbert.features.encoders.registry import register_audio_encoder
from hilbert.features.encoders.spec import (
    EncoderSpec,
    EncoderSpecError,
    Option,
    positive_integer,
    positive_seconds,
    read_options,
)

CODE_VERSION = 1  # bump when a change here can change a vector
WEIGHT_FILES = ("model.bin", "config.json")
# What each compute type does to the weights: the float types agree to float16 rounding (one
# cache key, whatever the device), quantised ones give other vectors.
QUANTISATION = {"float32": "none", "float16": "none", "bfloat16": "none", "int8": "int8", "int8_float32": "int8",
                "int8_float16": "int8", "int8_bfloat16": "int8", "int16": "int16"}
# The mel settings that change the features (transformers' WhisperFeatureExtractor attributes).
MEL_SETTINGS = ("feature_size", "sampling_rate", "n_fft", "hop_length", "chunk_length", "padding_value")
INSTALL_HINT = "pip install ctranslate2 (it comes with hilbert's 'test' extra: pip install -e '.[test]')"


def last_layer_only(text: str) -> str:
    if text == "all":
        raise ValueError("ct2: cannot give layer=all: CTranslate2's Whisper.encode returns only the encoder's final "
                         "output, no hidden states; for layer=all use hf:<the Hugging Face folder of the same Whisper>")
    if text != "last":
        raise ValueError("expected 'last': CTranslate2 returns only the encoder's final output; for another layer "
                         "or 'avg' use hf:<the Hugging Face folder of the same Whisper>")
    return text


def compute_type_choice(text: str) -> str:
    if text not in QUANTISATION:
        raise ValueError(f"expected one of {', '.join(QUANTISATION)} (CTranslate2 compute types)")
    return text


CT2_OPTIONS = {
    "layer": Option(last_layer_only, "last"),
    "compute_type": Option(compute_type_choice, None),  # None: float32 on CPU, float16 on CUDA
    "chunk_seconds": Option(positive_seconds, None),  # None: the whole window
    "batch_size": Option(positive_integer, None),  # None: 1 on CPU, 8 on CUDA
    "intra_threads": Option(positive_integer, None),  # None: torch's thread count in this process
}


@dataclass(frozen=True)
class CT2WhisperSettings:
    """Everything that determines the vectors of ``ct2:<folder>``, known without loading the model."""

    folder: Path
    weights: dict
    mel: dict
    compute_type: str | None
    chunk_seconds: float
    sample_rate: int

    @classmethod
    def read(cls, spec: EncoderSpec, options: dict, folder: Path, feature_extractor: Any) -> "CT2WhisperSettings":
        return cls(
            folder=folder,
            weights={name: _file_sha256(str((folder / name).resolve()), *file_version(folder / name))
                     for name in WEIGHT_FILES},
            mel=mel_settings(feature_extractor),
            compute_type=options["compute_type"],
            chunk_seconds=chunk_seconds_for(spec, options["chunk_seconds"], feature_extractor, whisper=True),
            sample_rate=int(feature_extractor.sampling_rate),
        )

    def fingerprint(self) -> dict:
        # An unset compute type is float32 or float16 by device: not quantised either way.
        quantisation = QUANTISATION[self.compute_type] if self.compute_type else "none"
        return {"encoder": "ct2-whisper", "weights": self.weights, "mel": self.mel, "quantisation": quantisation,
                "layer": "last", "chunk_seconds": self.chunk_seconds, "sample_rate": self.sample_rate,
                "code_version": CODE_VERSION}


def open_folder(spec: EncoderSpec) -> tuple[dict, CT2WhisperSettings, Any]:
    """Options, settings and log-mel front end of ``spec``: JSON files read, weight files hashed, no model loaded."""
    options = read_options(spec, CT2_OPTIONS)
    folder = whisper_folder(spec)
    feature_extractor = mel_feature_extractor(spec, folder)
    return options, CT2WhisperSettings.read(spec, options, folder, feature_extractor), feature_extractor


def mel_settings(feature_extractor: Any) -> dict:
    settings = {name: getattr(feature_extractor, name) for name in MEL_SETTINGS}
    # Random dither (newer transformers) changes the features; its default, none, is left out so
    # that the key stays the same across transformers versions.
    if getattr(feature_extractor, "dither", 0.0):
        settings["dither"] = feature_extractor.dither
    return settings


def file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def whisper_folder(spec: EncoderSpec) -> Path:
    """The folder ``spec`` names, checked to hold a CTranslate2 Whisper model."""
    if not spec.name:
        raise EncoderSpecError(f"encoder spec {str(spec)!r}: name the folder, as in 'ct2:/path/to/faster-whisper-small'")
    folder = Path(spec.name).expanduser()
    missing = [name for name in WEIGHT_FILES if not (folder / name).is_file()]
    if missing:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: {spec.name!r} is not a CTranslate2 model folder (no {', '.join(missing)}); "
            "ct2: takes a local folder converted with ct2-transformers-converter, as faster-whisper uses"
        )
    model_kind = ct2_model_kind(folder / "model.bin")
    if not model_kind.startswith("Whisper"):
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: {spec.name!r} holds a CTranslate2 {model_kind or 'unknown'} model; "
            "ct2: encodes with Whisper models only"
        )
    return folder


def ct2_model_kind(model_bin: Path) -> str:
    """The model specification a CTranslate2 ``model.bin`` names in its header (``WhisperSpec``).

    The header is a uint32 format version, then the name as a uint16 length and that many bytes
    (NUL-terminated); "" when the file is too short to hold one."""
    with open(model_bin, "rb") as handle:
        header = handle.read(6)
        if len(header) < 6:
            return ""
        length = int.from_bytes(header[4:6], "little")
        return handle.read(length).rstrip(b"\0").decode("utf-8", errors="replace")


def mel_feature_extractor(spec: EncoderSpec, folder: Path) -> Any:
    """transformers' ``WhisperFeatureExtractor`` as the folder configures it: its
    ``preprocessor_config.json``, else the mel-bin count its ``config.json`` names, else 80."""
    from transformers import WhisperFeatureExtractor  # seconds to import; only ct2:/hf: encoders need it

    if (folder / "preprocessor_config.json").is_file():
        try:
            return WhisperFeatureExtractor.from_pretrained(folder)
        except Exception as error:  # a malformed JSON file, or one for another feature extractor
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: cannot read {folder / 'preprocessor_config.json'}: {error}"
            ) from error
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    n_mels = config.get("num_mel_bins", config.get("n_mels", 80))
    return WhisperFeatureExtractor(feature_size=int(n_mels))


def import_ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError as error:
        raise EncoderSpecError(f"ct2: encoders need the ctranslate2 package, which is not installed: {INSTALL_HINT}") \
            from error
    return ctranslate2


def ct2_device(device: str) -> tuple[str, int]:
    """hilbert's device name (``cpu``, ``cuda``, ``cuda:1``) as CTranslate2's device and index."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise EncoderSpecError(f"ct2: encoders run on 'cpu' or 'cuda', not {device!r}")
    return kind, int(index or 0)


class CT2WhisperEncoder(WhisperWindow, ChunkedSpeechEncoder):
    """Whisper's encoder on CTranslate2: the same chunks, window and pooling as ``hf:`` Whisper."""

    def __init__(self, spec: EncoderSpec, settings: CT2WhisperSettings, model: Any, feature_extractor: Any,
                 batch_size: int, device: str, compute_type: str):
        self.settings = settings
        self.feature_extractor = feature_extractor
        self.model = model
        self.device = device
        self.compute_type = compute_type  # for logs and reports; the fingerprint keeps its quantisation only
        self.layer = "last"
        super().__init__(spec, self._output_dim(), settings.sample_rate, settings.chunk_seconds, batch_size)

    @classmethod
    def from_spec(cls, spec: EncoderSpec, device: str) -> "CT2WhisperEncoder":
        options, settings, feature_extractor = open_folder(spec)
        ctranslate2 = import_ctranslate2()
        kind, index = ct2_device(device)
        compute_type = settings.compute_type or ("float16" if kind == "cuda" else "float32")
        if kind == "cuda" and ctranslate2.get_cuda_device_count() <= index:
            raise EncoderSpecError(f"encoder spec {str(spec)!r}: this ctranslate2 build sees no {device!r} device "
                                   f"({ctranslate2.get_cuda_device_count()} CUDA devices)")
        supported = ctranslate2.get_supported_compute_types(kind, index)
        if compute_type not in supported:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: compute_type={compute_type} is not supported on {device}; "
                f"choose one of {', '.join(sorted(set(supported) & set(QUANTISATION)))}"
            )
        threads = options["intra_threads"] or torch.get_num_threads()
        try:
            model = ctranslate2.models.Whisper(str(settings.folder), device=kind, device_index=index,
                                               compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as error:
            raise EncoderSpecError(f"encoder spec {str(spec)!r}: CTranslate2 cannot load {spec.name!r}: {error}") \
                from error
        if model.n_mels != feature_extractor.feature_size:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: the weights take {model.n_mels} mel bins but the folder's front end gives "
                f"{feature_extractor.feature_size}; copy the preprocessor_config.json of the original Hugging Face "
                "model into the folder (ct2-transformers-converter --copy_files preprocessor_config.json)"
            )
        batch_size = options["batch_size"] or (8 if kind == "cuda" else 1)
        return cls(spec, settings, model, feature_extractor, batch_size, device, compute_type)

    def fingerprint(self) -> dict:
        return self.settings.fingerprint()

    def _encoder_frames(self, features: np.ndarray) -> torch.Tensor:
        """``[batch, frames, dim]`` float32 encoder output of ``[batch, n_mels, mel frames]`` features."""
        ctranslate2 = import_ctranslate2()
        output = self.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), to_cpu=True)
        return torch.from_numpy(np.array(output)).float()

    def _output_dim(self) -> int:
        # CTranslate2 does not say the model's width; two mel frames give one output frame of it.
        probe = np.zeros((1, self.feature_extractor.feature_size, 2), dtype=np.float32)
        return int(self._encoder_frames(probe).shape[-1])

    def _frame_sums(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        features, valid = self._window_features(chunks)
        frames = self._encoder_frames(features.numpy())
        return masked_sums(frames, length_mask(valid, frames.shape[1]))


def ct2_whisper_fingerprint(spec: EncoderSpec) -> dict:
    return open_folder(spec)[1].fingerprint()


@register_audio_encoder("ct2", fingerprint=ct2_whisper_fingerprint)
def build_ct2_whisper_encoder(spec: EncoderSpec, device: str) -> AudioEncoder:
    return CT2WhisperEncoder.from_spec(spec, device)
