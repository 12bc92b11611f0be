"""Extraction on Ray Data (local Ray, 2 CPUs): hits, misses, partial invalidation, interruption."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import document, write_manifest, write_tone
from hilbert.cli import app
from hilbert.data.manifest import load_manifest
from hilbert.features.cache import FeatureCache
from hilbert.features.extract import extract_features
from sessions import kill_session

pytestmark = pytest.mark.slow


def test_second_run_is_a_cache_hit_with_identical_features(local_ray, tiny_corpus: Path, tmp_path: Path):
    manifest = load_manifest(tiny_corpus)
    first = extract_features(manifest, "logmel", "hashngram", tmp_path / "cache", progress=False)
    assert first.computed == {"audio": 4, "text": 4} and first.reused == {"audio": 0, "text": 0}
    second = extract_features(manifest, "logmel", "hashngram", tmp_path / "cache", progress=False)
    assert second.cache_hit and second.reused == {"audio": 4, "text": 4}
    assert second.feature_set.documents == first.feature_set.documents
    assert (second.feature_set.audio_dim, second.feature_set.text_dim) == (140, 4096)
    audio, text = FeatureCache(tmp_path / "cache").load_document(second.feature_set, "d1")
    assert audio.shape == (2, 140) and text.shape == (2, 4096) and np.isfinite(audio).all()


def test_changes_recompute_only_what_they_touch(local_ray, tmp_path: Path):
    for i in range(3):
        write_tone(tmp_path / "audio" / f"d{i}.wav", frequency=200 + 50 * i)
    records = [document(f"d{i}", f"audio/d{i}.wav") for i in range(3)]
    cache = tmp_path / "cache"
    extract_features(load_manifest(write_manifest(tmp_path, records)), "logmel", "hashngram", cache, progress=False)

    records[0]["segments"][0]["text"] = "an edited transcript"  # text of d0 only
    records[1]["segments"][1]["end"] = 2.9  # segment times of d1 only
    report = extract_features(load_manifest(write_manifest(tmp_path, records)), "logmel", "hashngram", cache,
                              progress=False)
    assert report.computed == {"audio": 1, "text": 1}

    write_tone(tmp_path / "audio" / "d2.wav", frequency=333)  # new audio content under the same name
    report = extract_features(load_manifest(write_manifest(tmp_path, records)), "logmel", "hashngram", cache,
                              progress=False)
    assert report.computed == {"audio": 1, "text": 0}

    report = extract_features(load_manifest(write_manifest(tmp_path, records)), "logmel?n_mels=32", "hashngram",
                              cache, progress=False)
    assert report.computed == {"audio": 3, "text": 0} and report.feature_set.audio_dim == 2 * 32 + 12


def test_stereo_48k_flac_and_mono_wav_of_one_signal_give_close_features(local_ray, tmp_path: Path):
    write_tone(tmp_path / "mono.wav", seconds=3.0, sample_rate=16000, frequency=180)
    write_tone(tmp_path / "stereo.flac", seconds=3.0, sample_rate=48000, channels=2, frequency=180)
    manifest = load_manifest(write_manifest(tmp_path, [document("mono", "mono.wav"), document("stereo", "stereo.flac")]))
    report = extract_features(manifest, "logmel", "hashngram", tmp_path / "cache", progress=False)
    cache = FeatureCache(tmp_path / "cache")
    mono, _ = cache.load_document(report.feature_set, "mono")
    stereo, _ = cache.load_document(report.feature_set, "stereo")
    # Same tone: after downmix and resampling only the level (stereo channels 1.0 and 0.8) differs.
    assert np.corrcoef(mono.ravel(), stereo.ravel())[0, 1] > 0.95


def test_cli_validate_extract_twice_on_a_corpus(local_ray, tiny_corpus: Path, tmp_path: Path):
    runner = CliRunner()
    validated = runner.invoke(app, ["validate", str(tiny_corpus)])
    assert validated.exit_code == 0, validated.output
    assert "4 documents" in validated.output and "task 'voice'" in validated.output
    arguments = ["extract", str(tiny_corpus), "--cache", str(tmp_path / "cache")]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "segments/s" in first.output and "audio s/s" in first.output
    second = runner.invoke(app, arguments)
    assert second.exit_code == 0 and "were cached" in second.output and "nothing encoded" in second.output


def test_cli_refuses_a_bad_manifest_before_any_work(tmp_path: Path):
    path = write_manifest(tmp_path, [document("a", "audio/missing.wav")])
    result = CliRunner().invoke(app, ["extract", str(path), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert "doc_id 'a'" in result.output and "not found" in result.output
    assert not (tmp_path / "cache").exists()


INTERRUPTED_EXTRACTION = """
import sys
from hilbert.data.manifest import load_manifest
from hilbert.features.extract import extract_features
extract_features(load_manifest(sys.argv[1]), "logmel", "hashngram", sys.argv[2], num_actors=1,
                 documents_per_batch=1, progress=False, in_process=False)
