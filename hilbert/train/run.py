"""Cross-validated training on Ray Train: prepare the data once, one TorchTrainer per variant.

The driver validates the corpus, makes sure its features are cached, fixes the folds (outer test
folds, a validation split in each: :mod:`hilbert.train.folds`) in a split file, then hands each
variant (HILBERT and its ablations) to a ``TorchTrainer`` whose workers run
:func:`hilbert.train.loop.train_folds` with DDP. The baseline runs on the driver over the same
folds. Every method's test predictions are saved (``test_predictions/<method>.parquet``) and
summarised the one way :mod:`hilbert.evaluation.summary` defines: per task the pooled
out-of-fold AUC with its bootstrap 95 % interval, the fold mean and standard deviation, and
for every method a paired comparison with HILBERT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from hilbert import storage
from hilbert.config import to_dict
from hilbert.data.manifest import Manifest, load_manifest
from hilbert.evaluation.summary import FoldTable, OutOfFoldPredictions, compare_methods
from hilbert.features.batches import LabelMaps, timing_of
from hilbert.features.cache import FeatureCache, FeatureSet, atomic_write_json
from hilbert.features.extract import extract_features
from hilbert.ray_runtime import connect
from hilbert.train.baseline import logistic_regression_folds, mean_pooled_features
from hilbert.train.config import TrainConfig
from hilbert.train.folds import Split, group_of, load_or_make_split
from hilbert.train.loop import STATE_FILE, ray_train_entry
from hilbert.train.out_of_fold import out_of_fold_outputs, predictions_table
from hilbert.train.plan import Plan

BASELINE = "baseline_logreg"
REFERENCE = "hilbert"  # what every other method is compared with, when it ran
HEADLINE_METRICS = ("auc", "balanced_accuracy", "macro_f1")


class TrainingError(RuntimeError):
    """A run that cannot start (bad corpus for the config) or that failed on the workers."""


@dataclass
class PreparedData:
    """What the driver computes once and every variant shares."""

    manifest: Manifest
    feature_set: FeatureSet
    label_maps: LabelMaps
    labels: dict[str, dict[str, int]]
    split: Split


@dataclass
class CrossValidationResult:
    """Every method's test figures: per fold (``test/<task>/<metric>``, the chosen ``epoch`` and
    its ``val/score``), its test predictions, and the summary of :func:`summarise`."""

    tasks: list[str]
    folds: int  # outer folds per repeat
    repeats: int = 1
    methods: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    predictions: dict[str, OutOfFoldPredictions] = field(default_factory=dict)
    comparison: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # method -> task -> figures
    checkpoints: dict[str, str] = field(default_factory=dict)  # variant -> folder with fold_<i> models
    seconds: dict[str, float] = field(default_factory=dict)
    # variant -> modality -> [fold models][layers]: learned weights over layer=all features
    layer_weights: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def fold_table(self, method: str) -> FoldTable:
        return FoldTable.from_folds(self.methods[method])

    def summarise(self, seed: int = 0) -> None:
        """Pooled AUC with its interval, fold mean/std, paired comparison with :data:`REFERENCE`."""
        tables = {method: self.fold_table(method) for method in self.methods}
        self.comparison = compare_methods(self.predictions, tables, self.tasks,
                                          REFERENCE if REFERENCE in self.predictions else None, seed=seed,
                                          fold_metric="test/{task}/auc")

    def pooled_auc(self, method: str, task: str) -> float:
        value = self.comparison.get(method, {}).get(task, {}).get("pooled_auc")
        return math.nan if value is None else float(value)

    def mean_auc(self, method: str) -> float:
        """Mean over tasks of the pooled out-of-fold test AUC."""
        values = [self.pooled_auc(method, task) for task in self.tasks]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    def to_json(self) -> dict[str, Any]:
        written = {"tasks": self.tasks, "folds": self.folds, "repeats": self.repeats, "reference": REFERENCE,
                   "summary": self.comparison,
                   "fold_tables": {method: self.fold_table(method).to_json() for method in self.methods},
                   "checkpoints": self.checkpoints, "seconds": self.seconds}
        return {**written, "layer_weights": self.layer_weights} if self.layer_weights else written


def prepare_data(config: TrainConfig, *, manifest: Manifest | None = None, feature_set: FeatureSet | None = None,
                 address: str | None = None, log: Callable[[str], None] = print) -> PreparedData:
    """Validate, extract (normally a cache hit), encode labels and fix the folds.

    A caller that has already validated the corpus or extracted its features passes them in.
    """
    manifest = manifest if manifest is not None else load_manifest(config.data.manifest)
    if feature_set is None:
        extraction = extract_features(manifest, config.data.audio_encoder, config.data.text_encoder,
                                      config.data.cache_dir, address=address, progress=False)
        if not extraction.cache_hit:
            log(extraction.throughput_line())
        assert extraction.feature_set is not None
        feature_set = extraction.feature_set
    label_maps = LabelMaps.from_manifest(manifest, config.data.tasks)
    for task, classes in label_maps.classes.items():
        if task not in manifest.tasks:
            raise TrainingError(f"data.tasks: {task!r} is not a task of {manifest.path} (tasks: {manifest.tasks})")
        if len(classes) < 2:
            raise TrainingError(f"task {task!r} has {len(classes)} class(es) in {manifest.path}: it needs at least 2")
    if not label_maps.tasks:
        raise TrainingError(f"{manifest.path} has no labels: supervised training needs at least one task")
    optimization = config.optimization
    for field_name, named in (("objective_tasks", optimization.objective_tasks or []),
                              ("objective_weights", list(optimization.objective_weights or {}))):
        unknown = sorted(set(named) - set(label_maps.tasks))
        if unknown:
            raise TrainingError(f"optimization.{field_name}: {', '.join(map(repr, unknown))} not among the tasks "
                                f"trained ({', '.join(label_maps.tasks)})")
    labels = {doc.doc_id: label_maps.encode(doc) for doc in manifest}
    split = _load_or_make_split(config, manifest, feature_set.manifest_sha256)
    smallest_train = min(len(fold.train) for fold in split.folds)
    if smallest_train < 4:
        raise TrainingError(f"a training fold holds {smallest_train} documents; at least 4 are needed (lower cv.folds "
                            "or cv.validation_fraction)")
    return PreparedData(manifest, feature_set, label_maps, labels, split)


def _load_or_make_split(config: TrainConfig, manifest: Manifest, manifest_sha256: str) -> Split:
    """The split of ``cv.split_file``, else of ``<cache_dir>/splits/`` (with a URI cache, the
    store's copy is read, and a new split is written back there for every other node and run)."""
    cv = config.cv
    settings = {"stratify": cv.stratify, "seed": cv.seed, "validation_fraction": cv.validation_fraction,
                "repeats": cv.repeats}
    if cv.split_file:
        return load_or_make_split(Path(cv.split_file), manifest, cv.folds, **settings)
    stratify = cv.stratify or (config.data.tasks or manifest.tasks or ["none"])[0]
    relative = (f"splits/{manifest_sha256[:12]}-k{cv.folds}-{stratify}-s{cv.seed}"
                f"-v{round(cv.validation_fraction * 100)}-r{cv.repeats}.json")
    cache = FeatureCache(config.data.cache_dir)
    split = load_or_make_split(cache.local_copy(relative), manifest, config.cv.folds, **settings)
    cache.publish(relative)  # nothing to do for a local cache; one small upload for a URI
    return split


def make_plan(config: TrainConfig, data: PreparedData, variant: str) -> dict[str, Any]:
    """The JSON a worker receives: config with the variant applied, features, labels, folds."""
    return Plan(config.variant(variant), variant, storage.absolute(config.data.cache_dir), data.feature_set,
                data.label_maps, data.labels, [dataclasses.asdict(fold) for fold in data.split.folds]).to_json()


def build_trainer(plan: dict[str, Any], config: TrainConfig, run_name: str, storage_path: Path | str,
                  callbacks: list | None = None):
    """A Ray Train ``TorchTrainer`` for one variant (DDP over ``scaling.num_workers`` workers).

    A run of the same ``run_name`` under ``storage_path`` that has checkpoints is resumed from
    the latest (Ray Train V2 restores its state from storage).
    """
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        ray_train_entry,
        train_loop_config=plan,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage.absolute(storage_path), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )


def run_cross_validation(config: TrainConfig, *, manifest: Manifest | None = None,
                         feature_set: FeatureSet | None = None, address: str | None = None,
                         run_dir: Path | None = None, log: Callable[[str], None] = print) -> CrossValidationResult:
    """Train every variant of ``config`` under k-fold CV on Ray Train, plus the baseline."""
    data = prepare_data(config, manifest=manifest, feature_set=feature_set, address=address, log=log)
    run_dir = Path(run_dir or Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n", encoding="utf-8")
    log(f"run folder: {run_dir}")
    result = CrossValidationResult(tasks=data.label_maps.tasks, folds=data.split.k, repeats=data.split.repeats)
    groups = document_groups(data.manifest)
    connect(address)
    for variant in config.variants:
        started = time.perf_counter()
        log(f"training {variant!r}: {len(data.split.folds)} folds, {config.scaling.num_workers} worker(s)")
        plan = make_plan(config, data, variant)
        trainer = build_trainer(plan, config, f"{run_dir.name}-{variant}", run_dir / "ray")
        try:
            fit = trainer.fit()
        except Exception as error:  # Ray wraps worker errors; keep the message that names the cause
            raise TrainingError(f"variant {variant!r} failed: {error}") from error
        result.methods[variant], result.checkpoints[variant] = collect_fold_models(fit, run_dir / variant)
        outputs = out_of_fold_outputs(result.checkpoints[variant], plan, attention_documents=0)
        result.predictions[variant] = outputs.test_predictions(groups)
        if outputs.layer_weights:
            result.layer_weights[variant] = {modality: weights.tolist()
                                             for modality, weights in outputs.layer_weights.items()}
        result.seconds[variant] = time.perf_counter() - started
    if config.baseline:
        started = time.perf_counter()
        result.methods[BASELINE], result.predictions[BASELINE] = run_baseline(config, data)
        result.seconds[BASELINE] = time.perf_counter() - started
    result.summarise(seed=config.cv.seed)
    for method, predictions in result.predictions.items():
        storage.write_parquet(predictions_table(predictions, data.label_maps.classes),
                          run_dir / "test_predictions" / f"{method}.parquet")
    atomic_write_json(run_dir / "results.json", result.to_json())
    log(f"results: {run_dir / 'results.json'}; test predictions: {run_dir}/test_predictions/; "
        f"fold models: {run_dir}/<variant>/fold_*")
    return result


def document_groups(manifest: Manifest) -> dict[str, str]:
    """doc_id -> what the split keeps together (its group, else the document itself)."""
    return {doc.doc_id: group_of(doc) for doc in manifest}


def collect_fold_models(fit, destination: Path) -> tuple[dict[int, dict[str, float]], str]:
    """Fold metrics from a Train run's final checkpoint, its best fold models copied to ``destination``."""
    if fit.checkpoint is None:
        raise TrainingError("the run reported no checkpoint")
    with fit.checkpoint.as_directory() as folder:
        return fold_models_from_checkpoint(Path(folder), destination)


def fold_models_from_checkpoint(folder: Path, destination: Path) -> tuple[dict[int, dict[str, float]], str]:
    """Fold metrics of a training checkpoint folder, and its best fold models copied to ``destination``."""
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for entry in state["folds"]:
        best = folder / f"fold_{entry['fold']}_best"
        if best.is_dir():
            shutil.copytree(best, destination / f"fold_{entry['fold']}")
    folds = {}
    for entry in state["folds"]:
        score = entry["best_score"]
        folds[int(entry["fold"])] = {"epoch": float(entry["best_epoch"]),
                                     "val/score": float(score) if score is not None and score > -math.inf else math.nan,
                                     **{f"test/{k}": float(v) for k, v in entry.get("test_metrics", {}).items()}}
    return folds, str(destination)


def run_baseline(config: TrainConfig, data: PreparedData) -> tuple[dict[int, dict[str, float]], OutOfFoldPredictions]:
    """The baseline on the same folds: per-fold test figures and its test predictions (rows
    ordered as the model's: by repeat, then corpus order)."""
    doc_ids = [doc.doc_id for doc in data.manifest]
    groups = document_groups(data.manifest)
    features = mean_pooled_features(FeatureCache(config.data.cache_dir), data.feature_set, doc_ids,
                                    timing=timing_of(data.feature_set, config.data.timing))
    labels = {task: np.array([data.labels[d][task] for d in doc_ids]) for task in data.label_maps.tasks}
    per_fold, probabilities = logistic_regression_folds(features, labels, doc_ids, [groups[d] for d in doc_ids],
                                                        data.split.folds, data.label_maps)
    position = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    rows = sorted(((fold.repeat, position[doc_id], fold.index, i) for fold in data.split.folds
                   for i, doc_id in enumerate(fold.test)))
    ordered = [doc_ids[p] for _, p, _, _ in rows]
    predictions = OutOfFoldPredictions(
        ordered, [groups[d] for d in ordered], np.array([f for _, _, f, _ in rows], dtype=int),
        np.array([r for r, _, _, _ in rows], dtype=int),
        {task: labels[task][[p for _, p, _, _ in rows]] for task in data.label_maps.tasks},
        {task: np.stack([probabilities[f][task][i] for _, _, f, i in rows]) for task in data.label_maps.tasks})
    return per_fold, predictions
