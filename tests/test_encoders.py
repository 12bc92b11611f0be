"""Behaviour of the frozen-encoder registry: spec strings, the classical encoders, and tiny
randomly initialised Hugging Face models saved to tmp folders and loaded through ``hf:<folder>``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hilbert.features.encoders import (  # noqa: E402
    AudioEncoder,
    EncoderSpec,
    EncoderSpecError,
    TextEncoder,
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
    parse_encoder_spec,
    register_audio_encoder,
)

SAMPLE_RATE = 16_000


def tone(frequency: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = amplitude * np.sin(2 * np.pi * frequency * t) + amplitude / 3 * np.sin(4 * np.pi * frequency * t)
    return wave.astype(np.float32)


def noise(seconds: float, seed: int = 0, amplitude: float = 0.1) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- spec strings and the registry

def test_spec_parses_into_kind_name_and_options():
    assert parse_encoder_spec("logmel") == EncoderSpec("logmel", "", {})
    assert parse_encoder_spec("hashngram?dim=1024") == EncoderSpec("hashngram", "", {"dim": "1024"})
    assert parse_encoder_spec("hf:facebook/wav2vec2-base?layer=6") == EncoderSpec(
        "hf", "facebook/wav2vec2-base", {"layer": "6"})
    assert parse_encoder_spec("hf:/abs/path/to/folder?layer=avg&chunk_seconds=20&batch_size=8").options == {
        "layer": "avg", "chunk_seconds": "20", "batch_size": "8"}


def test_canonical_spec_sorts_options():
    assert str(parse_encoder_spec("hf:m?layer=2&batch_size=4&chunk_seconds=5")) == (
        "hf:m?batch_size=4&chunk_seconds=5&layer=2")
    assert build_audio_encoder("logmel?n_mels=32").spec == "logmel?n_mels=32"


@pytest.mark.parametrize("spec", ["", "   ", "LogMel", "hf:", "logmel?", "logmel?n_mels", "logmel?n_mels=",
                                  "logmel?n_mels=64&n_mels=32", "logmel?=3"])
def test_malformed_spec_raises_spec_error(spec):
    with pytest.raises(EncoderSpecError):
        parse_encoder_spec(spec)


def test_unknown_option_error_names_it_and_lists_valid_ones():
    with pytest.raises(EncoderSpecError, match=r"unknown option 'mels'.*valid options: n_mels"):
        build_audio_encoder("logmel?mels=64")


@pytest.mark.parametrize("spec, option", [("logmel?n_mels=abc", "n_mels"), ("logmel?n_mels=4000", "n_mels"),
                                          ("hashngram?dim=0", "dim"), ("hf:any?layer=first", "layer"),
                                          ("hf:any?chunk_seconds=-1", "chunk_seconds"),
                                          ("hf:any?batch_size=1.5", "batch_size")])
def test_bad_option_value_error_names_the_option_and_what_was_expected(spec, option):
    build = build_text_encoder if spec.startswith("hashngram") else build_audio_encoder
    with pytest.raises(EncoderSpecError, match=rf"option {option}=.*expected"):
        build(spec)


def test_unknown_kind_error_lists_registered_kinds():
    with pytest.raises(EncoderSpecError, match=r"audio encoder kinds are .*hf.*logmel"):
        build_audio_encoder("mfcc")


def test_text_kind_in_audio_slot_says_it_is_a_text_encoder():
    with pytest.raises(EncoderSpecError, match="'hashngram' is a text encoder"):
        build_audio_encoder("hashngram")


def test_classical_kinds_take_no_name():
    with pytest.raises(EncoderSpecError, match="takes no name"):
        build_audio_encoder("logmel:big")


def test_hf_needs_a_model_name():
    with pytest.raises(EncoderSpecError, match="name the model"):
        build_audio_encoder("hf?layer=2")


class ConstantEncoder(AudioEncoder):
    """The smallest possible user encoder: every segment maps to the same vector."""

    def __init__(self, spec: str, value: float):
        self.spec, self.sample_rate, self.dim, self.value = spec, 8000, 3, value

    @classmethod
    def from_spec(cls, spec: EncoderSpec, device: str) -> "ConstantEncoder":
        return cls(str(spec), float(spec.options.get("value", 1.0)))

    def fingerprint(self) -> dict:
        return {"encoder": "constant", "value": self.value}

    def encode(self, waveforms):
        return np.full((len(waveforms), self.dim), self.value, dtype=np.float32)


def test_users_can_register_their_own_encoder():
    register_audio_encoder("test-constant")(ConstantEncoder)
    encoder = build_audio_encoder("test-constant?value=2")
    assert isinstance(encoder, ConstantEncoder)
    assert encoder.encode([np.zeros(10)]).tolist() == [[2.0, 2.0, 2.0]]


def test_registering_a_taken_kind_with_another_factory_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_audio_encoder("logmel")(ConstantEncoder)


# ---------------------------------------------------------------- logmel

@pytest.fixture(scope="module")
def logmel() -> AudioEncoder:
    return build_audio_encoder("logmel", device="cpu")


def feature(encoder, vector: np.ndarray, name: str) -> float:
    return float(vector[encoder.feature_names.index(name)])


def test_logmel_gives_one_vector_of_the_documented_size_per_segment(logmel):
    vectors = logmel.encode([tone(200), noise(0.5), tone(300, 2.0)])
    assert vectors.shape == (3, logmel.dim) and vectors.dtype == np.float32
    assert logmel.dim == 2 * 64 + 12 == len(logmel.feature_names)
    assert build_audio_encoder("logmel?n_mels=32").dim == 2 * 32 + 12
    assert logmel.sample_rate == SAMPLE_RATE


def test_logmel_is_deterministic(logmel):
    segments = [tone(180), noise(1.0, seed=3)]
    np.testing.assert_array_equal(logmel.encode(segments), build_audio_encoder("logmel").encode(segments))


@pytest.mark.parametrize("segment", [np.zeros(0), np.zeros(1), tone(200, 0.01), np.zeros(SAMPLE_RATE),
                                     noise(1.0), np.sign(tone(100)), 1e-8 * noise(1.0), tone(200, 0.3) * 0],
                         ids=["empty", "one-sample", "10ms", "silence", "noise", "clipped", "near-silence", "zeros"])
def test_logmel_is_finite_on_degenerate_segments(logmel, segment):
    assert np.isfinite(logmel.encode([segment])).all()


def test_logmel_pitch_feature_follows_f0(logmel):
    low, high = logmel.encode([tone(120), tone(220)])
    assert feature(logmel, low, "f0_mean_octaves") == pytest.approx(np.log2(1.2), abs=0.03)
    assert feature(logmel, high, "f0_mean_octaves") == pytest.approx(np.log2(2.2), abs=0.03)
    assert feature(logmel, low, "voiced_fraction") > 0.9
    assert not np.allclose(low, high)


def test_logmel_calls_noise_and_silence_unvoiced(logmel):
    for vector in logmel.encode([noise(1.0), np.zeros(SAMPLE_RATE)]):
        assert feature(logmel, vector, "voiced_fraction") < 0.05


def test_logmel_energy_peaks_count_syllable_rate(logmel):
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    four_per_second = tone(150, 3.0) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    vector = logmel.encode([four_per_second.astype(np.float32)])[0]
    assert feature(logmel, vector, "energy_peaks_per_second") == pytest.approx(4.0, abs=0.5)


def test_logmel_rejects_stereo_waveforms(logmel):
    with pytest.raises(ValueError, match="mono"):
        logmel.encode([np.zeros((2, 1600), dtype=np.float32)])


def test_logmel_fingerprint_follows_options(logmel):
    assert json.dumps(logmel.fingerprint())
    assert logmel.fingerprint() == build_audio_encoder("logmel?n_mels=64").fingerprint()
    assert logmel.fingerprint() != build_audio_encoder("logmel?n_mels=32").fingerprint()


# ---------------------------------------------------------------- hashngram

@pytest.fixture(scope="module")
def hashngram() -> TextEncoder:
    return build_text_encoder("hashngram?dim=1024")


def test_hashngram_identical_text_gives_identical_unit_vector(hashngram):
    first, second = hashngram.encode(["the cat sat on the mat", "the cat sat on the mat"])
    np.testing.assert_array_equal(first, second)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-6)
    assert hashngram.dim == 1024 and first.dtype == np.float32


def test_hashngram_normalises_unicode_and_case(hashngram):
    plain, fancy = hashngram.encode(["fullwidth cafe\u0301 ok", "ＦＵＬＬＷＩＤＴＨ CAFÉ OK"])
    np.testing.assert_allclose(plain, fancy, atol=1e-6)


def test_hashngram_empty_or_wordless_text_is_the_zero_vector(hashngram):
    vectors = hashngram.encode(["", "   ", "?!"])
    assert vectors.shape == (3, 1024) and not vectors.any()


def test_hashngram_similar_texts_are_closer_than_unrelated_ones(hashngram):
    cat, cats, market = hashngram.encode(["the cat sat on the mat", "the cats sat on a mat",
                                          "stock markets fell sharply today"])
    assert cosine(cat, cats) > 0.5 > cosine(cat, market)


def test_hashngram_works_on_any_script(hashngram):
    vectors = hashngram.encode(["Привет, мир", "こんにちは世界", "مرحبا بالعالم 🙂"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_hashngram_is_the_same_in_a_process_with_another_hash_seed(hashngram):
    texts = ["Hello there, general Kenobi!", "ünïcödé façade"]
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = ("import json; from hilbert.features.encoders import build_text_encoder; "
            f"vectors = build_text_encoder('hashngram?dim=1024').encode({texts!r}); "
            "print(json.dumps([hash('probe'), vectors.tolist()]))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout
    child_hash, child_vectors = json.loads(output)
    assert child_hash != hash("probe"), "the child must salt Python's hash differently for this test to mean anything"
    np.testing.assert_array_equal(np.array(child_vectors, dtype=np.float32), hashngram.encode(texts))


def test_hashngram_fingerprint_follows_dim(hashngram):
    assert hashngram.fingerprint() != build_text_encoder("hashngram").fingerprint()
    assert json.dumps(hashngram.fingerprint())


# ---------------------------------------------------------------- tiny Hugging Face checkpoints

HIDDEN = 32
# 200 output frames per second (real wav2vec2: 50) and a 60-sample receptive field (real: 400).
TINY_CONV = {"conv_dim": (16, 16, 16), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 4),
             "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
TINY_TRANSFORMER = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def save_tiny_speech_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A randomly initialised 2-layer speech model plus its feature extractor, saved to ``folder``."""
    from transformers import (HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model,
                              WavLMConfig, WavLMModel)

    torch.manual_seed(seed)
    layer_norm = {"feat_extract_norm": "layer", "do_stable_layer_norm": True}
    if model_type == "wav2vec2":  # layer-norm front end: batches pad, with an attention mask
        model = Wav2Vec2Model(Wav2Vec2Config(**TINY_TRANSFORMER, **TINY_CONV, **layer_norm))
    elif model_type == "hubert":  # group-norm front end, like HuBERT-base: batches hold equal lengths
        model = HubertModel(HubertConfig(**TINY_TRANSFORMER, **TINY_CONV, feat_extract_norm="group"))
    else:
        model = WavLMModel(WavLMConfig(**TINY_TRANSFORMER, **TINY_CONV, **layer_norm, num_buckets=16,
                                       max_bucket_distance=64))
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, do_normalize=True).save_pretrained(folder)
    return folder


