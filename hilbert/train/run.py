"""Cross-validated training on Ray Train: prepare the data once, one TorchTrainer per variant.

The driver validates the corpus, makes sure its features are cached, fixes the folds in a split
file, then hands each variant (HILBERT and its ablations) to a ``TorchTrainer`` whose workers run
:func:`hilbert.train.loop.train_folds` with DDP. The baseline runs on the driver over the same
folds. Results come back as a :class:`CrossValidationResult`: per task and fold, then mean and
standard deviation over folds.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hilbert import storage
from hilbert.config import to_dict
from hilbert.data.manifest import Manifest, load_manifest
from hilbert.features.batches import LabelMaps
from hilbert.features.cache import FeatureCache, FeatureSet, atomic_write_json
from hilbert.features.extract import extract_features
from hilbert.train.baseline import logistic_regression_cv, mean_pooled_features
from hilbert.train.config import TrainConfig
from hilbert.train.folds import Split, load_or_make_split
from hilbert.train.loop import STATE_FILE

BASELINE = "baseline_logreg"
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
    """fold -> metric name -> value, for every method (variants and the baseline)."""

    tasks: list[str]
    folds: int
    methods: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)  # variant -> folder with fold_<i> models
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, method: str, metric: str) -> tuple[float, float]:
        """Mean and standard deviation over folds (NaN folds, e.g. one class only, left out)."""
        values = [fold[metric] for fold in self.methods[method].values() if metric in fold]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return math.nan, math.nan
        return float(np.mean(values)), float(np.std(values))

    def mean_auc(self, method: str) -> float:
        means = [self.summary(method, f"{task}/auc")[0] for task in self.tasks]
        means = [m for m in means if not math.isnan(m)]
        return float(np.mean(means)) if means else math.nan

    def to_json(self) -> dict[str, Any]:
        summary = {method: {f"{task}/{metric}": dict(zip(("mean", "std"), self.summary(method, f"{task}/{metric}")))
                            for task in self.tasks for metric in HEADLINE_METRICS} for method in self.methods}
        return {"tasks": self.tasks, "folds": self.folds, "summary": summary,
                "per_fold": {m: {str(f): v for f, v in folds.items()} for m, folds in self.methods.items()},
                "checkpoints": self.checkpoints, "seconds": self.seconds}


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
    smallest_train = min(len(split.train_ids(f)) for f in range(split.k))
    if smallest_train < 4:
        raise TrainingError(f"a training fold holds {smallest_train} documents; at least 4 are needed (lower cv.folds)")
    return PreparedData(manifest, feature_set, label_maps, labels, split)


def _load_or_make_split(config: TrainConfig, manifest: Manifest, manifest_sha256: str) -> Split:
    """The split of ``cv.split_file``, else of ``<cache_dir>/splits/`` (with a URI cache, the
    store's copy is read, and a new split is written back there for every other node and run)."""
    settings = {"stratify": config.cv.stratify, "seed": config.cv.seed}
    if config.cv.split_file:
        return load_or_make_split(Path(config.cv.split_file), manifest, config.cv.folds, **settings)
    stratify = config.cv.stratify or (config.data.tasks or manifest.tasks or ["none"])[0]
    relative = f"splits/{manifest_sha256[:12]}-k{config.cv.folds}-{stratify}-s{config.cv.seed}.json"
    cache = FeatureCache(config.data.cache_dir)
    split = load_or_make_split(cache.local_copy(relative), manifest, config.cv.folds, **settings)
    cache.publish(relative)  # nothing to do for a local cache; one small upload for a URI
    return split


def make_plan(config: TrainConfig, data: PreparedData, variant: str) -> dict[str, Any]:
    """The JSON a worker receives: config with the variant applied, features, labels, folds."""
    return {"config": to_dict(config.variant(variant)), "variant": variant,
            "cache_dir": storage.absolute(config.data.cache_dir), "feature_set": to_dict(data.feature_set),
            "label_maps": data.label_maps.to_json(), "labels": data.labels, "fold_of": data.split.fold_of,
            "folds": list(range(data.split.k))}


def build_trainer(plan: dict[str, Any], config: TrainConfig, run_name: str, storage_path: Path | str,
                  callbacks: list | None = None):
    """A Ray Train ``TorchTrainer`` for one variant (DDP over ``scaling.num_workers`` workers).

    A run of the same ``run_name`` under ``storage_path`` that has checkpoints is resumed from
    the latest (Ray Train V2 restores its state from storage).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from hilbert.train.loop import ray_train_entry

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
            name=run_name, storage_path=_storage(storage_path), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )


def _storage(path: Path | str) -> str:
    """Ray's storage_path: a URI (s3://, gs://, ...) as it is, a local path made absolute."""
    text = str(path)
    return text if "://" in text else str(Path(text).resolve())


def run_cross_validation(config: TrainConfig, *, manifest: Manifest | None = None,
                         feature_set: FeatureSet | None = None, address: str | None = None,
                         run_dir: Path | None = None, log: Callable[[str], None] = print) -> CrossValidationResult:
    """Train every variant of ``config`` under k-fold CV on Ray Train, plus the baseline."""
    from hilbert.ray_runtime import connect

    data = prepare_data(config, manifest=manifest, feature_set=feature_set, address=address, log=log)
    run_dir = Path(run_dir or Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1) + "\n", encoding="utf-8")
    log(f"run folder: {run_dir}")
    result = CrossValidationResult(tasks=data.label_maps.tasks, folds=data.split.k)
    connect(address)
    for variant in config.variants:
        started = time.perf_counter()
        log(f"training {variant!r}: {data.split.k} folds, {config.scaling.num_workers} worker(s)")
        trainer = build_trainer(make_plan(config, data, variant), config, f"{run_dir.name}-{variant}", run_dir / "ray")
        try:
            fit = trainer.fit()
        except Exception as error:  # Ray wraps worker errors; keep the message that names the cause
            raise TrainingError(f"variant {variant!r} failed: {error}") from error
        result.methods[variant], result.checkpoints[variant] = collect_fold_models(fit, run_dir / variant)
        result.seconds[variant] = time.perf_counter() - started
    if config.baseline:
        started = time.perf_counter()
        result.methods[BASELINE] = run_baseline(config, data)
        result.seconds[BASELINE] = time.perf_counter() - started
    atomic_write_json(run_dir / "results.json", result.to_json())
    log(f"results: {run_dir / 'results.json'}; fold models: {run_dir}/<variant>/fold_*")
    return result


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
    folds = {int(entry["fold"]): {k: float(v) for k, v in entry["best_metrics"].items()} for entry in state["folds"]}
    return folds, str(destination)


def run_baseline(config: TrainConfig, data: PreparedData) -> dict[int, dict[str, float]]:
    doc_ids = [doc.doc_id for doc in data.manifest]
    features = mean_pooled_features(FeatureCache(config.data.cache_dir), data.feature_set, doc_ids)
    labels = {task: np.array([data.labels[d][task] for d in doc_ids]) for task in data.label_maps.tasks}
    fold_of = np.array([data.split.fold_of[d] for d in doc_ids])
    return logistic_regression_cv(features, labels, fold_of, data.label_maps)
