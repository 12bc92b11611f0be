"""``layer=all`` and the learned weighting over layers: every hidden state's pooled vector per
segment from tiny ``hf:`` models, refused where an encoder has no layers, and the model's
softmax-weighted sum over them (the SUPERB / s3prl ``Featurizer``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hilbert.features.encoders import (  # noqa: E402
    EncoderSpecError,
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
)
from hilbert.features.batches import layered_inputs  # noqa: E402
from hilbert.features.cache import FeatureSet  # noqa: E402
from test_encoders import HIDDEN, noise, save_tiny_bert, save_tiny_speech_model, save_tiny_whisper, tone  # noqa: E402
from test_text_encoders import TEXTS, save_tiny_sentence_transformer, save_tiny_text_model  # noqa: E402

HIDDEN_STATES = 3  # the tiny models' 2 layers and their embeddings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered-checkpoints")
    folders = {"wav2vec2": save_tiny_speech_model(root / "wav2vec2", "wav2vec2"),
               "whisper": save_tiny_whisper(root / "whisper"),
               "bert": save_tiny_bert(root / "bert"),
               "t5": save_tiny_text_model(root / "t5", "t5")}
    folders["sentence"] = save_tiny_sentence_transformer(root / "sentence", folders["bert"], normalize=True)
    return folders


def per_layer(build, spec: str, inputs) -> np.ndarray:
    """``[segments, layers, dim]`` from ``layer=<i>`` for every i."""
    return np.stack([build(f"{spec}?layer={i}", device="cpu").encode(inputs) for i in range(HIDDEN_STATES)], axis=1)


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("name", ["wav2vec2", "whisper"])
def test_speech_layer_all_holds_every_layers_pooled_vector(checkpoints, name):
    segments = [tone(220, 0.6), noise(0.8), tone(300, 0.05)]
    encoder = build_audio_encoder(f"hf:{checkpoints[name]}?layer=all", device="cpu")
    vectors = encoder.encode(segments)
    assert encoder.layers == HIDDEN_STATES and encoder.dim == HIDDEN_STATES * HIDDEN
    assert vectors.shape == (3, HIDDEN_STATES * HIDDEN) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors.reshape(3, HIDDEN_STATES, HIDDEN),
                               per_layer(build_audio_encoder, f"hf:{checkpoints[name]}", segments), atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "t5", "sentence"])
def test_text_layer_all_holds_every_layers_pooled_vector(checkpoints, name):
    encoder = build_text_encoder(f"hf:{checkpoints[name]}?layer=all", device="cpu")
    vectors = encoder.encode(TEXTS)
    assert encoder.layers == HIDDEN_STATES and vectors.shape == (len(TEXTS), HIDDEN_STATES * HIDDEN)
    layered = vectors.reshape(len(TEXTS), HIDDEN_STATES, HIDDEN)
    np.testing.assert_allclose(layered, per_layer(build_text_encoder, f"hf:{checkpoints[name]}", TEXTS), atol=1e-5)
    if name == "sentence":  # a normalising folder normalises each layer on its own
        np.testing.assert_allclose(np.linalg.norm(layered, axis=2), 1.0, atol=1e-5)


def test_layer_all_enters_the_fingerprint_and_other_layers_keep_theirs(checkpoints):
    spec = f"hf:{checkpoints['bert']}"
    every = encoder_fingerprint("text", f"{spec}?layer=all")
    assert every["layer"] == "all" and every["layers"] == HIDDEN_STATES
    assert every != encoder_fingerprint("text", f"{spec}?layer=avg")
    assert "layers" not in encoder_fingerprint("text", spec)
    assert "layers" not in encoder_fingerprint("text", f"{spec}?layer=1")
    audio = encoder_fingerprint("audio", f"hf:{checkpoints['wav2vec2']}?layer=all")
    assert audio["layers"] == HIDDEN_STATES
    # what training derives the model's layer fields from
    feature_set = FeatureSet("m", "sha", "a", "t", audio, encoder_fingerprint("text", spec), HIDDEN_STATES * HIDDEN,
                             HIDDEN)
    assert layered_inputs(feature_set) == {"audio_layers": HIDDEN_STATES, "audio_layer_dim": HIDDEN}


@pytest.mark.parametrize("modality, spec, says", [
    ("audio", "logmel?layer=all", "kind 'logmel' has no layers"),
    ("text", "hashngram?layer=all", "kind 'hashngram' has no layers"),
])
def test_layer_all_is_refused_by_encoders_without_layers(modality, spec, says):
    with pytest.raises(EncoderSpecError, match=says):
        encoder_fingerprint(modality, spec)


def test_layer_all_is_refused_by_ct2_which_returns_only_the_last_output(tmp_path):
    pytest.importorskip("ctranslate2")
    with pytest.raises(EncoderSpecError, match="ct2: cannot give layer=all: CTranslate2.*only the encoder's final"):
        encoder_fingerprint("audio", f"ct2:{tmp_path}?layer=all")