WHISPER_WINDOW_SECONDS = 2  # a short window keeps the tiny model fast; real Whisper uses 30


def save_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    mel_frames = WHISPER_WINDOW_SECONDS * SAMPLE_RATE // 160
    config = WhisperConfig(d_model=HIDDEN, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=mel_frames // 2, max_target_positions=16, vocab_size=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, chunk_length=WHISPER_WINDOW_SECONDS).save_pretrained(folder)
    return folder


TINY_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "cat", "sat",
                   "on", "mat", "dog", "ran", "##s", "##ed", ".", ","]


def save_tiny_bert(folder: Path, seed: int = 0, max_positions: int = 64) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = folder / "vocab.txt"
    vocabulary.write_text("\n".join(TINY_VOCABULARY) + "\n")
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(TINY_VOCABULARY), max_position_embeddings=max_positions,
                         **TINY_TRANSFORMER)).save_pretrained(folder)
    BertTokenizer(vocab=str(vocabulary)).save_pretrained(folder)  # records no max length: the config limits it
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {name: save_tiny_speech_model(root / name, name) for name in ("wav2vec2", "hubert", "wavlm")}
    folders["wav2vec2-reseeded"] = save_tiny_speech_model(root / "wav2vec2-reseeded", "wav2vec2", seed=1)
    folders["whisper"] = save_tiny_whisper(root / "whisper")
    folders["bert"] = save_tiny_bert(root / "bert")
    folders["bert-reseeded"] = save_tiny_bert(root / "bert-reseeded", seed=1)
    return folders


