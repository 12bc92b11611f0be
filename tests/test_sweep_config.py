"""Sweep YAMLs: the shipped ones load; every bad key, range or value is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from hilbert.config import ConfigError
from hilbert.config import dotted_keys
from hilbert.sweep.config import load_sweep

TUNE = Path(__file__).parents[1] / "tune"


def write_sweep(tmp_path: Path, **changes) -> Path:
    sweep = yaml.safe_load((TUNE / "demo.yaml").read_text())
    sweep["base"] = str(TUNE / "train-demo.yaml")
    for key, value in changes.items():
        if value is None:
            sweep.pop(key, None)
        else:
            sweep[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_sweeps_load_and_map_every_parameter_to_optuna(name):
    sweep = load_sweep(TUNE / name)
    for key, parameter in sweep.search.items():
        distribution = parameter.optuna_distribution()
        assert isinstance(distribution, optuna.distributions.BaseDistribution), key
    assert sweep.base_config is not None and sweep.base_config.variants == ["hilbert"]


def test_trial_config_applies_sampled_values_and_encoder_pairs():
    sweep = load_sweep(TUNE / "paper.yaml")
    pair = sweep.search["data.encoders"].value(1)
    config = sweep.trial_config({"loss.lambda_cka": 0.25, "model.d_model": 128, "data.encoders": pair,
                                 "optimization.learning_rate": 3e-4})
    assert config.loss.lambda_cka == 0.25 and config.model["d_model"] == 128
    assert (config.data.audio_encoder, config.data.text_encoder) == tuple(pair)
    assert config.optimization.learning_rate == 3e-4 and config.optimization.epochs == 60  # override kept
    assert config.baseline is False


@pytest.mark.parametrize("search, words", [
    ({"loss.lamda_cka": {"type": "uniform", "low": 0.1, "high": 0.2}}, "search.loss.lamda_cka"),
    ({"model.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}}, "search.model.dropout = 1.5"),
    ({"loss.temperature": {"type": "loguniform", "low": 0.0, "high": 0.5}}, "low` > 0"),
    ({"loss.lambda_cka": {"type": "uniform", "low": 0.5, "high": 0.1}}, "must be below"),
    ({"model.d_model": {"type": "choice", "values": [64, "wide"]}}, "'wide'"),
    ({"model.n_heads": {"type": "int", "low": 1.5, "high": 4}}, "integer bounds"),
    ({"data.encoders": {"type": "choice", "values": [["logmel"]]}}, "pairs"),
    ({"scaling.num_workers": {"type": "int", "low": 1, "high": 4}}, "searchable sections"),
    ({"loss.lambda_cka": {"type": "gaussian", "low": 0.1, "high": 0.2}}, "not one of"),
])
def test_bad_search_space_names_the_key(tmp_path: Path, search, words):
    with pytest.raises(ConfigError) as raised:
        load_sweep(write_sweep(tmp_path, search=search))
    assert words in str(raised.value) and "sweep.yaml" in str(raised.value)


def test_unknown_top_level_field_suggests_the_right_one(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"trails: unknown field \(did you mean 'trials'\?\)"):
        load_sweep(write_sweep(tmp_path, trails=3))


def test_missing_base_config_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_sweep(write_sweep(tmp_path, base="nowhere.yaml"))


def test_sampled_values_nested_or_dotted_name_the_same_config_fields():
    """Tune hands back the sampled values with dotted keys, or nested should it split them: both
    name the same fields, and a sweep's trial config is the same either way."""
    nested = {"loss": {"lambda_cka": 0.3, "temperature": {"init": 0.07}}, "optimization": {"learning_rate": 1e-3}}
    dotted = {"loss.lambda_cka": 0.3, "loss.temperature.init": 0.07, "optimization.learning_rate": 1e-3}
    assert dotted_keys(nested) == dotted and dotted_keys(dotted) == dotted
    assert dotted_keys({"model": {}, "variants": ["hilbert"]}) == {"model": {}, "variants": ["hilbert"]}
