"""The feature cache: content addressing, atomic entries, corrupt and NaN entries never served."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from hilbert.features.cache import (
    CacheError,
    FeatureCache,
    FeatureSet,
    FeatureValueError,
    audio_entry_key,
    text_entry_key,
)

ENCODER = {"name": "logmel", "version": 1}


def test_audio_key_covers_content_times_and_encoder():
    base = audio_entry_key("sha-a", [(0.0, 1.0), (1.0, 2.0)], ENCODER)
    assert base == audio_entry_key("sha-a", [(0, 1), (1, 2)], dict(ENCODER))  # ints and floats alike
    assert base != audio_entry_key("sha-b", [(0.0, 1.0), (1.0, 2.0)], ENCODER)
    assert base != audio_entry_key("sha-a", [(0.0, 1.0), (1.0, 2.5)], ENCODER)
    assert base != audio_entry_key("sha-a", [(0.0, 1.0), (1.0, 2.0)], {**ENCODER, "layer": 3})


def test_text_key_covers_every_segment_text_and_encoder():
    base = text_entry_key(["hello", ""], ENCODER)
    assert base == text_entry_key(("hello", ""), ENCODER)
    assert base != text_entry_key(["hello", " "], ENCODER)
    assert base != text_entry_key(["hello"], ENCODER)
    assert base != text_entry_key(["hello", ""], {**ENCODER, "version": 2})


def test_put_then_get_round_trips_exactly(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    features = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    cache.put("audio", "ab" * 32, features, doc_id="d1", encoder="logmel")
    assert cache.has("audio", "ab" * 32) and not cache.has("text", "ab" * 32)
    np.testing.assert_array_equal(cache.get("audio", "ab" * 32), features)
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file may survive a finished write"


def test_nan_features_are_refused_with_the_document_named(tmp_path: Path):
    features = np.ones((4, 3), dtype=np.float32)
    features[2, 1] = np.nan
    with pytest.raises(FeatureValueError, match=r"doc_id 'd9'.*segments \[2\]"):
        FeatureCache(tmp_path).put("audio", "cd" * 32, features, doc_id="d9", encoder="logmel")
    assert not FeatureCache(tmp_path).has("audio", "cd" * 32)


def test_truncated_entry_counts_as_missing_and_get_says_what_to_do(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    path = cache.put("text", "ef" * 32, np.ones((3, 4), np.float32), doc_id="d", encoder="x")
    path.write_bytes(path.read_bytes()[:40])  # a half-copied file, e.g. from a crashed rsync
    assert not cache.has("text", "ef" * 32)
    with pytest.raises(CacheError, match="unreadable"):
        cache.get("text", "ef" * 32)


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    folder = tmp_path / "entries" / "audio" / "ab"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".x.safetensors.1.tmp", folder / ".y.safetensors.2.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert cache.remove_stale_temporaries() == 1
    assert not stale.exists() and fresh.exists()


def test_audio_fingerprint_follows_content_and_is_memoised(tmp_path: Path):
    cache = FeatureCache(tmp_path / "cache")
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    first = cache.audio_sha256([a, b])
    assert first[a] == first[b]
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    a.write_bytes(b"other bytes!")  # size changes, so the memo cannot be used
    assert cache.audio_sha256([a])[a] != first[a]


def test_feature_set_round_trip_and_aligned_loading(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    cache.put("audio", "a" * 64, np.zeros((3, 5), np.float32), doc_id="d", encoder="logmel")
    cache.put("text", "b" * 64, np.ones((3, 2), np.float32), doc_id="d", encoder="hashngram")
    feature_set = FeatureSet("m.jsonl", "sha", "logmel", "hashngram", ENCODER, ENCODER, 5, 2,
                             {"d": {"audio": "a" * 64, "text": "b" * 64, "segments": 3}})
    cache.write_feature_set(feature_set)
    loaded = cache.read_feature_set("sha", "logmel", "hashngram")
    assert loaded is not None and loaded.documents == feature_set.documents
    audio, text = cache.load_document(loaded, "d")
    assert audio.shape == (3, 5) and text.shape == (3, 2)
    assert cache.read_feature_set("sha", "logmel", "other") is None
    with pytest.raises(CacheError, match="not in feature set"):
        cache.load_document(loaded, "missing")
