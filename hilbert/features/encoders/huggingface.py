"""``hf:<model id or folder>``: one registry kind for Hugging Face audio and text encoders.

The checkpoint's ``model_type`` says which modality it is, so ``hf:`` in an audio slot builds a
speech encoder and in a text slot a text encoder, and a model in the wrong slot is an error
that says so. A text checkpoint that is a sentence-transformers folder (``modules.json``) is
encoded with its own pooling, normalisation and length limit (``sentence_transformers.py``).
Options are checked before anything is loaded, so a typo fails at once. The fingerprint
functions read only the config, the preprocessor (or tokenizer), a sentence-transformers folder's
module configs and the weights' identity, so a driver can plan the feature cache without loading
(or having room for) the model.
"""

from __future__ import annotations

from typing import Any, Mapping

from hilbert.features.encoders.base import AudioEncoder, TextEncoder
from hilbert.features.encoders.hf_checkpoint import HFCheckpoint
from hilbert.features.encoders.hf_speech import SPEECH_OPTIONS, SpeechSettings, load_speech_encoder
from hilbert.features.encoders.hf_text import TEXT_OPTIONS, TextSettings, TransformerTextEncoder
from hilbert.features.encoders.registry import register_audio_encoder, register_text_encoder
from hilbert.features.encoders.sentence_transformers import SentenceRecipe, read_recipe
from hilbert.features.encoders.spec import EncoderSpec, Option, read_options


def open_checkpoint(spec: EncoderSpec, accepted: Mapping[str, Option],
                    modality: str) -> tuple[dict, HFCheckpoint, Any]:
    """Options, checkpoint and config of ``spec``, checked to be a ``modality`` model."""
    options = read_options(spec, accepted)
    checkpoint = HFCheckpoint.from_spec(spec, options["revision"])
    config = checkpoint.load_config(spec)
    checkpoint.require_modality(spec, config, modality)
    return options, checkpoint, config


def open_text_checkpoint(spec: EncoderSpec) -> tuple[dict, HFCheckpoint, Any, SentenceRecipe]:
    """Like :func:`open_checkpoint` for a text model, with its sentence-embedding recipe; the
    checkpoint is the transformer inside a sentence-transformers folder."""
    options = read_options(spec, TEXT_OPTIONS)
    folder = HFCheckpoint.from_spec(spec, options["revision"])
    recipe = read_recipe(spec, folder)
    checkpoint = folder.inside(recipe.transformer_folder)
    config = checkpoint.load_config(spec)
    checkpoint.require_modality(spec, config, "text")
    return options, checkpoint, config, recipe


def huggingface_audio_fingerprint(spec: EncoderSpec) -> dict:
    # transformers is imported by the hf: encoders only (here and in hf_*.py): it takes seconds,
    # and logmel / hashngram never need it.
    from transformers import AutoFeatureExtractor

    options, checkpoint, config = open_checkpoint(spec, SPEECH_OPTIONS, "audio")
    feature_extractor = checkpoint.load(spec, AutoFeatureExtractor, "feature extractor")
    return SpeechSettings.read(spec, options, checkpoint, config, feature_extractor).fingerprint()


def huggingface_text_fingerprint(spec: EncoderSpec) -> dict:
    from transformers import AutoTokenizer

    options, checkpoint, config, recipe = open_text_checkpoint(spec)
    tokenizer = checkpoint.load(spec, AutoTokenizer, "tokenizer")
    return TextSettings.read(spec, options, checkpoint, config, tokenizer, recipe).fingerprint()


@register_audio_encoder("hf", fingerprint=huggingface_audio_fingerprint)
def build_huggingface_audio_encoder(spec: EncoderSpec, device: str) -> AudioEncoder:
    options, checkpoint, config = open_checkpoint(spec, SPEECH_OPTIONS, "audio")
    return load_speech_encoder(spec, options, checkpoint, config, device)


@register_text_encoder("hf", fingerprint=huggingface_text_fingerprint)
def build_huggingface_text_encoder(spec: EncoderSpec, device: str) -> TextEncoder:
    options, checkpoint, config, recipe = open_text_checkpoint(spec)
    return TransformerTextEncoder.load(spec, options, checkpoint, config, recipe, device)
