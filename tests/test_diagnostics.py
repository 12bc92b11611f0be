"""Test (out-of-fold) outputs of a trial's fold models and the trial figures made from them, on
fold models trained in one process (no Ray) over a small synthetic feature cache."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hilbert.features.batches import DocumentFeatures, LabelMaps
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.train.out_of_fold import out_of_fold_outputs
from hilbert.evaluation.predictions import predict_documents
from hilbert.sweep.diagnostics import trial_figures
from hilbert.train.checkpoint import load_model
from hilbert.train.config import TrainConfig
from hilbert.train.folds import Fold, Split
from hilbert.train.loop import WorkerContext, train_folds
from hilbert.train.run import PreparedData, make_plan

AUDIO_DIM, TEXT_DIM, DOCUMENTS, FOLDS, MAX_SEGMENTS = 6, 8, 18, 3, 6
CLASSES = {"loud": ["quiet", "loud"], "topic": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, PreparedData]:
    """A cached corpus: 'loud' lives in the audio features, 'topic' in the text ones."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    cache = FeatureCache(root / "cache")
    entries, labels = {}, {}
    for i in range(DOCUMENTS):
        segments = int(rng.integers(2, 10))  # some longer than MAX_SEGMENTS
        loud, topic = i % 2, (i // 2) % 3
        audio = rng.normal(size=(segments, AUDIO_DIM)).astype(np.float32)
        audio[:, 0] += 2.0 * loud
        text = rng.normal(size=(segments, TEXT_DIM)).astype(np.float32)
        text[:, topic] += 2.0
        doc_id = f"doc{i:02d}"
        cache.put("audio", f"a{i:063d}", audio, doc_id=doc_id, encoder="synthetic")
        cache.put("text", f"t{i:063d}", text, doc_id=doc_id, encoder="synthetic")
        entries[doc_id] = {"audio": f"a{i:063d}", "text": f"t{i:063d}", "segments": segments}
        labels[doc_id] = {"loud": loud, "topic": -1 if i % 5 == 0 else topic}
    feature_set = FeatureSet("synthetic", "sha", "synthetic", "synthetic", {}, {}, AUDIO_DIM, TEXT_DIM, entries)
    # Folds in an order unlike the corpus order, so "aligned to the corpus" is a real check.
    fold_of = {doc_id: (i * 2 + i // 9) % FOLDS for i, doc_id in enumerate(entries)}
    folds = []
    for fold in range(FOLDS):
        rest = [d for d, f in fold_of.items() if f != fold]
        folds.append(Fold(fold, 0, train=[d for j, d in enumerate(rest) if j % 3], validation=rest[::3],
                          test=[d for d, f in fold_of.items() if f == fold]))
    split = Split(FOLDS, 0, "loud", 0.3, 1, folds)
    config = TrainConfig(model={"d_model": 16, "d_embed": 16, "n_heads": 2, "pooling_heads": 2, "n_experts": 3,
                                "expert_hidden": 16, "n_cross_layers": 1, "dropout": 0.0})
    config.data.cache_dir = str(cache.root)
    config.data.max_segments = MAX_SEGMENTS
    config.optimization.epochs = 2
    config.optimization.batch_size = 4
    config.optimization.learning_rate = 3e-3
    return config, PreparedData(None, feature_set, LabelMaps({t: tuple(c) for t, c in CLASSES.items()}),  # type: ignore[arg-type]
                                labels, split)


_trained: dict[str, tuple[Path, dict]] = {}


@pytest.fixture
def trial(corpus, tmp_path_factory: pytest.TempPathFactory, request) -> tuple[Path, dict]:
    """``(folder with fold_<i>/ best models, plan)`` of one variant, trained once per module."""
    variant = request.param
    if variant not in _trained:
        config, data = corpus
        plan = make_plan(config, data, variant)
        folder = tmp_path_factory.mktemp(variant)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: more threads only contend on 2 cores
        try:
            train_folds(plan, WorkerContext(report=_keep_best_models(folder)))
        finally:
            torch.set_num_threads(threads)
        _trained[variant] = folder, plan
    return _trained[variant]


def _keep_best_models(folder: Path):
    """A report callback that keeps each epoch checkpoint's best fold models as fold_<i>/,
    the layout ``hilbert train`` leaves per variant."""

    def report(metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        for best in checkpoint.glob("fold_*_best"):
            target = folder / best.name.removesuffix("_best")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(best, target)
        shutil.rmtree(checkpoint)

    return report


def test_fold_of(plan: dict) -> dict[str, int]:
    """doc_id -> the fold whose test documents it is in."""
    return {doc_id: fold["index"] for fold in plan["folds"] for doc_id in fold["test"]}


test_fold_of.__test__ = False  # a helper, not a test


def _predict_alone(folds_dir: Path, plan: dict, fold: int, doc_id: str) -> dict[str, np.ndarray]:
    model, _ = load_model(folds_dir / f"fold_{fold}")
    dataset = DocumentFeatures(FeatureCache(plan["cache_dir"]), FeatureSet(**plan["feature_set"]), [doc_id],
                               [plan["labels"][doc_id]], MAX_SEGMENTS)
    return predict_documents(model, dataset, torch.device("cpu"))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=40)
    return buffer.getvalue()


ALL_VARIANTS = ["hilbert", "linear_head", "audio_only", "text_only"]


@pytest.mark.parametrize("trial", ["hilbert"], indirect=True)
def test_every_document_is_predicted_once_by_its_own_folds_model(trial):
    folds_dir, plan = trial
    outputs = out_of_fold_outputs(folds_dir, plan)
    fold_of = test_fold_of(plan)
    assert outputs.doc_ids == list(plan["labels"])  # each exactly once, in corpus order
    assert outputs.folds.tolist() == [fold_of[d] for d in outputs.doc_ids] and not outputs.repeats.any()
    for task in CLASSES:
        assert outputs.labels[task].tolist() == [plan["labels"][d][task] for d in outputs.doc_ids]
        assert outputs.probabilities[task].shape == (DOCUMENTS, len(CLASSES[task]))
    for row, doc_id in enumerate(outputs.doc_ids):
        own = fold_of[doc_id]
        alone = _predict_alone(folds_dir, plan, own, doc_id)
        other = _predict_alone(folds_dir, plan, (own + 1) % FOLDS, doc_id)
        for task in CLASSES:
            np.testing.assert_allclose(outputs.probabilities[task][row], alone[f"probabilities/{task}"][0], atol=1e-5)
            assert not np.allclose(outputs.probabilities[task][row], other[f"probabilities/{task}"][0], atol=1e-5)
        for name in ("audio", "text", "joint", "gates"):
            array = outputs.gates if name == "gates" else outputs.embeddings[name]
            np.testing.assert_allclose(array[row], alone[name][0], atol=1e-5)


@pytest.mark.parametrize("trial", ALL_VARIANTS, indirect=True)
def test_variants_give_consistent_outputs_and_figures_that_save_as_png(trial):
    folds_dir, plan = trial
    variant = plan["variant"]
    outputs = out_of_fold_outputs(folds_dir, plan, attention_documents=2)
    assert sorted(outputs.doc_ids) == sorted(plan["labels"])
    for task, probabilities in outputs.probabilities.items():
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    expected_spaces = {"hilbert": {"audio", "text", "joint"}, "linear_head": {"audio", "text", "joint"},
                       "audio_only": {"audio", "joint"}, "text_only": {"text", "joint"}}[variant]
    assert set(outputs.embeddings) == expected_spaces
    assert all(e.shape[0] == DOCUMENTS for e in outputs.embeddings.values())
    if variant == "linear_head":
        assert outputs.gates is None
    else:
        assert outputs.gates.shape == (DOCUMENTS, 3)
        np.testing.assert_allclose(outputs.gates.sum(axis=1), 1.0, atol=1e-5)

    # Attention: the first documents of fold 0, each cut to its own (subsampled) segment count.
    first_of_fold_0 = plan["folds"][0]["test"][:2]
    assert outputs.attention_doc_ids == first_of_fold_0
    modalities = 1 if variant.endswith("_only") else 2
    for doc_id, weights in zip(outputs.attention_doc_ids, outputs.attention):
        segments = min(plan["feature_set"]["documents"][doc_id]["segments"], MAX_SEGMENTS)
        assert weights.shape == (2, modalities, segments)
        np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, atol=1e-5)  # one distribution per head

    figures = trial_figures(outputs, None)
    expected = {"roc_curves", "confusion_matrices", "cka", "segment_attention"}
    assert set(figures) == expected | (set() if variant == "linear_head" else {"expert_utilisation"})
    for name, figure in figures.items():
        assert isinstance(figure, Figure), name
        assert _png(figure).startswith(b"\x89PNG\r\n\x1a\n"), name


@pytest.mark.parametrize("trial", ["linear_head"], indirect=True)
def test_no_attention_documents_and_class_names_given(trial):
    folds_dir, plan = trial
    outputs = out_of_fold_outputs(folds_dir, plan, attention_documents=0)
    assert outputs.attention == [] and outputs.attention_doc_ids == []
    figures = trial_figures(outputs, {"loud": ["soft", "LOUD"], "topic": ["x", "y", "z"]})
    assert "segment_attention" not in figures and "expert_utilisation" not in figures
    labels = [text.get_text() for text in figures["confusion_matrices"].axes[0].get_xticklabels()]
    assert labels == ["soft", "LOUD"]


@pytest.mark.parametrize("trial", ["hilbert"], indirect=True)
def test_a_missing_fold_model_is_an_error_not_a_smaller_corpus(trial, tmp_path: Path):
    folds_dir, plan = trial
    partial = tmp_path / "partial"
    for fold in (0, 2):
        shutil.copytree(folds_dir / f"fold_{fold}", partial / f"fold_{fold}")
    with pytest.raises(FileNotFoundError, match="fold 1"):
        out_of_fold_outputs(partial, plan)
    shutil.copytree(folds_dir / "fold_0", partial / "fold_1")  # another fold's model in fold_1/
    with pytest.raises(ValueError, match="trained for fold 0"):
        out_of_fold_outputs(partial, plan)

