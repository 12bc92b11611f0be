"""Text encoders from Hugging Face: BERT-family ``AutoModel``s (BERT, RoBERTa, XLM-R, DeBERTa, ...),
the encoder of T5-family encoder-decoders, and sentence-transformers folders.

Pooling. A text's vector pools the chosen hidden states (``layer``) over its tokens as the
checkpoint's recipe says (:mod:`sentence_transformers`): by default the mean over its real
tokens (the attention mask, so padding never counts; special tokens such as [CLS] and [SEP], or
T5's ``</s>``, do, which is also why an empty text still gets a vector); a sentence-transformers
folder may ask for the first token instead (``cls``) and for L2 normalisation (``Normalize``).
With ``layer=all`` every hidden state is pooled (and normalised) on its own and the vectors are
laid side by side: ``[layers * dim]`` per text, layer 0 (the embeddings) first.

Length. The usable maximum length is the smallest of the tokenizer's ``model_max_length``, the
model's position table (``max_position_embeddings``, less the slots RoBERTa-style models reserve)
and a sentence-transformers folder's ``max_seq_length``, or 512 when none is recorded. T5-family
models have relative positions and no table: their limit is the tokenizer's ``model_max_length``
(512 for t5-base and flan-t5), else 512, the length they were pre-trained on; they would accept
longer inputs, but nothing says what their states mean there.

Long texts are split, never truncated. A text longer than the maximum length becomes
consecutive, non-overlapping windows of at most ``max_length`` tokens each, special tokens added
to every window (the tokenizer's own overflow windows); each window is encoded on its own, and the
text's vector is the token-count-weighted mean of its windows' pooled vectors. With mean pooling
that is the mean over all the text's real tokens (every window's special tokens included), the
same rule as for a short text; with ``cls`` pooling it is the token-weighted mean of the windows'
first-token vectors. Normalisation, if the recipe has it, applies once, to that mean. A window
sees only its own tokens, so a long text's vector is what the model gives at its own length, not
what a model without a limit would give.

T5. ``T5EncoderModel`` (``MT5EncoderModel``, ``UMT5EncoderModel``) loads only the encoder of a full
checkpoint: the decoder's weights are never materialised. Its layers are counted by
``config.num_layers`` and its width is ``config.d_model``. On CUDA it runs under bfloat16 autocast
(float32 where the GPU has no bfloat16), because T5's feed-forward activations overflow float16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from hilbert.features.encoders.base import TextEncoder, as_text
from hilbert.features.encoders.hf_checkpoint import HFCheckpoint
from hilbert.features.encoders.pooling import (
    first_valid,
    layers_kept,
    masked_sums,
    resolve_layer,
    select_layer,
    wants_hidden_states,
)
from hilbert.features.encoders.precision import autocast_on, checked_precision, precision_choice
from hilbert.features.encoders.sentence_transformers import SentenceRecipe
from hilbert.features.encoders.spec import (
    EncoderSpec,
    EncoderSpecError,
    Option,
    layer_choice,
    plain_text,
    positive_integer,
)

TEXT_OPTIONS = {
    "layer": Option(layer_choice, "last"),
    "batch_size": Option(positive_integer, 32),
    "precision": Option(precision_choice, "auto"),  # auto: float16 autocast on CUDA (T5: bfloat16), float32 on CPU
    "revision": Option(plain_text, None),
}

# Encoder-decoder model types: the transformers class that holds their encoder alone.
ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# These number positions from padding_idx + 1, so the first pad_token_id + 1 position slots are unusable.
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})
_UNSET_MAX_LENGTH = 1_000_000  # tokenizers without a recorded limit report about 1e30
DEFAULT_MAX_LENGTH = 512  # BERT's and T5's pre-training length, for checkpoints that record none
# 2: long texts are split into windows instead of truncated; sentence-transformers recipes.
CODE_VERSION = 2  # bump when a change here can change a vector


@dataclass(frozen=True)
class TextSettings:
    """Everything that determines a text encoder's vectors, known without loading weights."""

    model_type: str
    weights: dict
    layer: int | str
    max_length: int
    dim: int  # one hidden state's width
    recipe: SentenceRecipe
    layers: int = 1  # hidden states side by side in each vector: all of them for layer=all

    @classmethod
    def read(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any, tokenizer: Any,
             recipe: SentenceRecipe) -> "TextSettings":
        require_fast_tokenizer(spec, checkpoint, tokenizer)
        hidden_states = encoder_layer_count(config) + 1
        return cls(model_type=config.model_type, weights=checkpoint.identity(),
                   layer=resolve_layer(spec, options["layer"], hidden_states),
                   max_length=usable_max_length(tokenizer, config, recipe.max_seq_length), dim=hidden_size(config),
                   recipe=recipe, layers=layers_kept(options["layer"], hidden_states))

    def fingerprint(self) -> dict:
        # "layers" only for layer=all, so every other spec keeps the cache key it had.
        layers = {"layers": self.layers} if self.layer == "all" else {}
        return {"encoder": "hf", "model_type": self.model_type, "weights": self.weights, "layer": self.layer,
                "max_length": self.max_length, "dim": self.dim, **layers, **self.recipe.fingerprint(),
                "code_version": CODE_VERSION}


