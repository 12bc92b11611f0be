"""Segment timing as model input: the formulas on hand-made segments, the cached rows (reused,
content-addressed, named by the feature set), their columns in the model's audio and text inputs
(aligned after subsampling, standardised on training documents only), training with and without
them, and feature sets and checkpoints from before they existed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import document, write_manifest, write_tone
from hilbert.config import to_dict
from hilbert.data.manifest import Segment, load_manifest
from hilbert.features.batches import DocumentFeatures, LabelMaps, segment_statistics
from hilbert.features.cache import CacheError, FeatureCache, FeatureSet, entry_name
from hilbert.features.extract import extract_features
from hilbert.features.timing import AUDIO_COLUMNS, TEXT_COLUMNS, segment_timing, timing_fingerprint
from hilbert.predict import ModelLocationError, load_predictor, predict_probabilities
from hilbert.train.checkpoint import load_model
from hilbert.train.config import VARIANTS, TrainConfig, stored_train_config
from hilbert.train.loop import WorkerContext, train_folds
from hilbert.train.plan import Plan, fold_dataset

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

AUDIO, TEXT = "logmel", "hashngram?dim=16"
AUDIO_DIM, TEXT_DIM = 140, 16  # logmel's width, and the hashed n-grams'
A, T = len(AUDIO_COLUMNS), len(TEXT_COLUMNS)


def slog(value: float) -> float:
    return math.copysign(math.log1p(abs(value)), value)


# formulas ----------------------------------------------------------------------------------
def test_formulas_on_sorted_segments_with_a_lead_in_and_pauses():
    audio, text = segment_timing([Segment(0.5, 2.5, "so how was the week"), Segment(3.0, 4.0, "fine"),
                                  Segment(6.0, 10.0, "not bad at all")])
    assert audio.shape == (3, A) and text.shape == (3, T) and audio.dtype == text.dtype == np.float32
    np.testing.assert_allclose(audio[:, 0], np.log1p([2.0, 1.0, 4.0]), rtol=1e-6)  # duration
    np.testing.assert_allclose(audio[:, 1], np.log1p([0.5, 0.5, 2.0]), rtol=1e-6)  # first: its start (latency)
    np.testing.assert_allclose(audio[:, 2], [0.05, 0.3, 0.6], rtol=1e-6)  # start / end of the last speech
    np.testing.assert_allclose(audio[:, 3], np.log1p([0.5, 3.0, 6.0]), rtol=1e-6)  # seconds into the recording
    np.testing.assert_allclose(text[:, 0], np.log1p([5, 1, 4]), rtol=1e-6)  # words
    np.testing.assert_allclose(text[:, 1], np.log1p([15, 4, 11]), rtol=1e-6)  # characters, spaces left out


def test_overlapping_speech_gives_a_negative_pause_measured_from_the_latest_end():
    """A backchannel inside a long turn: the turn's next segment follows the turn, not the
    backchannel, and the backchannel itself overlaps the turn by 3 s."""
    audio, _ = segment_timing([Segment(0.0, 5.0, "a long turn"), Segment(1.0, 2.0, "mhm"), Segment(5.5, 7.0, "yes"),
                               Segment(6.5, 8.0, "no")])
    np.testing.assert_allclose(audio[:, 1], [0.0, slog(1.0 - 5.0), slog(0.5), slog(6.5 - 7.0)], rtol=1e-6)
    assert audio[1, 1] < 0 and audio[3, 1] < 0 and np.isfinite(audio).all()


def test_rows_follow_manifest_order_whatever_the_order_of_the_times():
    segments = [Segment(0.2, 1.0, "a"), Segment(1.5, 2.0, "b c"), Segment(3.0, 4.0, "d e f")]
    order = [2, 0, 1]
    audio, text = segment_timing(segments)
    shuffled_audio, shuffled_text = segment_timing([segments[i] for i in order])
    np.testing.assert_array_equal(shuffled_audio, audio[order])
    np.testing.assert_array_equal(shuffled_text, text[order])


def test_empty_and_whitespace_only_transcripts_count_zero_words_and_characters():
    _, text = segment_timing([Segment(0.0, 1.0, ""), Segment(1.0, 2.0, "  \t\n "), Segment(2.0, 3.0, " hi  there ")])
    np.testing.assert_array_equal(text[:2], np.zeros((2, T), np.float32))
    np.testing.assert_allclose(text[2], np.log1p([2, 7]), rtol=1e-6)


def test_speech_rate_is_the_difference_of_a_text_and_an_audio_column():
    """What the model may learn where the streams meet: log words per second."""
    audio, text = segment_timing([Segment(0.0, 20.0, " ".join(["word"] * 60))])
    assert text[0, 0] - audio[0, 0] == pytest.approx(math.log(3.0), abs=0.05)


# cache -------------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Three documents, one of seven segments (overlapping, one without words)."""
    write_tone(tmp_path / "audio" / "long.wav", seconds=8.0)
    write_tone(tmp_path / "audio" / "short.wav", seconds=3.0, frequency=300.0)
    long = [(0.3, 1.0, "one"), (1.1, 2.0, "two words"), (2.5, 3.5, ""), (3.2, 4.0, "overlap here now"),
            (4.5, 5.5, "five"), (6.0, 6.5, "six six"), (7.0, 7.9, "the very end")]
    records = [document("long", "audio/long.wav", long, labels={"topic": "a"}),
               document("short", "audio/short.wav", labels={"topic": "b"}),
               document("again", "audio/short.wav", [(0.0, 2.0, "different words entirely")], labels={"topic": "a"})]
    return write_manifest(tmp_path, records)


