"""The training loop in one process: it learns, checkpoints round-trip, a resumed run equals an
uninterrupted one. Ray Train (DDP) paths are in test_training_ray.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hilbert.config import to_dict
from hilbert.features.batches import LabelMaps
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.train.checkpoint import CheckpointInfo, CheckpointMismatch, load_model, load_training_state, save_checkpoint
from hilbert.train.config import TrainConfig
from hilbert.train.folds import make_split
from hilbert.train.loop import WorkerContext, train_folds
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.train.report import REPEATED_REPORT

AUDIO_DIM, TEXT_DIM = 12, 20


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def synthetic_plan(tmp_path: Path, *, documents: int = 48, epochs: int = 3, folds: int = 2, dropout: float = 0.0,
                   patience: int = 20) -> dict:
    """A cached corpus where task 'loud' is in the audio features and 'topic' in the text ones."""
    rng = np.random.default_rng(0)
    cache = FeatureCache(tmp_path / "cache")
    loud = rng.integers(0, 2, documents)
    topic = rng.integers(0, 3, documents)
    entries, labels = {}, {}
    for i in range(documents):
        segments = int(rng.integers(3, 9))
        audio = rng.normal(size=(segments, AUDIO_DIM)).astype(np.float32)
        audio[:, 0] += 2.0 * loud[i]
        text = rng.normal(size=(segments, TEXT_DIM)).astype(np.float32)
        text[:, topic[i]] += 2.0
        doc_id = f"d{i:03d}"
        cache.put("audio", f"a{i:063d}", audio, doc_id=doc_id, encoder="synthetic")
        cache.put("text", f"t{i:063d}", text, doc_id=doc_id, encoder="synthetic")
        entries[doc_id] = {"audio": f"a{i:063d}", "text": f"t{i:063d}", "segments": segments}
        labels[doc_id] = {"loud": int(loud[i]), "topic": -1 if i % 7 == 0 else int(topic[i])}
    feature_set = FeatureSet("synthetic", "sha", "synthetic", "synthetic", {}, {}, AUDIO_DIM, TEXT_DIM, entries)
    label_maps = LabelMaps({"loud": ("quiet", "loud"), "topic": ("a", "b", "c")})
    config = TrainConfig(model={"d_model": 32, "d_embed": 32, "n_heads": 2, "pooling_heads": 2, "n_experts": 2,
                                "expert_hidden": 32, "n_cross_layers": 1, "dropout": dropout})
    config.optimization.epochs = epochs
    config.optimization.batch_size = 8
    config.optimization.learning_rate = 3e-3
    config.optimization.patience = patience
    return {"config": to_dict(config), "variant": "hilbert", "cache_dir": str(cache.root),
            "feature_set": to_dict(feature_set), "label_maps": label_maps.to_json(), "labels": labels,
            "folds": simple_folds(list(entries), folds)}


def simple_folds(doc_ids: list[str], k: int, validation_every: int = 4) -> list[dict]:
    """Plan folds (hilbert.train.folds.Fold as JSON): document i is tested in fold i % k; every
    ``validation_every``-th other document is that fold's validation, the rest its training."""
    folds = []
    for fold in range(k):
        test = [d for i, d in enumerate(doc_ids) if i % k == fold]
        rest = [d for i, d in enumerate(doc_ids) if i % k != fold]
        folds.append({"index": fold, "repeat": 0, "test": test, "validation": rest[::validation_every],
                      "train": [d for j, d in enumerate(rest) if j % validation_every]})
    return folds


class Recorder:
    """A WorkerContext.report that keeps metrics and copies checkpoints, as Ray Train would."""

    def __init__(self, folder: Path, die_after_epoch: int | None = None):
        self.folder = folder
        self.die_after_epoch = die_after_epoch
        self.metrics: list[dict] = []
        self.checkpoints: list[Path] = []

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        self.metrics.append(metrics)
        if checkpoint is not None:
            kept = self.folder / f"epoch_{metrics['epoch']}"
            shutil.copytree(checkpoint, kept)
            shutil.rmtree(checkpoint)
            self.checkpoints.append(kept)
        if metrics["epoch"] == self.die_after_epoch:
            raise WorkerDied


