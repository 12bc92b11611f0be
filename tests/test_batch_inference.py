"""`hilbert predict` and `hilbert embed` on Ray Data (a 2-CPU local Ray here; two nodes in
test_cluster_sweep.py): the same rows as the single-process path, in manifest order; a document
that fails names itself and leaves no table behind, nor spoils the one already there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import document, extract_in_process, write_manifest, write_tone
from hilbert.batch_inference import BatchInferenceError, run_batch_inference
from hilbert.cli import app
from hilbert.data.manifest import load_manifest
from hilbert.features.batches import LabelMaps
from hilbert.features.cache import FeatureCache
from hilbert.features.encoders import encoder_fingerprint
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.predict import embeddings_table, load_predictor, predict_probabilities, predictions_table
from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint

pytestmark = pytest.mark.slow
AUDIO, TEXT = "logmel", "hashngram?dim=16"
CONFIG = HilbertModelConfig(audio_dim=140, text_dim=16, tasks={"loud": 2, "topic": 3}, d_model=8, d_embed=8,
                            n_heads=2, pooling_heads=2, n_experts=2, expert_hidden=8, n_cross_layers=1, dropout=0.0)
LABELS = LabelMaps({"loud": ("quiet", "loud"), "topic": ("a", "b", "c")})
DOCUMENTS = 9
# Both paths run the same float32 models on the same features; batches of other sizes may take
# other BLAS kernels, hence not exactly 0.
TOLERANCE = 1e-6


def fold_checkpoints(folder: Path, timing: dict | None = None, folds: int = 2, seed: int = 0) -> Path:
    """Tiny random fold models whose checkpoints say they were trained on logmel + hashngram,
    with the segment timing columns ``timing`` (a feature set's ``timing``) or without any."""
    torch.manual_seed(seed)
    features = {"audio_encoder": AUDIO, "text_encoder": TEXT, "audio_fingerprint": encoder_fingerprint("audio", AUDIO),
                "text_fingerprint": encoder_fingerprint("text", TEXT), "timing": timing}
    extra_audio, extra_text = (len(timing["audio"]), len(timing["text"])) if timing else (0, 0)
    config = dataclasses.replace(CONFIG, audio_dim=CONFIG.audio_dim + extra_audio, text_dim=CONFIG.text_dim + extra_text)
    for fold in range(folds):
        model = HilbertModel(config)
        info = CheckpointInfo(model=config, label_maps=LABELS, metrics={"score": 0.5 + 0.1 * fold}, features=features,
                              training={"data": {"max_segments": 4}})
        save_checkpoint(folder / f"fold_{fold}", model, info)
    return folder


def write_corpus(folder: Path, n: int = DOCUMENTS) -> Path:
    """Documents of 1 to 6 segments (more than the models' max_segments of 4 for some)."""
    records = []
    for i in range(n):
        seconds = 1.0 + 0.5 * (i % 6)
        write_tone(folder / "audio" / f"d{i}.wav", seconds=seconds + 0.2, frequency=130 + 40 * i)
        segments = [(0.5 * s, 0.5 * s + 0.4, f"word{i} part {s}") for s in range(1 + i % 6)]
        records.append(document(f"doc-{i:02d}", f"audio/d{i}.wav", segments))
    return write_manifest(folder, records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    manifest = write_corpus(root / "corpus")
    feature_set = extract_in_process(load_manifest(manifest), AUDIO, TEXT, root / "cache")
    assert feature_set.timing  # the model reads segment timing columns, as new runs do by default
    return root, manifest, fold_checkpoints(root / "model", feature_set.timing)


def test_ray_data_rows_equal_the_single_process_rows_in_manifest_order(local_ray, setup, tmp_path):
    root, manifest, model = setup
    corpus, predictor = load_manifest(manifest), load_predictor(model)
    _, probabilities = predict_probabilities(predictor, corpus, root / "cache")
    expected = predictions_table(corpus, predictor.label_maps, probabilities).to_pandas()

    report = run_batch_inference("predict", predictor, corpus, root / "cache", tmp_path / "p.parquet", address=None,
                                 actors=2, documents_per_batch=2, log=lambda line: None)
    assert report.documents == DOCUMENTS and report.actors == 2 and report.path == tmp_path / "p.parquet"
    got = pq.read_table(tmp_path / "p.parquet").to_pandas()
    assert got["doc_id"].tolist() == [d.doc_id for d in corpus]  # manifest order, every document once
    assert list(got.columns) == list(expected.columns)
    for task in LABELS.tasks:
        assert got[task].tolist() == expected[task].tolist()
    numbers = [c for c in expected.columns if "/p/" in c]
    assert np.abs(got[numbers].to_numpy(float) - expected[numbers].to_numpy(float)).max() <= TOLERANCE

    run_batch_inference("embed", predictor, corpus, root / "cache", tmp_path / "e.parquet", address=None,
                        actors=2, documents_per_batch=3, log=lambda line: None)
    embedded = pq.read_table(tmp_path / "e.parquet").to_pylist()
    reference = embeddings_table(predictor, corpus, root / "cache").to_pylist()
    assert [row["doc_id"] for row in embedded] == [row["doc_id"] for row in reference]
    for row, want in zip(embedded, reference):
        assert row["segments"] == want["segments"] <= 4  # the model's max_segments, applied on the actors too
        for name in ("audio_embedding", "text_embedding", "joint_embedding", "joint_pooling"):
            np.testing.assert_allclose(np.array(row[name]), np.array(want[name]), atol=TOLERANCE)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left beside the outputs


def test_a_failing_document_is_named_and_leaves_the_previous_table_whole(local_ray, setup, tmp_path):
    root, manifest, model = setup
    corpus, predictor = load_manifest(manifest), load_predictor(model)
    cache = tmp_path / "cache"
    feature_set = extract_in_process(corpus, AUDIO, TEXT, cache)
    out = tmp_path / "p.parquet"
    run_batch_inference("predict", predictor, corpus, cache, out, address=None, actors=1, documents_per_batch=4,
                        log=lambda line: None)
    before = out.read_bytes()
    # One document's text entry loses a segment row: still a whole cache entry, but its segments
    # no longer match the audio's, so the actor that loads it raises.
    broken = corpus.documents[5].doc_id
    entries = FeatureCache(cache)
    key = feature_set.documents[broken]["text"]
    entries.put("text", key, entries.get("text", key)[:-1], doc_id=broken, encoder=TEXT)

    with pytest.raises(BatchInferenceError, match=f"doc_id {broken!r}"):
        run_batch_inference("predict", predictor, corpus, cache, out, address=None, actors=2, documents_per_batch=2,
                            log=lambda line: None)
    assert out.read_bytes() == before  # the table of the earlier run, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "p.parquet"]  # no temporary left


def test_cli_with_an_address_runs_on_ray_data(local_ray, setup, tmp_path):
    root, manifest, model = setup
    runner = CliRunner()
    for command in ("predict", "embed"):
        out = tmp_path / f"{command}.parquet"
        done = runner.invoke(app, [command, str(model), str(manifest), str(out), "--cache", str(root / "cache"),
                                   "--address", "local", "--actors", "1", "--documents-per-batch", "4"])
        assert done.exit_code == 0, done.output
        assert "on 1 actor(s)" in done.output and "docs/s" in done.output
        assert pq.read_table(out).num_rows == DOCUMENTS
