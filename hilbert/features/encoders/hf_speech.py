"""Speech encoders from Hugging Face: the wav2vec2 family and Whisper's encoder.

Both share one recipe: cut each segment into chunks of at most ``chunk_seconds``, sort the chunks
by length so batches hold similar lengths, run the frozen model, and average its output frames
over the real samples only. A segment's vector is the frame-count weighted mean over its
chunks, i.e. the mean over all of its valid frames, so it does not depend on what else was in
the batch. They differ in how a batch is padded and how many output frames are valid:

- wav2vec2, HuBERT, WavLM, data2vec-audio, ...: padded to the longest chunk in the batch, with
  the valid frames from the model's own ``_get_feat_extract_output_lengths``. Checkpoints whose
  conv front end uses group norm (``feat_extract_norm="group"``: wav2vec2-base, HuBERT-base,
  WavLM-base) normalise over the whole padded input and were trained without an attention mask,
  so padding would change their outputs; for those, a batch only holds chunks of equal length.
- Whisper: every chunk is padded to the model's 30-second window (how it was trained, and
  its encoder accepts nothing else), so only the frames that cover real samples are averaged.

The recipe itself (:class:`ChunkedSpeechEncoder`) and Whisper's window (:class:`WhisperWindow`)
do not depend on what runs the model: ``ct2_whisper.py`` runs Whisper's encoder on CTranslate2
with the same two pieces, so both engines give the same vectors for the same weights.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from hilbert.features.encoders.base import AudioEncoder, as_mono_waveform
from hilbert.features.encoders.hf_checkpoint import WHISPER_MODEL_TYPES, HFCheckpoint
from hilbert.features.encoders.pooling import (
    layers_kept,
    length_mask,
    masked_sums,
    resolve_layer,
    select_layer,
    wants_hidden_states,
)
from hilbert.features.encoders.precision import autocast_on, checked_precision, precision_choice
from hilbert.features.encoders.spec import (
    EncoderSpec,
    EncoderSpecError,
    Option,
    layer_choice,
    plain_text,
    positive_integer,
    positive_seconds,
)

DEFAULT_CHUNK_SECONDS = 20.0
CODE_VERSION = 1  # bump when a change here can change a vector

SPEECH_OPTIONS = {
    "layer": Option(layer_choice, "last"),
    "chunk_seconds": Option(positive_seconds, None),  # None: 20 s, or Whisper's whole window
    "batch_size": Option(positive_integer, 8),
    "precision": Option(precision_choice, "auto"),  # auto: float16 autocast on CUDA, float32 on CPU
    "revision": Option(plain_text, None),
}


@dataclass(frozen=True)
class SpeechSettings:
    """Everything that determines a speech encoder's vectors, known without loading weights."""

    model_type: str
    weights: dict
    layer: int | str
    chunk_seconds: float
    sample_rate: int
    dim: int  # one hidden state's width
    layers: int = 1  # hidden states side by side in each vector: all of them for layer=all

    @classmethod
    def read(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any,
             feature_extractor: Any) -> "SpeechSettings":
        whisper = config.model_type in WHISPER_MODEL_TYPES
        hidden_states = (config.encoder_layers if whisper else config.num_hidden_layers) + 1
        return cls(
            model_type=config.model_type,
            weights=checkpoint.identity(),
            layer=resolve_layer(spec, options["layer"], hidden_states),
            chunk_seconds=chunk_seconds_for(spec, options["chunk_seconds"], feature_extractor, whisper),
            sample_rate=int(feature_extractor.sampling_rate),
            dim=int(config.hidden_size),
            layers=layers_kept(options["layer"], hidden_states),
        )

    def fingerprint(self) -> dict:
        # "layers" only for layer=all, so every other spec keeps the cache key it had.
        layers = {"layers": self.layers} if self.layer == "all" else {}
        return {"encoder": "hf", "model_type": self.model_type, "weights": self.weights, "layer": self.layer,
                "chunk_seconds": self.chunk_seconds, "sample_rate": self.sample_rate, "dim": self.dim, **layers,
                "code_version": CODE_VERSION}


def chunk_seconds_for(spec: EncoderSpec, chunk_seconds: float | None, feature_extractor: Any, whisper: bool) -> float:
    if not whisper:
        return DEFAULT_CHUNK_SECONDS if chunk_seconds is None else chunk_seconds
    # Whisper pads every chunk to its window, so a chunk costs a full window whatever its length.
    window = feature_extractor.n_samples / feature_extractor.sampling_rate
    if chunk_seconds is None:
        return window
    if chunk_seconds > window:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: chunk_seconds={chunk_seconds:g} exceeds Whisper's {window:g}-second window; "
            f"use at most {window:g}"
        )
    return chunk_seconds