class TransformerTextEncoder(TextEncoder):
    """Pooled hidden states of a frozen transformer text encoder, long texts in windows."""

    def __init__(self, spec: EncoderSpec, settings: TextSettings, model: torch.nn.Module, tokenizer: Any,
                 batch_size: int, device: str, precision: str = "auto"):
        self.spec = str(spec)
        self.settings = settings
        self.dim = settings.dim * settings.layers
        self.layers = settings.layers
        self.layer = settings.layer
        self.max_length = settings.max_length
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def load(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any, recipe: SentenceRecipe,
             device: str) -> "TransformerTextEncoder":
        from transformers import AutoTokenizer

        precision = checked_precision(spec, options["precision"], device)
        if precision == "float16" and config.model_type in ENCODER_ONLY_CLASSES:
            raise EncoderSpecError(f"encoder spec {str(spec)!r}: precision=float16 overflows T5's feed-forward "
                                   "activations (it was trained in bfloat16); use bfloat16 or float32")
        tokenizer = checkpoint.load(spec, AutoTokenizer, "tokenizer")
        settings = TextSettings.read(spec, options, checkpoint, config, tokenizer, recipe)
        model = checkpoint.load_weights(spec, encoder_class(config), dtype=torch.float32)
        return cls(spec, settings, model, tokenizer, options["batch_size"], device, precision)

    def fingerprint(self) -> dict:
        return self.settings.fingerprint()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [as_text(text, index) for index, text in enumerate(texts)]
        # Short replies ("yeah", "okay") repeat a lot in transcripts: encode each distinct text once.
        distinct = list(dict.fromkeys(texts))
        vectors = self._encode_distinct(distinct)
        row_of = {text: row for row, text in enumerate(distinct)}
        return vectors[[row_of[text] for text in texts]].reshape(len(texts), self.dim)

    def _encode_distinct(self, texts: list[str]) -> np.ndarray:
        sums = np.zeros((len(texts), self.dim), dtype=np.float64)
        counts = np.zeros(len(texts), dtype=np.float64)
        if texts:
            windows, owners = self._windows(texts)
            # Batches of similar token counts waste the least compute on padding.
            order = np.argsort([len(ids) for ids in windows["input_ids"]], kind="stable")
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer.pad([{key: windows[key][i] for key in windows} for i in rows],
                                           return_tensors="pt")
                window_sums, window_counts = self._pooled_sums(batch.to(self.device))
                np.add.at(sums, owners[rows], window_sums)
                np.add.at(counts, owners[rows], window_counts)
        vectors = sums / np.maximum(counts, 1)[:, None]
        if self.settings.recipe.normalize:
            # each hidden state on its own, so layer=all holds what layer=<i> gives for every i
            layered = vectors.reshape(len(texts), self.layers, self.settings.dim)
            layered /= np.maximum(np.linalg.norm(layered, axis=2, keepdims=True), 1e-12)
        return vectors.astype(np.float32)

    def _windows(self, texts: list[str]) -> tuple[dict[str, list], np.ndarray]:
        """Every text's windows of at most ``max_length`` tokens, special tokens added to each, and
        for each window the index of its text."""
        if self.settings.recipe.lowercase:
            texts = [text.lower() for text in texts]
        tokens = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_overflowing_tokens=True)
        owners = np.asarray(tokens["overflow_to_sample_mapping"], dtype=np.int64)
        return {key: value for key, value in tokens.items() if key != "overflow_to_sample_mapping"}, owners

    def _pooled_sums(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per window: its pooled vector times its token count, and that count, so that windows
        add up to a token-weighted mean."""
        mask = batch["attention_mask"]
        with torch.inference_mode(), self._autocast():
            outputs = self.model(**batch, output_hidden_states=wants_hidden_states(self.layer))
            states = select_layer(outputs, self.layer)
            if self.settings.recipe.pooling == "cls":
                counts = mask.sum(dim=1).float()
                sums = first_valid(states, mask) * counts[:, None]
            else:
                sums, counts = masked_sums(states, mask)
        return sums.double().cpu().numpy(), counts.double().cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "auto":
            return autocast_on(self.device, self.precision)
        if self.settings.model_type in ENCODER_ONLY_CLASSES and self.device.startswith("cuda"):
            # T5 was trained in bfloat16 and its feed-forward activations overflow float16.
            if torch.cuda.is_bf16_supported():
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()
        return autocast_on(self.device)


def encoder_class(config: Any) -> Any:
    """The transformers class that loads this text model's encoder: ``T5EncoderModel`` and its
    kin for encoder-decoders (the decoder is never loaded), ``AutoModel`` otherwise."""
    import transformers

    return getattr(transformers, ENCODER_ONLY_CLASSES.get(config.model_type, "AutoModel"))


def encoder_layer_count(config: Any) -> int:
    """Transformer layers of the encoder (its hidden states are one more: the embeddings)."""
    if config.model_type in ENCODER_ONLY_CLASSES:
        return int(config.num_layers)  # the encoder's; the decoder has num_decoder_layers
    return int(config.num_hidden_layers)


def hidden_size(config: Any) -> int:
    return int(config.d_model if config.model_type in ENCODER_ONLY_CLASSES else config.hidden_size)


def usable_max_length(tokenizer: Any, config: Any, max_seq_length: int | None = None) -> int:
    """The longest window the tokenizer, the position embeddings (when the model has a table)
    and a sentence-transformers ``max_seq_length`` all allow."""
    limits = [max_seq_length] if max_seq_length else []
    if tokenizer.model_max_length < _UNSET_MAX_LENGTH:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if config.model_type in _POSITIONS_AFTER_PADDING:
            positions -= config.pad_token_id + 1
        limits.append(int(positions))
    return min(limits) if limits else DEFAULT_MAX_LENGTH


def require_fast_tokenizer(spec: EncoderSpec, checkpoint: HFCheckpoint, tokenizer: Any) -> None:
    # Long texts are split with the fast tokenizers' overflow windows; Python tokenizers lack them.
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: the tokenizer of {checkpoint.name!r} ({type(tokenizer).__name__}) is not a "
            "fast (tokenizers-backed) tokenizer, which hf: needs to split long texts into windows; save the checkpoint "
            "with a tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder))"
        )