@pytest.fixture(scope="module")
def speech_encoders(checkpoints) -> dict[str, AudioEncoder]:
    return {name: build_audio_encoder(f"hf:{checkpoints[name]}", device="cpu")
            for name in ("wav2vec2", "hubert", "wavlm", "whisper")}


SPEECH_MODELS = ["wav2vec2", "hubert", "wavlm", "whisper"]


@pytest.mark.parametrize("name", SPEECH_MODELS)
def test_speech_encoder_gives_one_finite_vector_per_segment(speech_encoders, name):
    encoder = speech_encoders[name]
    vectors = encoder.encode([tone(200, 0.7), noise(1.3), tone(300, 0.2)])
    assert vectors.shape == (3, HIDDEN) and vectors.dtype == np.float32 and encoder.dim == HIDDEN
    assert np.isfinite(vectors).all() and encoder.sample_rate == SAMPLE_RATE
    assert encoder.encode([]).shape == (0, HIDDEN)


@pytest.mark.parametrize("name", SPEECH_MODELS)
def test_speech_segment_vector_does_not_depend_on_its_batch(speech_encoders, name):
    encoder = speech_encoders[name]
    short, long = noise(0.37, seed=1), noise(1.9, seed=2)
    alone = encoder.encode([short])[0]
    batched = encoder.encode([short, long, tone(200, 0.9)])
    np.testing.assert_allclose(batched[0], alone, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batched[1], encoder.encode([long])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", SPEECH_MODELS)
def test_segments_shorter_than_the_receptive_field_still_encode(speech_encoders, name):
    vectors = speech_encoders[name].encode([np.zeros(0), np.zeros(1), tone(200, 0.001), tone(200, 0.01)])
    assert np.isfinite(vectors).all()


@pytest.mark.parametrize("name", SPEECH_MODELS)
def test_layer_choice_changes_the_vector_and_avg_is_the_mean_over_layers(checkpoints, name):
    segments = [tone(220, 0.6), noise(0.8)]
    by_layer = [build_audio_encoder(f"hf:{checkpoints[name]}?layer={layer}", device="cpu").encode(segments)
                for layer in (0, 1, 2)]
    average = build_audio_encoder(f"hf:{checkpoints[name]}?layer=avg", device="cpu").encode(segments)
    assert not np.allclose(by_layer[0], by_layer[2])
    # Mean pooling is linear, so pooling the mean of the layers is the mean of the pooled layers.
    np.testing.assert_allclose(average, np.mean(by_layer, axis=0), atol=1e-5)
    last_index = build_audio_encoder(f"hf:{checkpoints[name]}?layer=-1", device="cpu")
    np.testing.assert_allclose(last_index.encode(segments), by_layer[2], atol=1e-6)


def test_layer_out_of_range_is_a_spec_error(checkpoints):
    with pytest.raises(EncoderSpecError, match="layer=3 is out of range.*3 hidden states"):
        build_audio_encoder(f"hf:{checkpoints['wav2vec2']}?layer=3", device="cpu")


@pytest.mark.parametrize("name", SPEECH_MODELS)
def test_long_segment_is_the_frame_weighted_mean_of_its_chunks(checkpoints, speech_encoders, name):
    # Three equal 0.5 s chunks give equal frame counts, so the weighted mean is the plain mean.
    segment = noise(1.5, seed=4)
    chunked = build_audio_encoder(f"hf:{checkpoints[name]}?chunk_seconds=0.5", device="cpu")
    pieces = speech_encoders[name].encode([segment[i * 8000:(i + 1) * 8000] for i in range(3)])
    np.testing.assert_allclose(chunked.encode([segment])[0], pieces.mean(axis=0), atol=1e-4)
    # A remainder chunk shorter than the others still contributes, and nothing breaks.
    assert np.isfinite(chunked.encode([noise(1.61, seed=5)])).all()


def test_whisper_averages_only_the_frames_of_real_samples(checkpoints, speech_encoders):
    from transformers import WhisperFeatureExtractor, WhisperModel

    segment = tone(200, 0.5)
    encoder = WhisperModel.from_pretrained(checkpoints["whisper"]).get_encoder().eval()
    features = WhisperFeatureExtractor.from_pretrained(checkpoints["whisper"])([segment], sampling_rate=SAMPLE_RATE,
                                                                              return_tensors="pt")
    with torch.inference_mode():
        frames = encoder(features.input_features).last_hidden_state[0]
    real_frames = 25  # 0.5 s = 50 mel frames of 10 ms, halved by the stride-2 convolution
    np.testing.assert_allclose(speech_encoders["whisper"].encode([segment])[0],
                               frames[:real_frames].mean(dim=0).numpy(), atol=1e-5)


def test_whisper_chunks_cannot_exceed_its_window(checkpoints):
    with pytest.raises(EncoderSpecError, match="exceeds Whisper's 2-second window"):
        build_audio_encoder(f"hf:{checkpoints['whisper']}?chunk_seconds=5", device="cpu")


def test_speech_fingerprint_follows_weights_layer_and_chunking_but_not_batch_size_or_path(checkpoints, tmp_path):
    def fingerprint(folder: Path, options: str = "") -> dict:
        return build_audio_encoder(f"hf:{folder}{options}", device="cpu").fingerprint()

    base = fingerprint(checkpoints["wav2vec2"])
    assert json.loads(json.dumps(base)) == base
    assert base == fingerprint(checkpoints["wav2vec2"], "?batch_size=2")
    assert base == fingerprint(shutil.copytree(checkpoints["wav2vec2"], tmp_path / "copy"))
    assert base == fingerprint(checkpoints["wav2vec2"], "?layer=last")
    for different in (fingerprint(checkpoints["wav2vec2-reseeded"]), fingerprint(checkpoints["wav2vec2"], "?layer=1"),
                      fingerprint(checkpoints["wav2vec2"], "?chunk_seconds=5")):
        assert different != base
    assert fingerprint(checkpoints["wav2vec2"], "?layer=-1") == fingerprint(checkpoints["wav2vec2"], "?layer=2")


def test_revision_option_is_refused_for_a_local_folder(checkpoints):
    with pytest.raises(EncoderSpecError, match="revision"):
        build_audio_encoder(f"hf:{checkpoints['wav2vec2']}?revision=main", device="cpu")


def test_missing_model_is_a_spec_error_that_names_it(tmp_path):
    with pytest.raises(EncoderSpecError, match="cannot load a model config from 'nobody/no-such-model'"):
        build_audio_encoder("hf:nobody/no-such-model", device="cpu")


@pytest.mark.parametrize("modality, spec", [("audio", "logmel?n_mels=32"), ("text", "hashngram?dim=64"),
                                            ("audio", "{wav2vec2}?layer=-2&chunk_seconds=3"), ("audio", "{whisper}"),
                                            ("text", "{bert}?layer=avg")])
def test_encoder_fingerprint_equals_the_built_encoders(checkpoints, modality, spec):
    spec = spec.format(**{name: f"hf:{folder}" for name, folder in checkpoints.items()})
    build = build_audio_encoder if modality == "audio" else build_text_encoder
    assert encoder_fingerprint(modality, spec) == build(spec, device="cpu").fingerprint()


def test_encoder_fingerprint_reads_no_weights_but_still_tells_them_apart(checkpoints, tmp_path):
    broken = shutil.copytree(checkpoints["wav2vec2"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    fingerprint = encoder_fingerprint("audio", f"hf:{broken}")
    assert fingerprint != encoder_fingerprint("audio", f"hf:{checkpoints['wav2vec2']}")
    with pytest.raises(EncoderSpecError, match="cannot load the weights of"):
        build_audio_encoder(f"hf:{broken}", device="cpu")


# ---------------------------------------------------------------- modality checks

def test_text_model_in_the_audio_slot_is_refused(checkpoints):
    with pytest.raises(EncoderSpecError, match=r"is a text model \(model_type 'bert'\).*cannot be the audio encoder"):
        build_audio_encoder(f"hf:{checkpoints['bert']}", device="cpu")


def test_speech_model_in_the_text_slot_is_refused(checkpoints):
    with pytest.raises(EncoderSpecError, match=r"is an audio model \(model_type 'whisper'\).*not be the text encoder"):
        build_text_encoder(f"hf:{checkpoints['whisper']}", device="cpu")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(EncoderSpecError, match=r"model_type 'gpt2' is not supported.*wav2vec2.*bert"):
        build_text_encoder(f"hf:{tmp_path / 'gpt2'}", device="cpu")


# ---------------------------------------------------------------- Hugging Face text

@pytest.fixture(scope="module")
def bert(checkpoints) -> TextEncoder:
    return build_text_encoder(f"hf:{checkpoints['bert']}?batch_size=2", device="cpu")


def test_text_encoder_gives_one_vector_per_text_including_empty(bert):
    vectors = bert.encode(["the cat sat on the mat.", "", "dogs ran", "unknown wörds"])
    assert vectors.shape == (4, HIDDEN) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert bert.encode([]).shape == (0, HIDDEN)


def test_text_vector_does_not_depend_on_its_batch_or_order(bert):
    texts = ["the cat", "the dog ran on the mat , the cat sat on the mat .", "mat", ""]
    together = bert.encode(texts)
    for index, text in enumerate(texts):
        np.testing.assert_allclose(together[index], bert.encode([text])[0], atol=1e-5)


def test_identical_texts_give_identical_vectors(bert):
    first, second = bert.encode(["the cat sat", "the cat sat"])
    np.testing.assert_array_equal(first, second)


def bert_window_vectors(folder: Path, windows: list[list[int]]) -> np.ndarray:
    """The mean last hidden state of each window of token ids, [CLS] and [SEP] added, run alone."""
    from transformers import BertModel, BertTokenizer

    tokenizer, model = BertTokenizer.from_pretrained(folder), BertModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        return np.stack([model(input_ids=torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]]))
                         .last_hidden_state[0].mean(dim=0).numpy() for ids in windows])


