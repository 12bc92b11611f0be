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


def trained_fold_models(corpus: SplitCorpus, folder: Path) -> Path:
    """``folder/fold_<i>``: fold models trained for one epoch by the training loop on the
    development documents, with the record of the documents each saw."""
    import shutil

    from hilbert.config import to_dict
    from hilbert.train.config import TrainConfig
    from hilbert.train.loop import WorkerContext, train_folds
    from test_training import Recorder, simple_folds

    label_maps = LabelMaps.from_manifest(corpus.development)
    config = TrainConfig(model={"d_model": 8, "d_embed": 8, "n_heads": 2, "pooling_heads": 2, "n_experts": 2,
                                "expert_hidden": 8, "n_cross_layers": 1, "dropout": 0.0})
    config.optimization.epochs, config.optimization.batch_size, config.optimization.early_stopping = 1, 8, False
    development = [doc.doc_id for doc in corpus.development]
    plan = {"config": to_dict(config), "variant": "hilbert", "cache_dir": str(corpus.cache),
            "feature_set": to_dict(corpus.feature_set), "label_maps": label_maps.to_json(),
            "labels": {doc.doc_id: label_maps.encode(doc) for doc in corpus.development},
            "folds": simple_folds(development, 2)}
    recorder = Recorder(folder / "reports")
    train_folds(plan, WorkerContext(report=recorder))
    for fold in (0, 1):
        shutil.copytree(recorder.checkpoints[-1] / f"fold_{fold}", folder / "model" / f"fold_{fold}")
    return folder / "model"


def test_documents_the_model_trained_on_are_caught_by_content_and_reported_excluded_or_refused(corpus, tmp_path):
    """A development document renamed into the held-out corpus is still the document the fold
    models saw: `report` counts it, `exclude` scores the held-out documents alone (the same
    figures as without it), `refuse` names it, and so does the held-out scorer promotion uses."""
    from hilbert.predict import SeenDocumentsError

    folder = trained_fold_models(corpus, tmp_path)
    leaked = dataclasses.replace(corpus.development.documents[0], doc_id="renamed-development-document")
    mixed = Manifest(corpus.held_out.path, [*corpus.held_out.documents, leaked])
    predictor = load_predictor(folder)

    clean = evaluate_corpus(predictor, corpus.held_out, corpus.cache, seen="refuse")
    assert clean["documents/seen_in_training"] == 0 and clean["documents/evaluated"] == len(corpus.held_out)

    reported = evaluate_corpus(predictor, mixed, corpus.cache)
    assert reported["documents/seen_in_training"] == 1 and reported["documents/evaluated"] == len(mixed)

    excluded = evaluate_corpus(predictor, mixed, corpus.cache, seen="exclude")
    assert excluded["documents/seen_in_training"] == 1 and excluded["documents/evaluated"] == len(corpus.held_out)
    for key, value in clean.items():
        if key != "documents/seen_in_training":
            assert excluded[key] == pytest.approx(value, nan_ok=True), key

    with pytest.raises(SeenDocumentsError, match="1 of 13 documents.*'renamed-development-document'"):
        evaluate_corpus(predictor, mixed, corpus.cache, seen="refuse")
    with pytest.raises(SeenDocumentsError, match="renamed-development-document"):
        held_out_scorer(mixed, corpus.cache)(folder)
    assert held_out_scorer(corpus.held_out, corpus.cache)(folder) == pytest.approx(
        mean_auc(clean, LabelMaps.from_manifest(corpus.development).tasks))

    # Every development document was in a fold's training or validation split.
    everything = Manifest(corpus.held_out.path, corpus.development.documents)
    with pytest.raises(SeenDocumentsError, match="none is left to score"):
        evaluate_corpus(predictor, everything, corpus.cache, seen="exclude")


def test_checkpoints_that_do_not_record_their_documents_are_scored_without_a_seen_count(corpus, tmp_path):
    folder = fold_models(tmp_path / "model", LabelMaps.from_manifest(corpus.development), corpus.feature_set)
    metrics = evaluate_corpus(load_predictor(folder), corpus.held_out, corpus.cache, seen="refuse")
    assert "documents/seen_in_training" not in metrics and metrics["documents/evaluated"] == len(corpus.held_out)
