"""The training configuration: one YAML file drives a single run, a sweep trial and a cluster job.

Sections mirror the flow: ``data`` (corpus, encoders, cache), ``model`` (HILBERT's architecture;
the input widths and tasks come from the feature set, not from YAML), ``loss`` (every weight the
sweep searches), ``optimization``, ``cv`` (folds), ``scaling`` (Ray Train workers) and
``variants`` (the ablations to run beside HILBERT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hilbert.config import ConfigError, from_dict, load_yaml, to_dict
from hilbert.losses import LossConfig
from hilbert.model.hilbert import HilbertModelConfig

# Fields of HilbertModelConfig that the data decides; YAML may not set them.
DERIVED_MODEL_FIELDS = ("audio_dim", "text_dim", "tasks", "audio_layers", "audio_layer_dim", "text_layers",
                        "text_layer_dim")


@dataclass(frozen=True)
class Variant:
    """An ablation: a small edit of the HILBERT config's ``model``, ``loss`` and ``data`` sections."""

    model: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "hilbert": Variant(),
    "pairwise": Variant(loss={"alignment": "pairwise"}),
    "no_cka": Variant(loss={"use_cka": False}),
    "no_balance": Variant(loss={"use_balance": False}),
    "no_contrastive": Variant(loss={"lambda_contrastive": 0.0}),
    "shared_streams": Variant(model={"streams": "shared"}),
    "linear_head": Variant(model={"head": "linear"}),
    "audio_only": Variant(model={"modality": "audio"}),
    "text_only": Variant(model={"modality": "text"}),
    "no_timing": Variant(data={"timing": False}),
}

# A stored training config (a sweep's sweep.json) whose data section lacks one of these fields
# was written before the field existed, and its runs were trained with this value, not today's
# default: a sweep started before segment timing existed resumes without it.
OLDER_DATA_VALUES = {"timing": False}


@dataclass
class DataConfig:
    manifest: str = ""
    cache_dir: str = "cache"  # a folder, or a URI every node reads (s3://bucket/cache, gs://...: see FeatureCache)
    audio_encoder: str = "logmel"
    text_encoder: str = "hashngram"
    tasks: list[str] | None = None  # default: every task of the corpus
    max_segments: int | None = 512  # longer documents keep evenly spaced segments
    # Segment timing (hilbert.features.timing) as extra input columns: duration, pause and
    # position join each segment's audio features, words and characters its text features.
    timing: bool = True

    def __post_init__(self):
        if self.max_segments is not None and self.max_segments < 1:
            raise ConfigError(f"data.max_segments must be >= 1, got {self.max_segments}")