def test_text_longer_than_the_model_is_the_token_weighted_mean_of_its_windows(checkpoints, bert):
    from transformers import BertTokenizer

    assert bert.max_length == 64
    long = " ".join(["the cat sat on the mat", "dogs ran"] * 16)  # 144 tokens
    ids = BertTokenizer.from_pretrained(checkpoints["bert"])(long, add_special_tokens=False)["input_ids"]
    windows = [ids[start:start + 62] for start in range(0, len(ids), 62)]  # 62 tokens + [CLS] + [SEP] = 64
    assert len(windows) == 3 and len(windows[-1]) < 62
    weights = np.array([len(window) + 2 for window in windows], dtype=np.float64)
    expected = (bert_window_vectors(checkpoints["bert"], windows) * weights[:, None]).sum(axis=0) / weights.sum()
    vector = bert.encode([long])[0]
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert not np.allclose(vector, bert_window_vectors(checkpoints["bert"], windows[:1])[0], atol=1e-3)
    # Nothing past the first window is dropped any more: more words change the vector.
    assert not np.allclose(vector, bert.encode([long + " dog dog dog"])[0], atol=1e-4)


def test_text_of_exactly_the_maximum_length_is_one_window(checkpoints, bert):
    ids = [TINY_VOCABULARY.index(word) for word in ["the", "cat", "sat", "on", "the", "mat"] * 10 + ["dog", "ran"]]
    text = " ".join(TINY_VOCABULARY[i] for i in ids)
    np.testing.assert_allclose(bert.encode([text])[0], bert_window_vectors(checkpoints["bert"], [ids])[0], atol=1e-5)