"""


def test_killed_extraction_leaves_only_whole_entries_and_resumes(local_ray, tmp_path: Path):
    for i in range(40):
        write_tone(tmp_path / "audio" / f"d{i}.wav", seconds=20.0, frequency=100 + 7 * i)
    spans = [(s, s + 0.9, f"w{s}") for s in np.arange(0, 19, 1.0)]
    manifest_path = write_manifest(tmp_path, [document(f"d{i}", f"audio/d{i}.wav", spans) for i in range(40)])
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_EXTRACTION, str(manifest_path), str(cache)],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    audio_entries = cache / "entries" / "audio"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(audio_entries.rglob("*.safetensors"))) < 3:
        time.sleep(0.2)
    kill_session(process.pid)  # the driver and every Ray process it started
    process.wait()
    written = list(audio_entries.rglob("*.safetensors"))
    assert 3 <= len(written) < 40, "the extraction must be killed part-way"
    store = FeatureCache(cache)
    for entry in written:  # every visible entry is whole and readable
        assert store.get("audio", entry.stem).shape == (19, 140)
    assert not (cache / "sets").exists(), "no feature set may claim an unfinished extraction"

    report = extract_features(load_manifest(manifest_path), "logmel", "hashngram", cache, progress=False)
    assert report.reused["audio"] == len(written) and report.computed["audio"] == 40 - len(written)
    assert len(report.feature_set.documents) == 40


SMALL_EXTRACTION = """
import sys
import ray
from hilbert.data.manifest import load_manifest
from hilbert.features.extract import extract_features
report = extract_features(load_manifest(sys.argv[1]), "logmel", "hashngram", sys.argv[2], progress=False)
print(report.computed["audio"], ray.is_initialized())
"""


def test_a_small_extraction_runs_in_process_and_equals_ray_datas(local_ray, tiny_corpus: Path, tmp_path: Path):
    """A handful of documents is encoded without starting Ray (whose start-up would cost more
    than the work), into exactly the entries Ray Data's actors write."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", SMALL_EXTRACTION, str(tiny_corpus), str(tmp_path / "in-process")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["4", "False"], done.stdout + done.stderr
    manifest = load_manifest(tiny_corpus)
    on_ray = extract_features(manifest, "logmel", "hashngram", tmp_path / "ray", progress=False, in_process=False)
    in_process = extract_features(manifest, "logmel", "hashngram", tmp_path / "in-process", progress=False)
    assert in_process.cache_hit and in_process.feature_set.documents == on_ray.feature_set.documents
    for doc_id in on_ray.feature_set.documents:
        expected = FeatureCache(tmp_path / "ray").load_document(on_ray.feature_set, doc_id)
        found = FeatureCache(tmp_path / "in-process").load_document(in_process.feature_set, doc_id)
        for a, b in zip(expected, found):
            np.testing.assert_array_equal(a, b)