class WorkerDied(RuntimeError):
    pass


def test_training_beats_chance_on_both_tasks_and_reports_every_epoch(tmp_path: Path):
    recorder = Recorder(tmp_path / "reports")
    results = train_folds(synthetic_plan(tmp_path, documents=72, epochs=8), WorkerContext(report=recorder))
    assert [m["epoch"] for m in recorder.metrics] == list(range(8))
    for fold in results.values():
        assert fold["test/loud/auc"] > 0.8 and fold["test/topic/auc"] > 0.8, fold
        assert 0 <= fold["epoch"] < 8 and fold["val/score"] > 0.5
    last = recorder.metrics[-1]
    for key in ("train/task", "train/contrastive", "train/cka", "train/balance", "train/temperature",
                "val/loud/auc", "val/recall@1/audio_joint", "val/cka/text_joint", "val/balance_gap",
                "val/experts/entropy", "objective", "test/objective", "test/loud/auc", "test/cka/text_joint"):
        assert key in last, key
    # The test documents are scored once, after training: no earlier report names them.
    assert not any(key.startswith("test/") for report in recorder.metrics[:-1] for key in report)


def test_test_documents_never_influence_the_chosen_epoch(tmp_path: Path):
    """Scrambling the labels of fold 0's test documents changes fold 0's test figures and nothing
    it chose: its epoch and that epoch's validation score. (Those documents train the other
    fold, whose choices may change.)"""
    expected = train_folds(synthetic_plan(tmp_path / "a", epochs=6), WorkerContext())
    scrambled = synthetic_plan(tmp_path / "b", epochs=6)
    rng = np.random.default_rng(1)
    for doc_id in scrambled["folds"][0]["test"]:
        scrambled["labels"][doc_id] = {"loud": int(rng.integers(0, 2)), "topic": int(rng.integers(0, 3))}
    results = train_folds(scrambled, WorkerContext())
    assert results[0]["epoch"] == expected[0]["epoch"]
    assert results[0]["val/score"] == pytest.approx(expected[0]["val/score"], abs=1e-9)
    assert results[0]["test/loud/auc"] != pytest.approx(expected[0]["test/loud/auc"], abs=1e-3)


def test_without_early_stopping_the_last_epoch_is_reported(tmp_path: Path):
    plan = synthetic_plan(tmp_path, epochs=4, patience=1)
    plan["config"]["optimization"]["early_stopping"] = False
    recorder = Recorder(tmp_path / "reports")
    results = train_folds(plan, WorkerContext(report=recorder))
    assert len(recorder.metrics) == 4 and all(fold["epoch"] == 3 for fold in results.values())


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path):
    full = Recorder(tmp_path / "full")
    expected = train_folds(synthetic_plan(tmp_path / "a", epochs=4, dropout=0.2), WorkerContext(report=full))
    first = Recorder(tmp_path / "first", die_after_epoch=1)
    with pytest.raises(WorkerDied):  # the worker dies after epoch 1's checkpoint
        train_folds(synthetic_plan(tmp_path / "b", epochs=4, dropout=0.2), WorkerContext(report=first))
    resumed = Recorder(tmp_path / "resumed")
    results = train_folds(synthetic_plan(tmp_path / "b", epochs=4, dropout=0.2),
                          WorkerContext(report=resumed, resume_from=first.checkpoints[-1]))
    # First the restored epoch's report again (its consumer may have died before reading it),
    # marked as a repeat; then the epochs that were left.
    repeated, *continued = resumed.metrics
    assert repeated.pop(REPEATED_REPORT) is True
    assert repeated == {k: v for k, v in first.metrics[1].items() if k != "time/checkpoint_seconds"}
    assert [m["epoch"] for m in continued] == [2, 3] and not any(REPEATED_REPORT in m for m in continued)
    for fold, metrics in expected.items():
        assert results[fold]["val/score"] == pytest.approx(metrics["val/score"], abs=1e-6)
        assert results[fold]["test/score"] == pytest.approx(metrics["test/score"], abs=1e-6)
    assert resumed.metrics[-1]["train/total"] == pytest.approx(full.metrics[-1]["train/total"], rel=1e-5)


