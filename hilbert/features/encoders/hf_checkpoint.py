"""A Hugging Face checkpoint as the registry sees it: where it is, what it is, and which weights.

``hf:<name>`` names either a Hub model id or a local folder written by ``save_pretrained``. Its
config's ``model_type`` decides whether it is an audio or a text encoder, before any weights are
loaded. Its identity for the feature cache is the Hub commit it resolved to or, for a folder
(or a Hub cache that does not record commits), a SHA-256 over the files that define its outputs.
A checkpoint may sit in a ``subfolder`` of what ``name`` names (the transformer module of an
older sentence-transformers folder, ``0_Transformer/``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from hilbert.features.encoders.spec import EncoderSpec, EncoderSpecError

# wav2vec2-style models: raw waveform in (``input_values``), a strided conv front end whose
# output length the model computes (``_get_feat_extract_output_lengths``).
SPEECH_MODEL_TYPES = frozenset({
    "wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "sew", "sew-d",
})
WHISPER_MODEL_TYPES = frozenset({"whisper"})
TEXT_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "distilbert", "albert", "electra",
    "deberta", "deberta-v2", "mpnet", "modernbert",
    # Encoder-decoder models of which only the encoder is loaded (hf_text.ENCODER_ONLY_CLASSES).
    "t5", "mt5", "umt5",
})

# Weights no hidden state goes through: a pretraining or fine-tuning head's pooler (BERT-style
# checkpoints saved from a masked-LM head lack it) and wav2vec2's mask embedding (pretraining only).
_UNUSED_BY_HIDDEN_STATES = ("pooler.", "masked_spec_embed")
# The files whose contents can change what a checkpoint outputs (weights, configs, vocabularies).
_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".pt", ".pth", ".msgpack", ".h5", ".tiktoken")


@dataclass(frozen=True)
class HFCheckpoint:
    """A Hub model id or a local folder, at an optional Hub revision (branch, tag or commit)."""

    name: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def from_spec(cls, spec: EncoderSpec, revision: str | None) -> "HFCheckpoint":
        if not spec.name:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: name the model, as in 'hf:facebook/wav2vec2-base' or 'hf:/path/to/folder'"
            )
        checkpoint = cls(spec.name, revision)
        if revision is not None and checkpoint.is_local:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: 'revision' selects a Hub commit, but {spec.name!r} is a local folder; "
                "drop the option"
            )
        return checkpoint

    @property
    def is_local(self) -> bool:
        return Path(self.name).expanduser().is_dir()

    @property
    def location(self) -> str:
        return str(Path(self.name).expanduser()) if self.is_local else self.name

    def inside(self, subfolder: str) -> "HFCheckpoint":
        """The checkpoint in ``subfolder`` of this one ("" is this one)."""
        return HFCheckpoint(self.name, self.revision, subfolder)

    def optional_file(self, filename: str) -> Path | None:
        """The local path of ``filename`` (relative to the checkpoint's root, not its subfolder), or
        None when the checkpoint has no such file or it cannot be fetched."""
        from transformers.utils import cached_file

        path = cached_file(self.location, filename, revision=self.revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        return Path(path) if path else None

    def load_config(self, spec: EncoderSpec) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.location, revision=self.revision, subfolder=self.subfolder)
        except (OSError, ValueError) as error:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: cannot load a model config from {self.name!r} "
                f"(a Hub model id, or a folder holding config.json; offline runs need the model in the local cache): "
                f"{error}"
            ) from error

    def load(self, spec: EncoderSpec, auto_class: Any, what: str, **kwargs: Any) -> Any:
        """``auto_class.from_pretrained`` on this checkpoint, failing with a message that says what
        could not be loaded from where (a missing preprocessor file, a truncated weights file...)."""
        try:
            return auto_class.from_pretrained(self.location, revision=self.revision, subfolder=self.subfolder, **kwargs)
        except Exception as error:  # transformers, safetensors and tokenizers each raise their own types
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: cannot load the {what} of {self.name!r}: {error}"
            ) from error

    def load_weights(self, spec: EncoderSpec, auto_class: Any, **kwargs: Any) -> Any:
        """The model, refused when the checkpoint lacks weights its hidden states are computed
        with: transformers would fill those with random numbers and only warn, and every vector
        would then be noise that still looks like features."""
        model, info = self.load(spec, auto_class, "weights", output_loading_info=True, **kwargs)
        missing = [key for key in info["missing_keys"] if not key.startswith(_UNUSED_BY_HIDDEN_STATES)]
        wrong = [str(key[0] if isinstance(key, tuple) else key) for key in info.get("mismatched_keys", [])]
        if missing or wrong:
            shown = ", ".join((missing + wrong)[:3]) + (", ..." if len(missing) + len(wrong) > 3 else "")
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: {self.name!r} lacks {len(missing)} and has {len(wrong)} mis-shaped "
                f"weight(s) of the {type(model).__name__} it describes ({shown}); a partial or mismatched checkpoint "
                "would give random features: check that the folder holds the whole model"
            )
        return model

    def modality(self, config: Any) -> str | None:
        """``"audio"``, ``"text"``, or None for model types this registry does not encode with."""
        if config.model_type in SPEECH_MODEL_TYPES or config.model_type in WHISPER_MODEL_TYPES:
            return "audio"
        if config.model_type in TEXT_MODEL_TYPES:
            return "text"
        return None

    def require_modality(self, spec: EncoderSpec, config: Any, wanted: str) -> None:
        found = self.modality(config)
        if found == wanted:
            return
        if found is None:
            raise EncoderSpecError(
                f"encoder spec {str(spec)!r}: model_type {config.model_type!r} is not supported; audio encoders take "
                f"{', '.join(sorted(SPEECH_MODEL_TYPES | WHISPER_MODEL_TYPES))}; text encoders take "
                f"{', '.join(sorted(TEXT_MODEL_TYPES))}"
            )
        article = "an" if found == "audio" else "a"
        raise EncoderSpecError(
            f"encoder spec {str(spec)!r}: {self.name!r} is {article} {found} model (model_type {config.model_type!r}), "
            f"so it cannot be the {wanted} encoder; use it as the {found} encoder instead"
        )

    def identity(self) -> dict[str, str]:
        """The Hub commit when known, else the SHA-256 of the checkpoint's files."""
        from transformers.utils import cached_file
        from transformers.utils.hub import extract_commit_hash

        config_path = cached_file(self.location, "config.json", revision=self.revision, subfolder=self.subfolder)
        commit = extract_commit_hash(config_path, None)
        if commit:
            return {"repository": self.name, "commit": commit}
        # A folder's path differs between machines, so only its contents identify it.
        return {"sha256": folder_sha256(Path(config_path).parent)}


def folder_sha256(folder: Path) -> str:
    """SHA-256 over the names and contents of the files in ``folder`` that define a checkpoint."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _IDENTITY_SUFFIXES and not path.name.startswith("."):
            stat = path.stat()
            digest.update(path.name.encode("utf-8") + b"\0")
            digest.update(_file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns).encode("ascii"))
    return digest.hexdigest()


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Size and mtime are part of the cache key, so an edited file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