def test_timing_rows_are_cached_with_the_feature_set_and_reused(corpus: Path, tmp_path: Path):
    manifest = load_manifest(corpus)
    first = extract_features(manifest, AUDIO, TEXT, tmp_path / "cache", progress=False, in_process=True)
    assert (first.timing_computed, first.timing_reused) == (3, 0)
    feature_set = first.feature_set
    assert feature_set.timing == timing_fingerprint()
    cache = FeatureCache(tmp_path / "cache")
    for doc in manifest:
        rows = cache.load_timing(feature_set, doc.doc_id)
        np.testing.assert_array_equal(rows, np.hstack(segment_timing(doc.segments)))
    entry = cache.entry_path("timing", feature_set.documents["long"]["timing"])
    written = entry.stat().st_mtime_ns

    second = extract_features(manifest, AUDIO, TEXT, tmp_path / "cache", progress=False)
    assert second.cache_hit and (second.timing_computed, second.timing_reused) == (0, 3)
    assert second.feature_set.documents == feature_set.documents and entry.stat().st_mtime_ns == written


def test_timing_keys_follow_the_segments_times_and_texts_not_the_encoders(corpus: Path, tmp_path: Path):
    manifest = load_manifest(corpus)
    base = extract_features(manifest, AUDIO, TEXT, tmp_path / "cache", progress=False).feature_set
    other = extract_features(manifest, "logmel?n_mels=32", TEXT, tmp_path / "cache", progress=False).feature_set
    assert {d: e["timing"] for d, e in base.documents.items()} == {d: e["timing"] for d, e in other.documents.items()}
    lines = [json.loads(line) for line in corpus.read_text().splitlines()]
    lines[0]["segments"][2]["text"] = "now with words"
    lines[1]["segments"][0]["end"] = 0.9
    edited = load_manifest(write_manifest(tmp_path, lines, "edited.jsonl"))
    report = extract_features(edited, AUDIO, TEXT, tmp_path / "cache", progress=False)
    assert (report.timing_computed, report.timing_reused) == (2, 1)
    changed = {d for d, e in report.feature_set.documents.items() if e["timing"] != base.documents[d]["timing"]}
    assert changed == {"long", "short"}


def old_feature_set(feature_set: FeatureSet) -> FeatureSet:
    """``feature_set`` as hilbert wrote it before timing features: no ``timing``, anywhere."""
    payload = to_dict(feature_set)
    del payload["timing"]
    for entry in payload["documents"].values():
        del entry["timing"]
    return FeatureSet(**json.loads(json.dumps(payload)))