def test_a_run_continued_with_another_model_is_refused_naming_the_fields(tmp_path: Path):
    """A checkpoint of one architecture never loads into another (a run resumed after its model
    config, or a default, changed): the error names each differing field and both values."""
    first = Recorder(tmp_path / "first", die_after_epoch=0)
    with pytest.raises(WorkerDied):
        train_folds(synthetic_plan(tmp_path / "run", epochs=3), WorkerContext(report=first))
    changed = synthetic_plan(tmp_path / "run", epochs=3)
    changed["config"]["model"]["streams"] = "shared"
    with pytest.raises(CheckpointMismatch, match=r"model\.streams='separate'.*this run builds model\.streams='shared'"):
        train_folds(changed, WorkerContext(resume_from=first.checkpoints[-1]))


def test_early_stopping_ends_folds_without_improvement(tmp_path: Path):
    recorder = Recorder(tmp_path / "reports")
    train_folds(synthetic_plan(tmp_path, epochs=30, patience=2), WorkerContext(report=recorder))
    assert len(recorder.metrics) < 30 and recorder.metrics[-1]["active_folds"] == 0


def test_checkpoint_round_trips_weights_outputs_and_optimizer_without_pickle(tmp_path: Path):
    config = HilbertModelConfig(audio_dim=AUDIO_DIM, text_dim=TEXT_DIM, tasks={"loud": 2}, d_model=16, d_embed=16,
                                n_heads=2, pooling_heads=2, n_experts=2, expert_hidden=16, dropout=0.0)
    model = HilbertModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    audio, text, mask = torch.randn(3, 5, AUDIO_DIM), torch.randn(3, 5, TEXT_DIM), torch.ones(3, 5, dtype=torch.bool)
    model(audio, text, mask).logits["loud"].sum().backward()
    optimizer.step()
    info = CheckpointInfo(model=config, label_maps=LabelMaps({"loud": ("quiet", "loud")}), epoch=3)
    folder = save_checkpoint(tmp_path / "ckpt", model, info, optimizer, {"note": "x"})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "extra.json", "model.safetensors",
                                                        "optimizer.json", "optimizer.safetensors"]
    loaded, loaded_info = load_model(folder)
    model.eval()
    torch.testing.assert_close(loaded(audio, text, mask).logits["loud"], model(audio, text, mask).logits["loud"],
                               rtol=0, atol=0)
    assert loaded_info.label_maps.classes == {"loud": ("quiet", "loud")} and loaded_info.epoch == 3
    fresh = HilbertModel(config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    _, extra = load_training_state(folder, fresh, fresh_optimizer)
    assert extra == {"note": "x"}
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_optimizer.state_dict()["state"].values()):
        for name in a:
            torch.testing.assert_close(torch.as_tensor(a[name]), torch.as_tensor(b[name]), rtol=0, atol=0)


def test_fixed_split_groups_stay_together_and_strata_are_spread(tiny_corpus: Path):
    from hilbert.data.manifest import load_manifest

    manifest = load_manifest(tiny_corpus)
    split = make_split(manifest, 2, stratify="topic", seed=0, validation_fraction=0)
    groups = {}
    for fold in split.folds:
        for doc_id in fold.test:
            groups.setdefault(manifest.by_id()[doc_id].group, set()).add(fold.index)
    assert all(len(folds) == 1 for folds in groups.values())
    assert sorted(d for fold in split.folds for d in fold.test) == ["d0", "d1", "d2", "d3"]
