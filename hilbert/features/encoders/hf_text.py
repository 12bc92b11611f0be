"""Text encoders from Hugging Face: BERT/RoBERTa-family ``AutoModel`` + ``AutoTokenizer``.

A text's vector is the mean of the chosen hidden states over its tokens (the attention mask,
so padding never counts; special tokens such as [CLS] and [SEP] do, which is also why an empty
text still gets a vector). Texts longer than the model's maximum length are truncated to it:
only the first ``max_length`` tokens (512 for BERT-base) contribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from hilbert.features.encoders.base import TextEncoder, as_text
from hilbert.features.encoders.hf_checkpoint import HFCheckpoint
from hilbert.features.encoders.pooling import masked_sums, resolve_layer, select_layer, wants_hidden_states
from hilbert.features.encoders.precision import autocast_on
from hilbert.features.encoders.spec import EncoderSpec, Option, layer_choice, plain_text, positive_integer

TEXT_OPTIONS = {
    "layer": Option(layer_choice, "last"),
    "batch_size": Option(positive_integer, 32),
    "revision": Option(plain_text, None),
}

# These number positions from padding_idx + 1, so the first pad_token_id + 1 position slots are unusable.
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"})
_UNSET_MAX_LENGTH = 1_000_000  # tokenizers without a recorded limit report about 1e30
CODE_VERSION = 1  # bump when a change here can change a vector


@dataclass(frozen=True)
class TextSettings:
    """Everything that determines a text encoder's vectors, known without loading weights."""

    model_type: str
    weights: dict
    layer: int | str
    max_length: int
    dim: int

    @classmethod
    def read(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any,
             tokenizer: Any) -> "TextSettings":
        return cls(model_type=config.model_type, weights=checkpoint.identity(),
                   layer=resolve_layer(spec, options["layer"], config.num_hidden_layers + 1),
                   max_length=usable_max_length(tokenizer, config), dim=int(config.hidden_size))

    def fingerprint(self) -> dict:
        return {"encoder": "hf", "model_type": self.model_type, "weights": self.weights, "layer": self.layer,
                "max_length": self.max_length, "dim": self.dim, "code_version": CODE_VERSION}


class TransformerTextEncoder(TextEncoder):
    """Mean-pooled hidden states of a frozen transformer text encoder."""

    def __init__(self, spec: EncoderSpec, settings: TextSettings, model: torch.nn.Module, tokenizer: Any,
                 batch_size: int, device: str):
        self.spec = str(spec)
        self.settings = settings
        self.dim = settings.dim
        self.layer = settings.layer
        self.max_length = settings.max_length
        self.batch_size = batch_size
        self.device = device
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def load(cls, spec: EncoderSpec, options: dict, checkpoint: HFCheckpoint, config: Any,
             device: str) -> "TransformerTextEncoder":
        from transformers import AutoModel, AutoTokenizer

        tokenizer = checkpoint.load(spec, AutoTokenizer, "tokenizer")
        settings = TextSettings.read(spec, options, checkpoint, config, tokenizer)
        model = checkpoint.load(spec, AutoModel, "weights", dtype=torch.float32)
        return cls(spec, settings, model, tokenizer, options["batch_size"], device)

    def fingerprint(self) -> dict:
        return self.settings.fingerprint()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [as_text(text, index) for index, text in enumerate(texts)]
        # Short replies ("yeah", "okay") repeat a lot in transcripts: encode each distinct text once.
        distinct = list(dict.fromkeys(texts))
        vectors = np.zeros((len(distinct), self.dim), dtype=np.float32)
        if distinct:
            tokens = self.tokenizer(distinct, truncation=True, max_length=self.max_length)
            # Batches of similar token counts waste the least compute on padding.
            order = sorted(range(len(distinct)), key=lambda i: len(tokens["input_ids"][i]))
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = self.tokenizer.pad([{key: tokens[key][i] for key in tokens} for i in rows],
                                           return_tensors="pt")
                vectors[rows] = self._mean_hidden_states(batch.to(self.device))
        row_of = {text: row for row, text in enumerate(distinct)}
        return vectors[[row_of[text] for text in texts]].reshape(len(texts), self.dim)

    def _mean_hidden_states(self, batch: Any) -> np.ndarray:
        with torch.inference_mode(), autocast_on(self.device):
            outputs = self.model(**batch, output_hidden_states=wants_hidden_states(self.layer))
            sums, counts = masked_sums(select_layer(outputs, self.layer), batch["attention_mask"])
        return (sums / counts.clamp(min=1)[:, None]).cpu().numpy()


def usable_max_length(tokenizer: Any, config: Any) -> int:
    """The longest token sequence both the tokenizer and the position embeddings allow."""
    limits = []
    if tokenizer.model_max_length < _UNSET_MAX_LENGTH:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if config.model_type in _POSITIONS_AFTER_PADDING:
            positions -= config.pad_token_id + 1
        limits.append(int(positions))
    return min(limits) if limits else 512