class ChunkedSpeechEncoder(AudioEncoder):
    """Chunking, length-sorted batching and frame pooling, whatever engine runs the model;
    subclasses run one batch of chunks."""

    def __init__(self, spec: EncoderSpec | str, dim: int, sample_rate: int, chunk_seconds: float, batch_size: int):
        self.spec = str(spec)
        self.dim = dim
        self.sample_rate = sample_rate
        self.chunk_seconds = chunk_seconds
        self.batch_size = batch_size

    @property
    @abstractmethod
    def shortest_input(self) -> int:
        """Fewest samples that give at least one output frame; shorter chunks are zero-padded."""

    @property
    def pads_freely(self) -> bool:
        """Whether chunks of different lengths may share a batch without changing their outputs."""
        return True

    @abstractmethod
    def _frame_sums(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of chunks: ``[batch, dim]`` sums of valid output frames and ``[batch]`` counts."""

    def encode(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        chunks, owners = self._chunks(waveforms)
        sums = np.zeros((len(waveforms), self.dim), dtype=np.float64)
        counts = np.zeros(len(waveforms), dtype=np.float64)
        for batch in self._batches([len(chunk) for chunk in chunks]):
            batch_sums, batch_counts = self._frame_sums([chunks[i] for i in batch])
            np.add.at(sums, [owners[i] for i in batch], batch_sums.double().cpu().numpy())
            np.add.at(counts, [owners[i] for i in batch], batch_counts.double().cpu().numpy())
        assert (counts > 0).all(), "every segment yields at least one frame"
        return (sums / counts[:, None]).astype(np.float32)

    def _chunks(self, waveforms: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """Every segment's chunks, and the index of the segment each chunk came from."""
        chunk_samples = max(1, int(round(self.chunk_seconds * self.sample_rate)))
        chunks, owners = [], []
        for index, waveform in enumerate(waveforms):
            for chunk in split_into_chunks(as_mono_waveform(waveform, index), chunk_samples, self.shortest_input):
                chunks.append(chunk)
                owners.append(index)
        return chunks, owners

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Chunk indices in batches of similar (or, when padding is not free, equal) length."""
        batch: list[int] = []
        for index in sorted(range(len(lengths)), key=lengths.__getitem__):
            full = len(batch) == self.batch_size
            if batch and (full or (not self.pads_freely and lengths[index] != lengths[batch[0]])):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch


class TransformersSpeechEncoder(ChunkedSpeechEncoder):
    """A frozen transformers model on a torch device (by default float16 autocast on CUDA)."""

    def __init__(self, spec: EncoderSpec, settings: SpeechSettings, model: torch.nn.Module, feature_extractor: Any,
                 batch_size: int, device: str, precision: str = "auto"):
        super().__init__(spec, settings.dim * settings.layers, settings.sample_rate, settings.chunk_seconds, batch_size)
        self.settings = settings
        self.layers = settings.layers
        self.layer = settings.layer
        self.device = device
        self.precision = precision
        self.feature_extractor = feature_extractor
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def load(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any,
             device: str) -> "TransformersSpeechEncoder":
        from transformers import AutoFeatureExtractor, AutoModel

        precision = checked_precision(spec, options["precision"], device)
        feature_extractor = checkpoint.load(spec, AutoFeatureExtractor, "feature extractor")
        settings = SpeechSettings.read(spec, options, checkpoint, config, feature_extractor)
        model = checkpoint.load_weights(spec, AutoModel, dtype=torch.float32)
        return cls(spec, settings, cls.frozen_part(model), feature_extractor, options["batch_size"], device, precision)

    @staticmethod
    def frozen_part(model: torch.nn.Module) -> torch.nn.Module:
        """The part of the loaded model that computes the frames (all of it, unless overridden)."""
        return model

    def fingerprint(self) -> dict:
        return self.settings.fingerprint()

    def encode(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        # The autocast is around the model's forward alone (in _frame_sums): feature extractors
        # compute their spectrograms with torch, which under a CPU autocast would run in bfloat16.
        with torch.inference_mode():
            return super().encode(waveforms)


def split_into_chunks(waveform: np.ndarray, chunk_samples: int, shortest: int) -> list[np.ndarray]:
    """Consecutive pieces of ``chunk_samples`` (the last one shorter), each at least ``shortest``
    long by zero-padding, and at least one piece even for an empty waveform."""
    starts = range(0, max(len(waveform), 1), chunk_samples)
    pieces = [waveform[start:start + chunk_samples] for start in starts]
    return [np.pad(piece, (0, max(0, shortest - len(piece)))) for piece in pieces]


class Wav2Vec2FamilyEncoder(TransformersSpeechEncoder):
    """wav2vec2, HuBERT, WavLM, data2vec-audio and relatives (``AutoModel`` + ``AutoFeatureExtractor``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._uses_attention_mask = getattr(self.model.config, "feat_extract_norm", "layer") == "layer"
        self._shortest_input = smallest_input_with_output(self._output_lengths)

    @property
    def shortest_input(self) -> int:
        return self._shortest_input

    @property
    def pads_freely(self) -> bool:
        return self._uses_attention_mask

    def _output_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor:
        compute = self.model._get_feat_extract_output_lengths
        # hidden_states come from the transformer before any adapter, so its downsampling must not count.
        if "add_adapter" in inspect.signature(compute).parameters:
            return torch.as_tensor(compute(lengths, add_adapter=False))
        return torch.as_tensor(compute(lengths))

    def _frame_sums(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        # The attention mask also makes the extractor normalise each chunk over its real samples only.
        features = self.feature_extractor(chunks, sampling_rate=self.sample_rate, padding=True,
                                          return_attention_mask=True, return_tensors="pt")
        inputs = {"input_values": features["input_values"].to(self.device)}
        if self._uses_attention_mask:
            inputs["attention_mask"] = features["attention_mask"].to(self.device)
        with autocast_on(self.device, self.precision):
            outputs = self.model(**inputs, output_hidden_states=wants_hidden_states(self.layer))
        frames = select_layer(outputs, self.layer)
        valid = self._output_lengths(torch.tensor([len(chunk) for chunk in chunks])).to(self.device)
        return masked_sums(frames, length_mask(valid, frames.shape[1]))


def smallest_input_with_output(output_lengths: Any) -> int:
    """Binary search for the fewest input samples that give one output frame (400 for wav2vec2)."""
    high = 1
    while int(output_lengths(high)) < 1:
        high *= 2
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        if int(output_lengths(middle)) >= 1:
            high = middle
        else:
            low = middle + 1
    return low


class WhisperWindow:
    """What every Whisper encoder shares, whichever engine runs it: log-mel features of each chunk
    padded to the window, and how many encoder frames cover the chunk's real samples."""

    feature_extractor: Any  # a transformers WhisperFeatureExtractor
    sample_rate: int

    @property
    def shortest_input(self) -> int:
        return int(self.feature_extractor.hop_length)

    def _window_features(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, n_mels, window frames]`` float32 log-mel features and ``[batch]`` valid encoder frames."""
        features = self.feature_extractor(chunks, sampling_rate=self.sample_rate, return_attention_mask=True,
                                          return_tensors="pt")
        return features["input_features"], whisper_encoder_frames(features["attention_mask"].sum(dim=1))


def whisper_encoder_frames(mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder output frames of ``mel_frames`` log-mel frames: Whisper's second convolution
    (kernel 3, stride 2, padding 1) halves them, rounding up (transformers'
    ``WhisperEncoder._get_feat_extract_output_lengths``)."""
    return (mel_frames - 1) // 2 + 1


class WhisperAudioEncoder(WhisperWindow, TransformersSpeechEncoder):
    """The encoder half of a Whisper checkpoint, with its ``WhisperFeatureExtractor``."""

    @staticmethod
    def frozen_part(model: torch.nn.Module) -> torch.nn.Module:
        # Keep only the encoder: the decoder is about half the weights and never runs here.
        return model.get_encoder()

    def _frame_sums(self, chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        features, valid = self._window_features(chunks)
        with autocast_on(self.device, self.precision):
            outputs = self.model(features.to(self.device), output_hidden_states=wants_hidden_states(self.layer))
        frames = select_layer(outputs, self.layer)
        return masked_sums(frames, length_mask(valid.to(self.device), frames.shape[1]))


def load_speech_encoder(spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any,
                        device: str) -> TransformersSpeechEncoder:
    encoder_class = WhisperAudioEncoder if config.model_type in WHISPER_MODEL_TYPES else Wav2Vec2FamilyEncoder
    return encoder_class.load(spec, options, checkpoint, config, device)

