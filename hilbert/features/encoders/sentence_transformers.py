"""How a checkpoint turns token states into one vector: its sentence-embedding recipe.

A plain Hugging Face checkpoint has no recipe of its own, so ``hf:`` uses the mean over real
tokens. A sentence-transformers folder (a Hub repository or a ``SentenceTransformer.save``
folder) says how it was trained to be used, and ``hf:`` follows it:

- ``modules.json`` lists the modules in order: a ``Transformer`` (its weights at the folder's
  root, ``path ""``, or in a subfolder such as ``0_Transformer/`` in older folders), a
  ``Pooling`` and optionally a ``Normalize`` (L2 normalisation of the pooled vector). Any other
  module (``Dense``, ``LayerNorm``, a custom one) changes the vectors in a way ``hf:`` does not
  reproduce, so such folders are refused rather than encoded differently from their own recipe.
- ``<pooling path>/config.json`` names the pooling: ``mean`` (over real tokens) and ``cls``
  (the first token) are supported, either as the legacy ``pooling_mode_*_token(s)`` booleans or as
  ``pooling_mode``; every other mode (``max``, ``mean_sqrt_len_tokens``, ``weightedmean``,
  ``lasttoken``, several at once) is refused with a message that says so.
- ``sentence_bert_config.json`` (beside the transformer's weights) gives ``max_seq_length``, the
  longest window the model is used with (256 for all-MiniLM-L6-v2, below BERT's 512), and
  ``do_lower_case``. Where sentence-transformers truncates a longer text, ``hf:`` encodes it in
  windows of that length (:mod:`hf_text`), so the two agree on every text that fits.

Nothing here loads weights: reading the recipe is part of computing a fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hilbert.features.encoders.hf_checkpoint import HFCheckpoint
from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError

POOLING_MODES = ("mean", "cls")
# Legacy Pooling config keys (sentence-transformers < 5) and the mode each turns on.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentenceRecipe:
    """Pooling, normalisation and length limit of a checkpoint's sentence embeddings."""

    pooling: str = "mean"  # "mean": over the real tokens; "cls": the first real token
    normalize: bool = False  # L2-normalise the pooled vector
    max_seq_length: int | None = None  # None: the model's own limit
    lowercase: bool = False  # lower-case texts before tokenizing
    transformer_folder: str = ""  # where the transformer's weights sit inside the checkpoint
    sentence_transformers: bool = False  # read from a sentence-transformers folder

    def fingerprint(self) -> dict:
        return {"pooling": self.pooling, "normalize": self.normalize, "lowercase": self.lowercase}


PLAIN_RECIPE = SentenceRecipe()


def read_recipe(spec: EncoderSpec, checkpoint: HFCheckpoint) -> SentenceRecipe:
    """The recipe of ``checkpoint``: its sentence-transformers modules if it has ``modules.json``,
    otherwise :data:`PLAIN_RECIPE`."""
    modules_path = checkpoint.optional_file("modules.json")
    if modules_path is None:
        return PLAIN_RECIPE
    listed = _read_json(spec, modules_path)
    if not isinstance(listed, list) or not all(isinstance(module, dict) for module in listed):
        raise EncoderSpecError(f"encoder spec {str(spec)!r}: modules.json of {checkpoint.name!r} is not a list of "
                               "modules ({'type': ..., 'path': ...})")
    modules = {}
    for module in listed:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in ("Transformer", "Pooling", "Normalize"):
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: {checkpoint.name!r} is a sentence-transformers folder whose modules.json "
                f"lists a {module.get('type')!r} module; hf: applies only Transformer, Pooling and Normalize modules, "
                "so it would not reproduce this model's embeddings"
            )
        if kind in modules:
            raise EncoderSpecError(f"encoder spec {str(spec)!r}: modules.json of {checkpoint.name!r} lists two {kind} "
                                   "modules; hf: supports one of each")
        modules[kind] = str(module.get("path", "")).strip("/")
    if "Transformer" not in modules or "Pooling" not in modules:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: modules.json of {checkpoint.name!r} lists no "
            f"{'Transformer' if 'Transformer' not in modules else 'Pooling'} module"
        )
    transformer = modules["Transformer"]
    settings = _optional_json(spec, checkpoint, _join(transformer, "sentence_bert_config.json"))
    max_seq_length = settings.get("max_seq_length")
    return SentenceRecipe(
        pooling=_pooling_mode(spec, checkpoint, modules["Pooling"]),
        normalize="Normalize" in modules,
        max_seq_length=int(max_seq_length) if max_seq_length else None,
        lowercase=bool(settings.get("do_lower_case", False)),
        transformer_folder=transformer,
        sentence_transformers=True,
    )


def _pooling_mode(spec: EncoderSpec, checkpoint: HFCheckpoint, folder: str) -> str:
    config = _optional_json(spec, checkpoint, _join(folder, "config.json"))
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: {_join(folder, 'config.json')} of {checkpoint.name!r} asks for pooling "
            f"{' + '.join(map(str, modes))}; hf: supports one of {', '.join(POOLING_MODES)} "
            "(mean over real tokens, or the first token)"
        )
    return modes[0]


def _optional_json(spec: EncoderSpec, checkpoint: HFCheckpoint, filename: str) -> dict:
    path = checkpoint.optional_file(filename)
    return _read_json(spec, path) if path is not None else {}


def _read_json(spec: EncoderSpec, path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EncoderSpecError(f"encoder spec {str(spec)!r}: cannot read {path}: {error}") from error


def _join(folder: str, filename: str) -> str:
    return f"{folder}/{filename}" if folder else filename
