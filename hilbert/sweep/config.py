"""Sweep definitions (``tune/*.yaml``): a base training config, a search space, an objective,
trials, resources, scheduler and searcher, all checked before anything starts.

A search-space key is the dotted path of a training-config field (``loss.lambda_cka``,
``optimization.learning_rate``, ``model.d_model``) or ``data.encoders`` (a choice of
``[audio encoder, text encoder]`` pairs). Validation applies the extremes of every range and
every choice to the base config, so a path that does not exist, a range the config would refuse
(``model.dropout`` up to 1.5) or a categorical value of the wrong type fails at load time with the
file and the key named.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from hilbert.config import ConfigError, from_dict, load_yaml, to_dict
from hilbert.train.config import TrainConfig, load_train_config, merge_nested

ENCODER_PAIR = "data.encoders"


@dataclass
class Parameter:
    """One searched hyperparameter: ``uniform``/``loguniform`` floats, ``int`` ranges, or ``choice``."""

    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    step: float | None = None  # int (and uniform) grids; None: continuous
    log: bool = False  # for int ranges
    values: list[Any] | None = None

    def __post_init__(self):
        if self.type == "choice":
            if not self.values:
                raise ConfigError("a choice needs a non-empty `values` list")
            if self.low is not None or self.high is not None:
                raise ConfigError("a choice takes `values`, not `low`/`high`")
            return
        if self.values is not None:
            raise ConfigError(f"a {self.type} range takes `low` and `high`, not `values`")
        if self.low is None or self.high is None:
            raise ConfigError(f"a {self.type} range needs `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ConfigError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ConfigError(f"a log-scaled range needs `low` > 0, got {self.low}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ConfigError(f"an int range needs integer bounds, got {self.low}..{self.high}")

    def extremes(self) -> list[Any]:
        """Values that exercise the whole range: both bounds, or every choice."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]

    def optuna_distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "choice":
            # Optuna's categoricals hold scalars; lists (encoder pairs) are stored as their index.
            return optuna.distributions.CategoricalDistribution(list(range(len(self.values or []))))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,  # type: ignore[arg-type]
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high),  # type: ignore[arg-type]
                                                      log=self.type == "loguniform", step=self.step)

    def value(self, sampled: Any) -> Any:
        """The config value for what the searcher sampled (a choice is sampled as its index)."""
        return (self.values or [])[int(sampled)] if self.type == "choice" else sampled


@dataclass
class SweepObjective:
    """What the sweep maximises: the mean over folds of per-task macro AUC, weighted over tasks."""

    tasks: list[str] | None = None  # default: every task of the corpus (or the tasks of `weights`)
    weights: dict[str, float] | None = None  # task -> weight (default: equal)
    mode: Literal["max"] = "max"

    def __post_init__(self):
        if self.weights is not None:
            if any(not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()) or not sum(self.weights.values()):
                raise ConfigError("objective.weights: non-negative numbers, not all zero")
            if self.tasks and set(self.weights) - set(self.tasks):
                raise ConfigError(f"objective.weights names tasks outside objective.tasks: "
                                  f"{sorted(set(self.weights) - set(self.tasks))}")


@dataclass
class Resources:
    workers_per_trial: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.workers_per_trial < 1 or self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("resources: workers_per_trial >= 1, cpus_per_worker and gpus_per_worker >= 0")


@dataclass
class Scheduler:
    type: Literal["asha", "median", "none"] = "asha"
    grace_period: int = 5  # epochs every trial gets before it can be stopped
    reduction_factor: float = 2.0

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("scheduler: grace_period >= 1 and reduction_factor > 1")


@dataclass
class Searcher:
    type: Literal["optuna_tpe", "random"] = "optuna_tpe"
    seed: int = 0
    startup_trials: int = 3  # random trials before TPE models the space


@dataclass
class Tracking:
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db beside the runs
    experiment: str = "hilbert"
    model_name: str = "hilbert"
    system_metrics_seconds: float = 10.0  # each trial logs CPU, memory and GPU use this often; 0: never

    def __post_init__(self):
        if self.system_metrics_seconds < 0:
            raise ConfigError(f"tracking.system_metrics_seconds must be >= 0, got {self.system_metrics_seconds}")


