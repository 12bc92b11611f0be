"""The main job on the synthetic demo corpus, end to end: what `hilbert demo` runs.

Write the corpus (or reuse it), split off the documents of held-out speakers, validate, extract
features into the cache, run the demo sweep (Ray Tune + Optuna over k-fold Ray Train trials,
logged to MLflow, the best trial registered as the challenger), promote the challenger if it beats
the champion on the held-out documents, predict those documents with the champion and score it
and the baseline there. Everything lives under one working folder; a second run reuses the corpus
and the features.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hilbert.configs import DEMO_SWEEP, packaged
from hilbert.data.demo import split_held_out, write_demo_corpus
from hilbert.data.manifest import Manifest, ManifestError, ValidationReport, load_manifest, validate_manifest
from hilbert.features.batches import LabelMaps, timing_of
from hilbert.features.extract import ExtractionReport, extract_features
from hilbert.held_out import held_out_baseline, held_out_metric, held_out_scorer
from hilbert.predict import evaluate_corpus, load_predictor, write_predictions
from hilbert.sweep.config import load_sweep
from hilbert.tracking.registry import CHAMPION, PromotionDecision, promote, resolve_model
from hilbert.sweep.runner import SweepResult, run_sweep
from hilbert.sweep.trial import pair_key


class NoTrialFinished(RuntimeError):
    """The sweep ended without a finished trial, so no model was registered to promote."""

    def __init__(self, sweep: SweepResult):
        self.sweep = sweep
        super().__init__("no trial finished, so there is no model to promote; see the errors above")


@dataclass
class DemoCorpus:
    manifest_path: Path
    development_path: Path  # the sweep's documents (k-fold cross-validation)
    held_out_path: Path  # documents of other speakers: promotion and the final comparison
    written: bool  # False: an existing corpus was reused


@dataclass
class DemoResult:
    """Everything the demo did, step by step, and the held-out comparison it ends with."""

    workdir: Path
    corpus: DemoCorpus
    validation: ValidationReport
    development: Manifest
    held_out: Manifest
    extraction: ExtractionReport  # of the whole corpus (development and held-out documents)
    sweep: SweepResult
    promotion: PromotionDecision
    champion: str  # models:/NAME@champion
    champion_version: str | None  # the version that is champion after the promotion: what was compared
    predictions_path: Path  # the champion's class probabilities for the held-out documents
    tasks: list[str]
    champion_metrics: dict[str, float]  # <task>/<metric> on the held-out documents
    baseline_metrics: dict[str, float]  # the same for logistic regression on mean-pooled features
    cache_dir: str
    tracking_uri: str


def _ignore(_result: object) -> None:
    pass


def run_demo(workdir: str | Path, *, sweep_file: str | Path | None = None, documents: int = 240, seed: int = 0,
             trials: int | None = None, epochs: int | None = None, address: str | None = None,
             log: Callable[[str], None] = print, section: Callable[[str], None] | None = None,
             on_validated: Callable[[ValidationReport], None] = _ignore,
             on_sweep: Callable[[SweepResult], None] = _ignore,
             on_promotion: Callable[[PromotionDecision], None] = _ignore) -> DemoResult:
    """Run the demo in ``workdir`` (corpus, feature cache, sweeps and MLflow store all inside it).

    ``sweep_file`` defaults to the packaged demo sweep; ``trials`` and ``epochs`` shorten it.
    ``documents`` and ``seed`` are the corpus's (used only when ``workdir`` has none yet).
    ``address`` is the Ray cluster (None: an embedded local Ray). Progress lines go to ``log``,
    each step's heading to ``section``; ``on_validated``, ``on_sweep`` and ``on_promotion``
    receive those steps' results as soon as they exist (the CLI prints them there).

    Raises :class:`ManifestError` (carrying the validation report) when the corpus is invalid,
    :class:`NoTrialFinished` when the sweep registered no model, and what the steps raise:
    ``ConfigError``, ``VersionMismatch``, ``SweepError``, ``SweepInterrupted``,
    ``TrainingError``, ``RegistryError``, ``ModelLocationError``.
    """
    workdir = Path(workdir)
    heading = section or (lambda title: log(f"--- {title}"))
    sweep_file = sweep_file or packaged(DEMO_SWEEP)
    overrides = _overrides(workdir, epochs)
    sweep_config = load_sweep(sweep_file, overrides)
    assert sweep_config.base_config is not None
    data = sweep_config.base_config.data

    heading("1. demo corpus")
    corpus = _write_or_reuse_corpus(workdir / "corpus", documents, seed, log)

    heading("2. validate")
    validation = validate_manifest(corpus.manifest_path)
    if not validation.ok:
        raise ManifestError(validation)
    on_validated(validation)
    development, held_out = load_manifest(corpus.development_path), load_manifest(corpus.held_out_path)
    log(f"development: {len(development)} documents (sweep, k-fold CV); held out: {len(held_out)} "
        f"documents of other speakers (promotion, final table)")

    heading("3. extract features")
    extraction = extract_features(Manifest(validation.manifest_path, validation.documents), data.audio_encoder,
                                  data.text_encoder, data.cache_dir, address=address)
    log(extraction.throughput_line())
    development_features = extract_features(development, data.audio_encoder, data.text_encoder, data.cache_dir,
                                            address=address, progress=False).feature_set

    heading(f"4. sweep: {trials or sweep_config.trials} trials, Ray Tune + Optuna, k-fold Ray Train DDP, MLflow")
    sweep = run_sweep(sweep_file, overrides=overrides, trials=trials, address=address, manifest=development,
                      feature_sets={pair_key(data.audio_encoder, data.text_encoder): development_features}, log=log)
    on_sweep(sweep)
    if not sweep.model_version:
        raise NoTrialFinished(sweep)

    heading("5. promote: challenger vs champion on the held-out documents")
    decision = promote(sweep.model_name, held_out_scorer(held_out, data.cache_dir, address),
                       tracking_uri=sweep.tracking_uri, metric=held_out_metric(corpus.held_out_path))
    on_promotion(decision)

    champion = f"models:/{sweep.model_name}@{CHAMPION}"
    heading(f"6. predict the held-out documents with {champion}")
    predictions_path = workdir / "predictions" / "held_out.parquet"
    label_maps, champion_metrics = _predict_and_score(champion, sweep.tracking_uri, held_out, data.cache_dir,
                                                      predictions_path, address)
    log(f"class probabilities per task for {len(held_out)} documents: {predictions_path}")
    assert extraction.feature_set is not None
    baseline_metrics = held_out_baseline(label_maps, development, held_out, data.cache_dir, extraction.feature_set,
                                         timing=timing_of(extraction.feature_set, data.timing))

    return DemoResult(
        workdir=workdir, corpus=corpus, validation=validation, development=development, held_out=held_out,
        extraction=extraction, sweep=sweep, promotion=decision, champion=champion,
        champion_version=decision.challenger_version if decision.promoted else decision.champion_version,
        predictions_path=predictions_path, tasks=label_maps.tasks, champion_metrics=champion_metrics,
        baseline_metrics=baseline_metrics, cache_dir=data.cache_dir, tracking_uri=sweep.tracking_uri)


def _overrides(workdir: Path, epochs: int | None) -> dict:
    """The demo sweep's edits: its data, cache and runs inside ``workdir``."""
    overrides: dict = {"data": {"manifest": str(workdir / "corpus" / "development.jsonl"),
                                "cache_dir": str(workdir / "cache")},
                       "output_dir": str(workdir / "runs")}
    if epochs is not None:
        overrides["optimization"] = {"epochs": epochs}
    return overrides


def _write_or_reuse_corpus(folder: Path, documents: int, seed: int, log: Callable[[str], None]) -> DemoCorpus:
    manifest_path = folder / "manifest.jsonl"
    written = not manifest_path.exists()
    if written:
        write_demo_corpus(folder, n_documents=documents, seed=seed)
        log(f"wrote {manifest_path}")
    else:
        log(f"reusing {manifest_path}")
    development_path, held_out_path = split_held_out(manifest_path, seed=seed)
    return DemoCorpus(manifest_path, development_path, held_out_path, written)


def _predict_and_score(model: str, tracking_uri: str, held_out: Manifest, cache_dir: str, predictions_path: Path,
                       address: str | None) -> tuple[LabelMaps, dict[str, float]]:
    """Write the model's predictions for ``held_out`` to ``predictions_path``; its label maps and
    metrics there."""
    with tempfile.TemporaryDirectory(prefix="hilbert-model-") as folder:
        predictor = load_predictor(resolve_model(model, folder, tracking_uri=tracking_uri))
        write_predictions(predictor, held_out, cache_dir, predictions_path, address=address)
        return predictor.label_maps, evaluate_corpus(predictor, held_out, cache_dir, address=address, seen="refuse")