def test_text_layer_choice_and_avg(checkpoints):
    texts = ["the cat sat", "dogs ran on the mat"]
    by_layer = [build_text_encoder(f"hf:{checkpoints['bert']}?layer={layer}", device="cpu").encode(texts)
                for layer in (0, 1, 2)]
    average = build_text_encoder(f"hf:{checkpoints['bert']}?layer=avg", device="cpu").encode(texts)
    assert not np.allclose(by_layer[0], by_layer[2])
    np.testing.assert_allclose(average, np.mean(by_layer, axis=0), atol=1e-5)


def test_text_fingerprint_follows_weights_and_layer(checkpoints, bert):
    base = build_text_encoder(f"hf:{checkpoints['bert']}", device="cpu").fingerprint()
    assert base == bert.fingerprint()  # batch_size does not change outputs
    assert base != build_text_encoder(f"hf:{checkpoints['bert-reseeded']}", device="cpu").fingerprint()
    assert base != build_text_encoder(f"hf:{checkpoints['bert']}?layer=avg", device="cpu").fingerprint()


def test_text_options_do_not_include_audio_ones(checkpoints):
    with pytest.raises(EncoderSpecError, match="unknown option 'chunk_seconds'"):
        build_text_encoder(f"hf:{checkpoints['bert']}?chunk_seconds=5", device="cpu")


@pytest.mark.parametrize("name", ["hubert", "whisper"])
def test_speech_precision_bfloat16_agrees_with_float32_and_float16_needs_cuda(checkpoints, speech_encoders, name):
    coarse = build_audio_encoder(f"hf:{checkpoints[name]}?precision=bfloat16", device="cpu")
    assert coarse.fingerprint() == speech_encoders[name].fingerprint()
    segments = [tone(200, 0.7), noise(1.3)]
    expected, got = speech_encoders[name].encode(segments), coarse.encode(segments)
    assert np.isfinite(got).all() and not np.array_equal(got, expected)
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.99, cosine
    with pytest.raises(EncoderSpecError, match="precision=float16 needs a CUDA device"):
        build_audio_encoder(f"hf:{checkpoints[name]}?precision=float16", device="cpu")