@dataclass
class SweepConfig:
    base: str  # training YAML, relative to the sweep file
    search: dict[str, Parameter]
    name: str = "sweep"
    overrides: dict[str, Any] = field(default_factory=dict)  # edits of the base config for every trial
    objective: SweepObjective = field(default_factory=SweepObjective)
    trials: int = 8
    concurrency: int = 1
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler = field(default_factory=Scheduler)
    searcher: Searcher = field(default_factory=Searcher)
    tracking: Tracking = field(default_factory=Tracking)
    max_failures: int = 1  # retries of a failed trial
    base_config: TrainConfig | None = field(default=None, repr=False, init=False)  # set by load_sweep

    def __post_init__(self):
        if self.trials < 1 or self.concurrency < 1:
            raise ConfigError("trials and concurrency must be >= 1")
        if not self.search:
            raise ConfigError("search: name at least one hyperparameter")

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        """The base config with one trial's sampled values (config values, not indices)."""
        assert self.base_config is not None
        data = to_dict(self.base_config)
        for key, value in params.items():
            if key == ENCODER_PAIR:
                data["data"]["audio_encoder"], data["data"]["text_encoder"] = value
                continue
            section, *rest = key.split(".")
            target = data[section]
            for part in rest[:-1]:
                target = target.setdefault(part, {})
            target[rest[-1]] = value
        config = from_dict(TrainConfig, data)
        resources = self.resources
        scaling = dataclasses.replace(config.scaling, num_workers=resources.workers_per_trial,
                                      cpus_per_worker=resources.cpus_per_worker, use_gpu=resources.gpus_per_worker > 0,
                                      gpus_per_worker=resources.gpus_per_worker or config.scaling.gpus_per_worker)
        optimization = config.optimization
        if self.objective.tasks or self.objective.weights:
            optimization = dataclasses.replace(optimization, objective_tasks=self.objective.tasks,
                                               objective_weights=self.objective.weights)
        return dataclasses.replace(config, variants=["hilbert"], baseline=False, scaling=scaling,
                                   optimization=optimization)

    def trial_values(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Config values for what the searcher sampled (choices are sampled as indices)."""
        return {key: self.search[key].value(value) for key, value in sampled.items()}

    def encoder_pairs(self) -> list[tuple[str, str]]:
        """Every [audio, text] encoder pair a trial may use (the base pair when not searched)."""
        assert self.base_config is not None
        if ENCODER_PAIR in self.search:
            return [tuple(pair) for pair in self.search[ENCODER_PAIR].values or []]  # type: ignore[misc]
        return [(self.base_config.data.audio_encoder, self.base_config.data.text_encoder)]


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and fully validate a sweep YAML (base config, every key and range of the space).

    ``overrides`` (nested like the base config) are merged over the YAML's own ``overrides``:
    how ``hilbert demo`` points the demo sweep at its working folder.
    """
    path = Path(path)
    sweep = load_yaml(SweepConfig, path)
    if overrides:
        sweep.overrides = merge_nested(sweep.overrides or {}, overrides)
    base_path = (path.parent / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
    try:
        sweep.base_config = load_train_config(base_path, sweep.overrides or None)
    except ConfigError as error:
        raise ConfigError(f"{path}: base {sweep.base}: {error}") from error
    for key, parameter in sweep.search.items():
        _check_key(path, sweep, key, parameter)
    return sweep


def _check_key(path: Path, sweep: SweepConfig, key: str, parameter: Parameter) -> None:
    if key == ENCODER_PAIR:
        if parameter.type != "choice" or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                                                 for v in parameter.values or []):
            raise ConfigError(f"{path}: search.{key}: a choice of [audio encoder, text encoder] pairs")
    elif key.split(".")[0] not in ("model", "loss", "optimization", "data"):
        raise ConfigError(f"{path}: search.{key}: searchable sections are model, loss, optimization, data")
    for value in parameter.extremes():
        try:
            sweep.trial_config({key: value})
        except (ConfigError, ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"{path}: search.{key} = {value!r} is not a valid value: {error}") from error
