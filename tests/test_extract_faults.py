"""Audio that passes validation (which reads headers, not samples) but cannot be encoded: the
error names the document, the field and the segment, every other document is encoded and cached
whole, and the run after the fix encodes only what failed; in this process and on Ray Data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from conftest import document, write_manifest, write_tone
from hilbert.data.manifest import load_manifest
from hilbert.features.cache import FeatureCache
from hilbert.features.extract import ExtractionError, extract_features


def write_samples(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> str:
    soundfile.write(str(path), samples.astype(np.float32), sample_rate, subtype="FLOAT")
    return path.name


@pytest.mark.parametrize("on_ray", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in process", "Ray Data"])
def test_non_finite_samples_name_the_segment_and_the_rest_is_encoded(on_ray: bool, tmp_path: Path, request):
    if on_ray:
        request.getfixturevalue("local_ray")
    rate = 16000
    write_tone(tmp_path / "tone.wav", seconds=3.0)
    write_samples(tmp_path / "silence.wav", np.zeros(3 * rate))  # silence is valid audio
    broken = np.random.default_rng(0).normal(scale=0.1, size=5 * rate)
    broken[int(1.5 * rate)] = np.nan  # inside the second segment (1.2-2.5 s)
    write_samples(tmp_path / "broken.wav", broken)  # the longest: encoded first
    infinite = np.random.default_rng(1).normal(scale=0.1, size=4 * rate)
    infinite[int(0.5 * rate)] = np.inf
    write_samples(tmp_path / "infinite.wav", infinite)
    corpus = write_manifest(tmp_path, [document("tone", "tone.wav"), document("silence", "silence.wav"),
                                       document("broken", "broken.wav"), document("infinite", "infinite.wav")])
    cache = tmp_path / "cache"

    with pytest.raises(ExtractionError) as failed:
        extract_features(load_manifest(corpus), "logmel", "hashngram", cache, progress=False,
                         in_process=not on_ray, documents_per_batch=1)
    lines = str(failed.value).splitlines()
    assert "2 document(s) could not be encoded" in lines[0] and "Traceback" not in str(failed.value), lines
    assert sorted(lines[1:]) == [
        "doc_id 'broken', field 'audio': NaN or infinite samples in segments[1] (1.2-2.5 s)",
        "doc_id 'infinite', field 'audio': NaN or infinite samples in segments[0] (0-1 s)"]

    broken[int(1.5 * rate)] = 0.0  # the user repairs one file and drops the other document
    write_samples(tmp_path / "broken.wav", broken)
    corpus = write_manifest(tmp_path, [document("tone", "tone.wav"), document("silence", "silence.wav"),
                                       document("broken", "broken.wav")])
    done = extract_features(load_manifest(corpus), "logmel", "hashngram", cache, progress=False, in_process=True)
    assert done.computed.get("audio") == 1 and done.reused.get("audio") == 2, done
    store = FeatureCache(cache)
    for doc_id in ("tone", "silence", "broken"):
        audio, text = store.load_document(done.feature_set, doc_id)[:2]
        assert audio.shape[0] == text.shape[0] == 2 and np.isfinite(audio).all(), doc_id


def test_a_file_garbled_after_validation_names_the_document_and_field(tmp_path: Path):
    """On a shared filesystem a file can change between loading the manifest and encoding it."""
    write_tone(tmp_path / "tone.wav")
    manifest = load_manifest(write_manifest(tmp_path, [document("garbled", "tone.wav")]))
    (tmp_path / "tone.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    with pytest.raises(ExtractionError, match=r"doc_id 'garbled', field 'audio': .*tone\.wav"):
        extract_features(manifest, "logmel", "hashngram", tmp_path / "cache", progress=False, in_process=True)
    assert not list((tmp_path / "cache" / "entries" / "audio").rglob("*.safetensors"))
