"""Held-out scoring as library functions, on a small demo corpus split as `hilbert demo` splits it
(whole speakers held out) with real logmel/hashngram features: the scorer promotion compares
models by, and the logistic-regression baseline the champion has to beat."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from conftest import extract_in_process
from hilbert.data.demo import split_held_out, write_demo_corpus
from hilbert.data.manifest import Manifest, load_manifest
from hilbert.features.batches import LabelMaps
from hilbert.held_out import held_out_baseline, held_out_metric, held_out_scorer, mean_auc
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.predict import evaluate_corpus, load_predictor
from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

ENCODERS = ("logmel", "hashngram")


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The baseline's scikit-learn fits through one BLAS thread: on a busy 2-core machine more
    threads made these tests 25 times slower (140 s instead of 5 s; the `baseline` fixture too)."""
    with threadpool_limits(1):
        yield


@dataclasses.dataclass
class SplitCorpus:
    development: Manifest
    held_out: Manifest
    held_out_path: Path
    cache: Path
    feature_set: object  # of the whole corpus, as the demo extracts it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SplitCorpus:
    """60 demo documents of 10 speakers; 2 speakers (12 documents) held out, and both of them
    have the same voice, so `voice` has no AUC there (as in `hilbert demo --documents 60`)."""
    folder = tmp_path_factory.mktemp("held-out")
    manifest_path = write_demo_corpus(folder / "corpus", n_documents=60, seed=0)
    development_path, held_out_path = split_held_out(manifest_path, seed=0)
    feature_set = extract_in_process(load_manifest(manifest_path), *ENCODERS, folder / "cache")
    return SplitCorpus(load_manifest(development_path), load_manifest(held_out_path), held_out_path,
                       folder / "cache", feature_set)


@pytest.fixture(scope="module")
def baseline(corpus: SplitCorpus) -> dict[str, float]:
    with threadpool_limits(1):
        return held_out_baseline(LabelMaps.from_manifest(corpus.development), corpus.development, corpus.held_out,
                                 corpus.cache, corpus.feature_set)


def with_flipped(corpus: Manifest, task: str, classes: tuple[str, str]) -> Manifest:
    """The same documents with the two classes of a binary ``task`` swapped (nulls stay null)."""
    swap = {classes[0]: classes[1], classes[1]: classes[0]}
    documents = [dataclasses.replace(doc, labels={**doc.labels, task: swap.get(doc.labels.get(task))})
                 for doc in corpus]
    return Manifest(corpus.path, documents)


def fold_models(folder: Path, label_maps: LabelMaps, feature_set, folds: int = 2) -> Path:
    """``folder/fold_<i>``: tiny random models over the corpus's features, as a trial logs them."""
    config = HilbertModelConfig(audio_dim=feature_set.audio_dim, text_dim=feature_set.text_dim,
                                tasks=label_maps.sizes(), d_model=8, d_embed=8, n_heads=2, pooling_heads=2,
                                n_experts=2, expert_hidden=8, n_cross_layers=1, dropout=0.0)
    for fold in range(folds):
        model = HilbertModel(config)
        info = CheckpointInfo(model=config, label_maps=label_maps, metrics={"score": 0.5 + fold / 10},
                              features={"audio_encoder": ENCODERS[0], "text_encoder": ENCODERS[1]})
        save_checkpoint(folder / f"fold_{fold}", model, info, torch.optim.AdamW(model.parameters()))
    return folder


def test_mean_auc_leaves_out_tasks_without_an_auc():
    metrics = {"a/auc": 0.8, "b/auc": math.nan, "c/auc": 0.6, "a/macro_f1": 0.1}
    assert mean_auc(metrics, ["a", "b", "c"]) == pytest.approx(0.7)
    assert mean_auc(metrics, ["a", "missing"]) == pytest.approx(0.8)
    assert math.isnan(mean_auc(metrics, ["b", "missing"]))


def test_the_scorer_is_the_mean_macro_auc_of_the_fold_ensemble_over_tasks_that_have_one(corpus, tmp_path):
    label_maps = LabelMaps.from_manifest(corpus.development)
    folder = fold_models(tmp_path / "model", label_maps, corpus.feature_set)
    metrics = evaluate_corpus(load_predictor(folder), corpus.held_out, corpus.cache)
    assert math.isnan(metrics["voice/auc"])  # the held-out speakers share one voice
    scored = [metrics[f"{task}/auc"] for task in label_maps.tasks if task != "voice"]
    assert all(0.0 <= value <= 1.0 for value in scored)

    score = held_out_scorer(corpus.held_out, corpus.cache)(folder)

    assert score == pytest.approx(sum(scored) / len(scored))
    assert str(corpus.held_out_path) in held_out_metric(corpus.held_out_path)


def test_the_baseline_scores_every_task_on_the_held_out_documents(corpus, baseline):
    for task in LabelMaps.from_manifest(corpus.development).tasks:
        assert {f"{task}/auc", f"{task}/balanced_accuracy", f"{task}/macro_f1"} <= set(baseline)
    assert math.isnan(baseline["voice/auc"])
    # topic is in the words, and mean-pooled hashed n-grams carry it: clearly above chance.
    assert baseline["topic/auc"] > 0.7


def test_the_baseline_is_fit_on_development_documents_only(corpus, baseline):
    """The held-out labels only score: flipping a binary task's labels there mirrors its AUC and
    leaves every other task's figures as they were."""
    label_maps = LabelMaps.from_manifest(corpus.development)
    flipped_held_out = with_flipped(corpus.held_out, "stance", label_maps.classes["stance"])

    flipped = held_out_baseline(label_maps, corpus.development, flipped_held_out, corpus.cache, corpus.feature_set)

    assert flipped["stance/auc"] == pytest.approx(1.0 - baseline["stance/auc"])
    for task in ("arousal", "topic"):
        assert flipped[f"{task}/auc"] == pytest.approx(baseline[f"{task}/auc"])