@dataclass
class CrossValidationConfig:
    """Outer ``folds`` are test folds (nothing is selected on them); inside each outer training
    fold, ``validation_fraction`` of the documents form the validation split that early stopping
    (and the baseline's regularisation) is chosen on. ``repeats`` > 1 repeats the whole k-fold
    split with seeds ``seed``, ``seed + 1``, ... (for small corpora)."""

    folds: int = 5
    stratify: str | None = None  # task to stratify folds on (default: the first task)
    seed: int = 0
    validation_fraction: float = 0.2  # of each outer training fold; 0 only with early_stopping off
    repeats: int = 1
    split_file: str | None = None  # default: <cache_dir>/splits/<manifest>-k<folds>-<stratify>-s<seed>-v<%>-r<repeats>.json

    def __post_init__(self):
        if self.folds < 2:
            raise ConfigError(f"cv.folds must be >= 2, got {self.folds}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"cv.validation_fraction must be in [0, 0.5), got {self.validation_fraction!r}")
        if self.repeats < 1:
            raise ConfigError(f"cv.repeats must be >= 1, got {self.repeats}")


@dataclass
class OptimizationConfig:
    epochs: int = 40
    batch_size: int = 32  # global batch: divided evenly among the workers
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    patience: int = 8  # epochs without a better validation AUC before a fold stops
    # True: each fold's epoch is chosen on its validation split (cv.validation_fraction), and its
    # test fold is scored at that epoch. False: fixed epochs, the last epoch is scored.
    early_stopping: bool = True
    warmup_epochs: int = 1
    mixed_precision: bool = True  # bf16 autocast, on GPU only
    # The layer=all weighting logits' own rate (None: learning_rate). The logits start at the plain
    # average and Adam moves each by about one rate per step, so a short run at the model's rate
    # leaves the weights near uniform.
    layer_weight_learning_rate: float | None = None
    class_weighting: Literal["balanced", "none"] = "balanced"
    objective_tasks: list[str] | None = None  # tasks whose mean AUC picks the best epoch (default: all)
    objective_weights: dict[str, float] | None = None  # task -> weight of its AUC in that mean (default: equal)
    seed: int = 0

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 2, "learning_rate": self.learning_rate > 0,
                  "layer_weight_learning_rate": self.layer_weight_learning_rate is None
                  or self.layer_weight_learning_rate > 0,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0, "patience": self.patience >= 1,
                  "warmup_epochs": self.warmup_epochs >= 0,
                  "objective_weights": all(w >= 0 for w in (self.objective_weights or {}).values())
                  and (not self.objective_weights or sum(self.objective_weights.values()) > 0)}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"optimization.{name} is out of range: {getattr(self, name)!r}")


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts (from the last checkpoint) before the run fails

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("scaling.cpus_per_worker and scaling.gpus_per_worker must be >= 0")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # HilbertModelConfig fields but the derived ones
    loss: LossConfig = field(default_factory=LossConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    cv: CrossValidationConfig = field(default_factory=CrossValidationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    variants: list[str] = field(default_factory=lambda: ["hilbert"])
    baseline: bool = True  # also report logistic regression on mean-pooled features
    output_dir: str = "runs"
    name: str = "hilbert"

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        self.model_config(audio_dim=1, text_dim=1, tasks={"check": 2})  # validate the model section now
        if self.optimization.early_stopping and self.cv.validation_fraction <= 0:
            raise ConfigError("optimization.early_stopping needs a validation split: set cv.validation_fraction > 0 "
                              "(e.g. 0.2), or early_stopping: false to train fixed epochs")

    def model_config(self, audio_dim: int, text_dim: int, tasks: dict[str, int],
                     layers: dict[str, int] | None = None) -> HilbertModelConfig:
        """``layers``: the ``{modality}_layers`` / ``_layer_dim`` of layer=all encoders (batches.layered_inputs)."""
        for derived in DERIVED_MODEL_FIELDS:
            if derived in self.model:
                raise ConfigError(f"model.{derived}: set from the feature set and corpus, not in the config")
        return from_dict(HilbertModelConfig, {**self.model, "audio_dim": audio_dim, "text_dim": text_dim,
                                              "tasks": tasks, **(layers or {})}, "model")

    def variant(self, name: str) -> "TrainConfig":
        """This config with the ablation ``name`` applied."""
        variant = VARIANTS[name]
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **variant.data),
                                   model={**self.model, **variant.model},
                                   loss=dataclasses.replace(self.loss, **variant.loss), variants=[name])


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML, then apply ``overrides`` (nested like the YAML). Relative paths in it
    (``data.manifest``, ``data.cache_dir``, ``output_dir``) stay relative to the working directory
    the command runs from, as tune/train-demo.yaml says; they are not taken from the YAML's folder."""
    config = load_yaml(TrainConfig, path)
    if overrides:
        config = from_dict(TrainConfig, merge_nested(to_dict(config), overrides))
    return config


def stored_train_config(data: dict[str, Any], where: str = "") -> TrainConfig:
    """A training config stored by an earlier run (a sweep's ``base_config``, a plan): fields it
    lacks take the value it ran with (:data:`OLDER_DATA_VALUES`), not today's default."""
    sections = dict(data)
    sections["data"] = {**OLDER_DATA_VALUES, **(sections.get("data") or {})}
    return from_dict(TrainConfig, sections, where)


def merge_nested(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge_nested(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged
