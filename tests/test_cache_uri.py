"""The feature cache on an object store (a moto S3 server on 127.0.0.1): what one node writes,
another node, with an empty mirror of its own, reads back identically; corrupt objects are
refused as clearly as corrupt files; extraction through the CLI resumes from the store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import document, write_manifest
from hilbert.data.manifest import load_manifest
from hilbert.features.cache import MIRROR_ENV, CacheError, FeatureCache, FeatureSet
from hilbert.features.extract import extract_features, manifest_sha256
from hilbert.train.config import TrainConfig
from hilbert.train.run import make_plan, prepare_data

HILBERT = str(Path(sys.executable).parent / "hilbert")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
ENCODER = {"name": "synthetic", "version": 1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``(cache URI, pyarrow file system of the server, the cache's prefix on it)``: a new, empty
    bucket (moto keeps buckets across servers of one process) on a moto S3 server on 127.0.0.1,
    test credentials only (no instance-metadata lookups), mirrors under ``tmp_path``."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-driver"))
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                     endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        name = f"bucket-{uuid.uuid4().hex[:12]}"
        fs.create_dir(name)
        yield f"s3://{name}/cache?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", fs, f"{name}/cache"
    finally:
        server.stop()


def objects(fs, prefix: str) -> list[str]:
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return sorted(info.path[len(prefix) + 1:] for info in fs.get_file_info(selector)
                  if info.type == pyarrow.fs.FileType.File)


def on_another_node(monkeypatch: pytest.MonkeyPatch, uri: str, mirror: Path) -> FeatureCache:
    """The cache as a node with an empty mirror of its own sees it."""
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    cache = FeatureCache(uri)
    assert not cache.root.exists()
    return cache


def test_what_one_node_writes_another_reads_identically(bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    uri, fs, prefix = bucket
    writer = FeatureCache(uri)
    assert writer.location == uri and Path(writer.root).is_relative_to(tmp_path / "mirror-driver")
    rng = np.random.default_rng(0)
    audio, text = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    writer.put("audio", "a" * 64, audio, doc_id="d", encoder="logmel")
    writer.put("text", "b" * 64, text, doc_id="d", encoder="hashngram")
    many = {f"{i:064x}": np.full((1, 2), i, np.float32) for i in range(20)}  # enough to be listed, not asked
    for key, value in many.items():
        writer.put("text", key, value, doc_id=f"m{key}", encoder="hashngram")
    feature_set = FeatureSet("m.jsonl", "sha", "logmel", "hashngram", ENCODER, ENCODER, 5, 2,
                             {"d": {"audio": "a" * 64, "text": "b" * 64, "segments": 3}})
    writer.write_feature_set(feature_set)
    stored = objects(fs, prefix)
    assert f"entries/audio/aa/{'a' * 64}.safetensors" in stored and f"sets/{feature_set.id}.json" in stored
    assert len(stored) == 2 + len(many) + 1 and not any(name.endswith((".tmp", ".partial")) for name in stored)

    reader = on_another_node(monkeypatch, uri, tmp_path / "mirror-other")
    assert reader.has("audio", "a" * 64) and reader.has("text", "b" * 64) and not reader.has("audio", "b" * 64)
    assert reader.present("text", [*many, "c" * 64]) == set(many)
    loaded = reader.read_feature_set("sha", "logmel", "hashngram")
    assert loaded is not None and loaded.documents == feature_set.documents
    assert reader.read_feature_set("sha", "logmel", "other") is None
    got_audio, got_text = reader.load_document(loaded, "d")
    np.testing.assert_array_equal(got_audio, audio)
    np.testing.assert_array_equal(got_text, text)
    np.testing.assert_array_equal(reader.get("text", f"{7:064x}"), many[f"{7:064x}"])
    assert reader.entry_path("audio", "a" * 64).is_file(), "what a node read stays in its mirror"

    # The store is authoritative: a feature set gone from it is gone, whatever a mirror holds.
    fs.delete_file(f"{prefix}/sets/{feature_set.id}.json")
    assert writer.read_feature_set("sha", "logmel", "hashngram") is None
    with pytest.raises(CacheError, match=rf"cache entry missing: s3://{prefix}/entries/audio/cc/c+\.safetensors "
                                         r"\(run `hilbert extract` again\)"):
        reader.get("audio", "c" * 64)


def test_a_corrupt_object_is_refused_like_a_corrupt_file(bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    uri, fs, prefix = bucket
    key, features = "ef" * 32, np.ones((3, 4), np.float32)
    local = FeatureCache(tmp_path / "local")
    path = local.put("text", key, features, doc_id="d", encoder="x")
    path.write_bytes(path.read_bytes()[:40])  # a half-copied file
    with pytest.raises(CacheError, match="unreadable") as local_error:
        local.get("text", key)

    FeatureCache(uri).put("text", key, features, doc_id="d", encoder="x")
    with fs.open_output_stream(f"{prefix}/entries/text/ef/{key}.safetensors") as stream:
        stream.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")  # replaced by someone else's garbage
    reader = on_another_node(monkeypatch, uri, tmp_path / "mirror-other")
    with pytest.raises(CacheError, match="unreadable") as remote_error:
        reader.get("text", key)
    message = str(remote_error.value)
    assert f"s3://{prefix}/entries/text/ef/{key}.safetensors" in message and "endpoint_override" not in message
    assert message.endswith("delete it and extract again") and str(local_error.value).endswith(
        "delete it and extract again")
    assert not reader.entry_path("text", key).exists(), "a bad copy must not stay in the mirror"
    FeatureCache(uri).put("text", key, features, doc_id="d", encoder="x")  # extracted again
    np.testing.assert_array_equal(reader.get("text", key), features)


def test_a_file_uri_is_a_shared_store_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``file://`` (a shared file system named as a URI): written beside, renamed into place."""
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror-driver"))
    uri, features = (tmp_path / "shared").as_uri(), np.arange(6, dtype=np.float32).reshape(2, 3)
    FeatureCache(uri).put("audio", "ab" * 32, features, doc_id="d", encoder="logmel")
    assert [p.name for p in (tmp_path / "shared").rglob("*") if p.is_file()] == [f"{'ab' * 32}.safetensors"]
    reader = on_another_node(monkeypatch, uri, tmp_path / "mirror-other")
    assert reader.has("audio", "ab" * 32) and not reader.has("text", "ab" * 32)
    np.testing.assert_array_equal(reader.get("audio", "ab" * 32), features)


