"""``ct2:<folder>``: Whisper's encoder on CTranslate2 gives the vectors ``hf:`` gives for the same
weights. A tiny Whisper with the real 30-second window is built from a config, saved, and
converted offline with CTranslate2's own converter (a fraction of a second)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ctranslate2 = pytest.importorskip("ctranslate2")

from hilbert.features.encoders import EncoderSpecError, build_audio_encoder, encoder_fingerprint  # noqa: E402
from hilbert.features.encoders.ct2_whisper import QUANTISATION  # noqa: E402

SAMPLE_RATE = 16_000


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise under a 4 Hz syllable envelope with a wandering pitch: not a stationary signal."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE) + 0.3 * rng.standard_normal(len(t))
    return (0.2 * voice * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def save_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide Whisper with the real 30-second window."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=16, vocab_size=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def convert(hf_folder: Path, output: Path, copy_preprocessor: bool = True) -> Path:
    files = ["preprocessor_config.json"] if copy_preprocessor else None
    ctranslate2.converters.TransformersConverter(str(hf_folder), copy_files=files).convert(str(output))
    return output


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whisper")
    hf = save_tiny_whisper(root / "hf")
    reseeded = save_tiny_whisper(root / "hf-reseeded", seed=1)
    return {"hf": hf, "ct2": convert(hf, root / "ct2"), "ct2-bare": convert(hf, root / "ct2-bare", False),
            "ct2-reseeded": convert(reseeded, root / "ct2-reseeded")}


@pytest.fixture(scope="module")
def segments() -> list[np.ndarray]:
    # One under a second, one inside a window, one just past it (two chunks), one of three windows.
    return [speech_like(0.3, 1), speech_like(7.0, 2), speech_like(31.5, 3), speech_like(65.0, 4)]


@pytest.fixture(scope="module")
def ct2_encoder(folders):
    return build_audio_encoder(f"ct2:{folders['ct2']}", device="cpu")


def test_ct2_vectors_equal_hf_vectors_of_the_same_weights(folders, segments, ct2_encoder):
    hf = build_audio_encoder(f"hf:{folders['hf']}", device="cpu").encode(segments)
    ct2 = ct2_encoder.encode(segments)
    assert ct2.shape == hf.shape == (4, 32) and ct2.dtype == np.float32 and ct2_encoder.dim == 32
    assert (cosines(ct2, hf) >= 0.999).all(), cosines(ct2, hf)
    np.testing.assert_allclose(ct2, hf, atol=1e-4)
    # Without preprocessor_config.json the folder gets Whisper's default front end, the same here.
    np.testing.assert_allclose(build_audio_encoder(f"ct2:{folders['ct2-bare']}", device="cpu").encode(segments), ct2,
                               atol=1e-6)


def test_ct2_segment_vector_does_not_depend_on_its_batch(folders, ct2_encoder, segments):
    assert ct2_encoder.batch_size == 1  # the CPU default: one window per call
    batched = build_audio_encoder(f"ct2:{folders['ct2']}?batch_size=8", device="cpu")
    together = batched.encode(segments)
    for index, segment in enumerate(segments):
        np.testing.assert_allclose(together[index], batched.encode([segment])[0], atol=1e-5)
    np.testing.assert_allclose(together, ct2_encoder.encode(segments), atol=1e-5)


def test_ct2_encodes_empty_and_tiny_segments(ct2_encoder):
    vectors = ct2_encoder.encode([np.zeros(0), np.zeros(1), speech_like(0.005)])
    assert vectors.shape == (3, 32) and np.isfinite(vectors).all()
    assert ct2_encoder.encode([]).shape == (0, 32)


def test_int8_stays_close_to_float32_but_gets_its_own_fingerprint(folders, segments, ct2_encoder):
    int8 = build_audio_encoder(f"ct2:{folders['ct2']}?compute_type=int8", device="cpu")
    assert int8.compute_type == "int8"
    vectors = int8.encode(segments)
    assert (cosines(vectors, ct2_encoder.encode(segments)) > 0.99).all()
    assert not np.allclose(vectors, ct2_encoder.encode(segments), atol=1e-6)
    assert int8.fingerprint() != ct2_encoder.fingerprint()


def test_ct2_fingerprint_follows_weights_and_quantisation_not_speed_options_or_path(folders, ct2_encoder, tmp_path):
    base = ct2_encoder.fingerprint()
    assert json.loads(json.dumps(base)) == base
    assert base == encoder_fingerprint("audio", f"ct2:{folders['ct2']}")
    same = [f"ct2:{folders['ct2']}?batch_size=2&intra_threads=1", f"ct2:{folders['ct2']}?compute_type=float16",
            f"ct2:{folders['ct2']}?layer=last", f"ct2:{shutil.copytree(folders['ct2'], tmp_path / 'copy')}"]
    for spec in same:
        assert encoder_fingerprint("audio", spec) == base, spec
    different = [f"ct2:{folders['ct2-reseeded']}", f"ct2:{folders['ct2']}?compute_type=int8_float32",
                 f"ct2:{folders['ct2']}?compute_type=int16", f"ct2:{folders['ct2']}?chunk_seconds=10"]
    for spec in different:
        assert encoder_fingerprint("audio", spec) != base, spec
    assert base != encoder_fingerprint("audio", f"hf:{folders['hf']}")


def test_ct2_fingerprint_reads_no_weights_beyond_hashing_them(folders, tmp_path):
    broken = shutil.copytree(folders["ct2"], tmp_path / "broken")
    with open(broken / "model.bin", "r+b") as handle:  # keep the header, spoil the weights
        handle.seek(200)
        handle.write(b"\xff" * 64)
    assert encoder_fingerprint("audio", f"ct2:{broken}") != encoder_fingerprint("audio", f"ct2:{folders['ct2']}")


def test_ct2_offers_the_last_layer_only(folders):
    with pytest.raises(EncoderSpecError, match=r"layer=.*expected 'last': CTranslate2 returns only"):
        build_audio_encoder(f"ct2:{folders['ct2']}?layer=avg", device="cpu")
    with pytest.raises(EncoderSpecError, match=r"layer=.*expected 'last'"):
        encoder_fingerprint("audio", f"ct2:{folders['ct2']}?layer=2")


@pytest.mark.parametrize("options, message", [("?compute_type=int4", "expected one of float32"),
                                              ("?chunk_seconds=40", "exceeds Whisper's 30-second window"),
                                              ("?revision=main", "unknown option 'revision'")])
def test_ct2_bad_options_are_spec_errors(folders, options, message):
    with pytest.raises(EncoderSpecError, match=message):
        build_audio_encoder(f"ct2:{folders['ct2']}{options}", device="cpu")


def test_unsupported_compute_type_on_the_device_lists_the_supported_ones(folders):
    # A type this CPU lacks (which ones it has depends on its instruction set); float32 it always has.
    unsupported = sorted(set(QUANTISATION) - set(ctranslate2.get_supported_compute_types("cpu")))
    if not unsupported:  # an instruction set with every type (AVX-512 FP16 and BF16): nothing to refuse
        pytest.skip("CTranslate2 on this CPU supports every compute type hilbert accepts")
    wanted = unsupported[0]
    with pytest.raises(EncoderSpecError, match=rf"compute_type={wanted} is not supported on cpu; choose one of .*float32"):
        build_audio_encoder(f"ct2:{folders['ct2']}?compute_type={wanted}", device="cpu")


def test_a_folder_that_is_not_a_ct2_whisper_is_refused(folders, tmp_path):
    with pytest.raises(EncoderSpecError, match="is not a CTranslate2 model folder"):
        build_audio_encoder(f"ct2:{folders['hf']}", device="cpu")
    with pytest.raises(EncoderSpecError, match="name the folder"):
        build_audio_encoder("ct2?layer=last", device="cpu")
    other = shutil.copytree(folders["ct2"], tmp_path / "translator")
    (other / "model.bin").write_bytes(b"\x06\0\0\0" + len(b"TransformerSpec\0").to_bytes(2, "little")
                                      + b"TransformerSpec\0")
    with pytest.raises(EncoderSpecError, match="holds a CTranslate2 TransformerSpec model"):
        encoder_fingerprint("audio", f"ct2:{other}")


def test_mel_bins_that_do_not_match_the_weights_are_refused(folders, tmp_path):
    from transformers import WhisperFeatureExtractor

    wrong = shutil.copytree(folders["ct2"], tmp_path / "wrong-mels")
    WhisperFeatureExtractor(feature_size=128).save_pretrained(wrong)
    with pytest.raises(EncoderSpecError, match="the weights take 80 mel bins but the folder's front end gives 128"):
        build_audio_encoder(f"ct2:{wrong}", device="cpu")


def test_without_ctranslate2_the_error_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 now raises ImportError
    with pytest.raises(EncoderSpecError, match=r"need the ctranslate2 package.*'test' extra"):
        build_audio_encoder(f"ct2:{folders['ct2']}", device="cpu")
    # Planning the cache needs no CTranslate2: a fully cached re-run works without it.
    assert encoder_fingerprint("audio", f"ct2:{folders['ct2']}")["encoder"] == "ct2-whisper"