def test_a_feature_set_written_before_timing_loads_and_reads_without_it(corpus: Path, tmp_path: Path):
    manifest = load_manifest(corpus)
    cache = FeatureCache(tmp_path / "cache")
    new = extract_features(manifest, AUDIO, TEXT, cache.root, progress=False).feature_set
    old = old_feature_set(new)
    cache.write_feature_set(old)
    read = cache.read_feature_set(old.manifest_sha256, AUDIO, TEXT)
    assert read is not None and read.timing is None
    dataset = DocumentFeatures(cache, read, ["long"], [{"topic": 0}])
    assert (dataset[0]["audio"].shape, dataset[0]["text"].shape) == ((7, AUDIO_DIM), (7, TEXT_DIM))
    with pytest.raises(CacheError, match="before segment timing features existed"):
        DocumentFeatures(cache, read, ["long"], [{"topic": 0}], timing=timing_fingerprint())
    # A run with data.timing on such a set trains without timing, and its checkpoints say so.
    plan = Plan(TrainConfig(), "hilbert", str(cache.root), read, LabelMaps({"topic": ("a", "b")}), {}, [])
    assert plan.timing is None and plan.input_dims == (AUDIO_DIM, TEXT_DIM)
    # Extracting again upgrades it.
    assert extract_features(manifest, AUDIO, TEXT, cache.root, progress=False).feature_set.timing is not None


# model inputs ------------------------------------------------------------------------------
def test_timing_columns_join_their_stream_and_stay_aligned_after_subsampling(corpus: Path, tmp_path: Path):
    manifest = load_manifest(corpus)
    cache = FeatureCache(tmp_path / "cache")
    feature_set = extract_features(manifest, AUDIO, TEXT, cache.root, progress=False).feature_set
    dataset = DocumentFeatures(cache, feature_set, ["long", "short"], [{"topic": 0}] * 2, max_segments=3,
                               timing=feature_set.timing)
    audio_features, text_features = cache.load_document(feature_set, "long")
    audio_timing, text_timing = segment_timing(manifest.documents[0].segments)
    keep = [0, 3, 6]  # evenly spaced rows of seven
    item = dataset[0]
    assert item["audio"].shape == (3, AUDIO_DIM + A) and item["text"].shape == (3, TEXT_DIM + T)
    np.testing.assert_array_equal(item["audio"], np.hstack([audio_features, audio_timing])[keep])
    np.testing.assert_array_equal(item["text"], np.hstack([text_features, text_timing])[keep])
    # Timing of the full document (the pause before segment 3 is its 0.7 s overlap with segment 2,
    # not a gap to the segment kept before it).
    assert item["audio"][1, AUDIO_DIM + 1] == pytest.approx(slog(3.2 - 3.5), rel=1e-6)
    assert dataset[1]["audio"].shape == (2, AUDIO_DIM + A)