def test_training_plan_and_split_go_through_the_store(bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    uri, fs, prefix = bucket
    records = [document(f"d{i}", f"audio/d{i}.wav", labels={"topic": "ab"[i % 2]}) for i in range(20)]
    manifest = load_manifest(write_manifest(tmp_path, records), check_audio=False)
    feature_set = FeatureSet(str(manifest.path), "0123456789abcdef", "logmel", "hashngram", ENCODER, ENCODER, 5, 2, {})
    config = TrainConfig()
    config.data.cache_dir, config.data.manifest, config.cv.folds = uri, str(manifest.path), 2
    first = prepare_data(config, manifest=manifest, feature_set=feature_set)
    name = "splits/0123456789ab-k2-topic-s0-v20-r1.json"
    assert [name for name in objects(fs, prefix) if name.startswith("splits/")] == [name]
    assert make_plan(config, first, "hilbert")["cache_dir"] == uri

    other = on_another_node(monkeypatch, uri, tmp_path / "mirror-other")
    with fs.open_output_stream(f"{prefix}/{name}") as stream:
        swapped = first.split.to_json()  # the store's copy wins: the folds in the other order
        swapped["folds"] = [dict(fold, index=i) for i, fold in enumerate(reversed(swapped["folds"]))]
        stream.write(json.dumps(swapped).encode("utf-8"))
    second = prepare_data(config, manifest=manifest, feature_set=feature_set)
    assert second.split.folds[0].test == first.split.folds[1].test and (other.root / "splits").is_dir()


@pytest.mark.slow
def test_cli_extraction_into_the_store_is_reused_by_another_node(bucket, local_ray, tiny_corpus: Path,
                                                                 tmp_path: Path):
    uri, fs, prefix = bucket
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [HILBERT, "extract", str(tiny_corpus), "--audio-encoder", "logmel", "--text-encoder", "hashngram",
               "--cache", uri]
    first = subprocess.run(command, env={**env, MIRROR_ENV: str(tmp_path / "node-a")}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "segments/s" in first.stdout and "endpoint_override" not in first.stdout
    stored = objects(fs, prefix)
    assert sum(name.startswith("entries/audio/") for name in stored) == 4
    assert sum(name.startswith("entries/text/") for name in stored) == 1  # one transcript shared by all four
    assert sum(name.startswith("sets/") for name in stored) == 1

    second = subprocess.run(command, env={**env, MIRROR_ENV: str(tmp_path / "node-b")}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "were cached" in second.stdout and "nothing encoded" in second.stdout

    manifest = load_manifest(tiny_corpus)
    local = extract_features(manifest, "logmel", "hashngram", tmp_path / "local-cache", progress=False)
    shared = FeatureCache(uri)  # this process's mirror: empty so far
    feature_set = shared.read_feature_set(manifest_sha256(manifest), "logmel", "hashngram")
    assert feature_set is not None and feature_set.documents == local.feature_set.documents
    local_cache = FeatureCache(tmp_path / "local-cache")
    for doc in manifest:
        for ours, theirs in zip(shared.load_document(feature_set, doc.doc_id),
                                local_cache.load_document(local.feature_set, doc.doc_id)):
            np.testing.assert_array_equal(ours, theirs)  # same encoders, same bytes