def timing_plan(tmp_path: Path, *, documents: int = 24, epochs: int = 2, timing: bool = True,
                variant: str = "hilbert") -> dict:
    """A cached corpus with timing entries, in two folds; the documents tested in fold 0 (and
    trained on in fold 1) pause ten times longer, so statistics over every document differ from
    either training fold's. 'loud' documents speak slower."""
    rng = np.random.default_rng(0)
    cache = FeatureCache(tmp_path / "cache")
    entries, labels, fold_of = {}, {}, {}
    for i in range(documents):
        doc_id, loud, fold_of[f"d{i:03d}"] = f"d{i:03d}", i % 2, (i // 2) % 2
        segments, start = [], float(rng.uniform(0.1, 1.0))
        for _ in range(int(rng.integers(3, 7))):
            end = start + float(rng.uniform(0.5, 3.0)) * (1 + loud)
            segments.append(Segment(start, end, " ".join(["w"] * int(rng.integers(0, 9)))))
            start = end + float(rng.uniform(0.1, 1.0)) * (10.0 if fold_of[doc_id] == 0 else 1.0)
        audio = rng.normal(size=(len(segments), 6)).astype(np.float32)
        text = rng.normal(size=(len(segments), 5)).astype(np.float32)
        cache.put("audio", f"a{i:063d}", audio, doc_id=doc_id, encoder="synthetic")
        cache.put("text", f"t{i:063d}", text, doc_id=doc_id, encoder="synthetic")
        cache.put("timing", f"c{i:063d}", np.hstack(segment_timing(segments)), doc_id=doc_id, encoder="timing")
        entries[doc_id] = {"audio": f"a{i:063d}", "text": f"t{i:063d}", "timing": f"c{i:063d}",
                           "segments": len(segments)}
        labels[doc_id] = {"loud": loud}
    folds = []
    for fold in (0, 1):
        rest = [d for d, f in fold_of.items() if f != fold]
        folds.append({"index": fold, "repeat": 0, "test": [d for d, f in fold_of.items() if f == fold],
                      "validation": rest[:4], "train": rest[4:]})
    feature_set = FeatureSet("synthetic", "sha", "synthetic", "synthetic", {}, {}, 6, 5, entries,
                             timing=timing_fingerprint())
    config = TrainConfig(model={"d_model": 16, "d_embed": 16, "n_heads": 2, "pooling_heads": 1, "n_experts": 2,
                                "expert_hidden": 16, "n_cross_layers": 1, "dropout": 0.0})
    config.data.timing = timing
    config = config.variant(variant)
    config.optimization.epochs, config.optimization.batch_size = epochs, 4
    return {"config": to_dict(config), "variant": variant, "cache_dir": str(cache.root),
            "feature_set": to_dict(feature_set), "label_maps": {"loud": ["quiet", "loud"]}, "labels": labels,
            "folds": folds}


class Checkpoints:
    """A WorkerContext.report that keeps the last checkpoint, as Ray Train would."""

    def __init__(self, folder: Path):
        self.folder, self.last = folder, None

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            import shutil

            self.last = Path(shutil.copytree(checkpoint, self.folder / f"epoch_{metrics['epoch']}"))


@pytest.mark.parametrize("timing, variant", [(True, "hilbert"), (False, "hilbert"), (True, "no_timing")])
def test_training_runs_with_and_without_timing_and_checkpoints_record_which(tmp_path: Path, timing, variant):
    plan = timing_plan(tmp_path, timing=timing, variant=variant)
    kept = Checkpoints(tmp_path / "kept")
    results = train_folds(plan, WorkerContext(report=kept))
    assert set(results) == {0, 1} and all(math.isfinite(fold["test/loud/auc"]) for fold in results.values())
    model, info = load_model(kept.last / "fold_0")
    with_timing = timing and variant != "no_timing"
    assert (model.config.audio_dim, model.config.text_dim) == ((6 + A, 5 + T) if with_timing else (6, 5))
    assert info.features.get("timing") == (timing_fingerprint() if with_timing else None)
    parsed = Plan.from_json(plan)
    item = fold_dataset(parsed, FeatureCache(parsed.cache_dir), 0, "train")[0]
    assert (item["audio"].shape[1], item["text"].shape[1]) == (model.config.audio_dim, model.config.text_dim)


def test_timing_columns_are_standardised_with_training_fold_statistics_only(tmp_path: Path):
    plan = timing_plan(tmp_path)
    kept = Checkpoints(tmp_path / "kept")
    train_folds(plan, WorkerContext(report=kept))
    parsed = Plan.from_json(plan)
    cache = FeatureCache(parsed.cache_dir)
    for fold in (0, 1):
        model, _ = load_model(kept.last / f"fold_{fold}")
        training = segment_statistics(fold_dataset(parsed, cache, fold, "train"))
        projection = model.projections["audio"]
        np.testing.assert_allclose(projection.feature_mean.numpy(), training["audio"][0].numpy(), rtol=1e-5)
        everything = segment_statistics(DocumentFeatures(cache, parsed.feature_set, list(parsed.labels),
                                                         list(parsed.labels.values()), timing=parsed.timing))
        pause = 6 + AUDIO_COLUMNS.index("pause")
        assert abs(float(projection.feature_mean[pause]) - float(everything["audio"][0][pause])) > 0.1
        text = model.projections["text"].feature_mean.numpy()
        np.testing.assert_allclose(text, training["text"][0].numpy(), rtol=1e-5)


# config ------------------------------------------------------------------------------------
def test_timing_is_on_by_default_and_the_no_timing_variant_turns_it_off():
    config = TrainConfig()
    assert config.data.timing and "no_timing" in VARIANTS
    ablation = config.variant("no_timing")
    assert not ablation.data.timing and ablation.model == config.model and ablation.loss == config.loss
    assert config.data.timing, "the variant edits a copy"
    assert all(config.variant(name).data.timing for name in VARIANTS if name != "no_timing")


def test_a_stored_config_from_before_timing_keeps_running_without_it():
    stored = to_dict(TrainConfig())
    del stored["data"]["timing"]
    assert not stored_train_config(stored).data.timing
    assert stored_train_config(to_dict(TrainConfig())).data.timing


# predict -----------------------------------------------------------------------------------
def test_predict_feeds_each_checkpoint_the_inputs_it_was_trained_with(corpus: Path, tmp_path: Path):
    """A model trained with timing predicts with it; one trained without (as every checkpoint
    from before timing existed) predicts from the encoder features alone, on the same corpus."""
    import shutil

    import torch

    from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
    from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint
    from hilbert.features.encoders import encoder_fingerprint

    manifest = load_manifest(corpus)
    labels = LabelMaps({"topic": ("a", "b")})
    described = {"audio_encoder": AUDIO, "text_encoder": TEXT, "audio_fingerprint": encoder_fingerprint("audio", AUDIO),
                 "text_fingerprint": encoder_fingerprint("text", TEXT)}
    outputs = {}
    for name, timing in (("old", None), ("timed", timing_fingerprint())):
        dims = (AUDIO_DIM + A, TEXT_DIM + T) if timing else (AUDIO_DIM, TEXT_DIM)
        config = HilbertModelConfig(audio_dim=dims[0], text_dim=dims[1], tasks={"topic": 2}, d_model=8, d_embed=8,
                                    n_heads=2, pooling_heads=1, n_experts=2, expert_hidden=8, n_cross_layers=1,
                                    dropout=0.0)
        features = {**described, "timing": timing} if timing else described
        save_checkpoint(tmp_path / name, HilbertModel(config), CheckpointInfo(config, labels, features=features),
                        torch.optim.AdamW(HilbertModel(config).parameters()))
        predictor = load_predictor(tmp_path / name)
        dataset, probabilities = predict_probabilities(predictor, manifest, tmp_path / "cache")
        assert dataset[0]["audio"].shape[1] == dims[0] and dataset[0]["text"].shape[1] == dims[1]
        outputs[name] = probabilities["topic"]
    assert all(np.isfinite(p).all() for p in outputs.values())
    # A checkpoint whose timing columns are not the ones this hilbert computes is refused.
    info = json.loads((tmp_path / "timed" / "checkpoint.json").read_text())
    info["features"]["timing"]["version"] = 0
    shutil.copytree(tmp_path / "timed", tmp_path / "stale")
    (tmp_path / "stale" / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(ModelLocationError, match="segment timing"):
        predict_probabilities(load_predictor(tmp_path / "stale"), manifest, tmp_path / "cache")


def test_housekeeping_keeps_live_timing_entries_and_prunes_orphans(corpus: Path, tmp_path: Path):
    import os
    import time

    from hilbert.features.housekeeping import cache_info, prune_cache

    manifest = load_manifest(corpus)
    cache = FeatureCache(tmp_path / "cache")
    feature_set = extract_features(manifest, AUDIO, TEXT, cache.root, progress=False).feature_set
    orphan = f"{7:064x}"
    cache.put("timing", orphan, np.zeros((1, A + T), np.float32), doc_id="gone", encoder="segment-timing v1")
    hours_ago = time.time() - 7200
    for path in (cache.root / "entries").rglob("*.safetensors"):
        os.utime(path, (hours_ago, hours_ago))
    info = cache_info(cache.root)
    rows = {(row.modality, row.encoder): row for row in info.encoders}
    assert (rows[("timing", "segment-timing v1")].entries, info.modalities["timing"].files) == (4, 4)
    assert rows[("timing", "segment-timing v1")].unreferenced_entries == 1
    [report] = prune_cache(cache.root)
    assert report.removed["timing entries"].files == 1
    assert not cache.entry_path("timing", orphan).exists()
    for doc_id, entry in feature_set.documents.items():
        assert cache.has("timing", entry["timing"]), doc_id
        assert entry_name("timing", entry["timing"]) in {p.relative_to(cache.root).as_posix()
                                                         for p in (cache.root / "entries").rglob("*.safetensors")}
