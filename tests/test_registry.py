"""The model registry against a real sqlite store: a registered fold checkpoint resolves by alias to
the same weights (in this process and a fresh one), holds no pickle, and the champion alias moves
only to a better challenger unless forced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hilbert.features.batches import LabelMaps
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.predict import load_predictor
from hilbert.tracking.registry import RegistryError, promote, register_checkpoint, resolve_model
from hilbert.tracking.runs import SweepTracker, TrialTracker
from hilbert.tracking.store import Experiment, mlflow_client
from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

CONFIG = HilbertModelConfig(audio_dim=6, text_dim=10, tasks={"loud": 2, "topic": 3}, d_model=8, d_embed=8, n_heads=2,
                            pooling_heads=2, n_experts=2, expert_hidden=8, n_cross_layers=1, dropout=0.0)
LABELS = LabelMaps({"loud": ("quiet", "loud"), "topic": ("a", "b", "c")})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture
def trial_run(store: str, request):
    """A finished trial run of a sweep to register models from (a new one per call)."""
    experiment = Experiment.open(store, request.node.name)
    sweep = SweepTracker.start(experiment, "sweep", search_space={}, objective={"mode": "max"})

    def new_run() -> str:
        with TrialTracker(experiment, sweep.run_id, f"t{new_run.count}") as trial:
            new_run.count += 1
            return trial.run_id

    new_run.count = 0
    return new_run


def fold_checkpoints(folder: Path, score: float, folds: int = 2) -> Path:
    """``folder/fold_<i>`` checkpoints of tiny random models whose validation score is ``score``."""
    for fold in range(folds):
        model = HilbertModel(CONFIG)
        info = CheckpointInfo(model=CONFIG, label_maps=LABELS, metrics={"score": score},
                              features={"audio_encoder": "logmel", "text_encoder": "hashngram"})
        save_checkpoint(folder / f"fold_{fold}", model, info, torch.optim.AdamW(model.parameters()), {"patience": 1})
    return folder


def _version(store: str, name: str, version: str):
    return mlflow_client(store).get_model_version(name, version)


def score_of(folder: Path) -> float:
    """What a real evaluation would do first: load the model; here the score is in its metrics."""
    return load_predictor(folder).info.metrics["score"]


def test_registered_folds_resolve_by_alias_to_identical_weights_without_pickle(tmp_path, store, trial_run):
    checkpoint = fold_checkpoints(tmp_path / "trial", score=0.7)
    run_id = trial_run()
    version = register_checkpoint(run_id, checkpoint, "stance", tracking_uri=store)
    assert version == "1"

    folder = resolve_model("models:/stance@challenger", tmp_path / "downloaded", tracking_uri=store)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert [f for f in files if "/" in f or f == "signature.json"] == [
        "fold_0/checkpoint.json", "fold_0/model.safetensors", "fold_1/checkpoint.json", "fold_1/model.safetensors",
        "signature.json"]  # no optimizer state, nothing pickled
    assert sorted(set(files) - {f for f in files if "/" in f or f == "signature.json"}) == [  # the pyfunc flavour
        "MLmodel", "conda.yaml", "input_example.json", "pyfunc_model.py", "python_env.yaml", "requirements.txt",
        "serving_input_example.json"]
    predictor = load_predictor(folder)
    assert len(predictor.models) == 2
    for fold, (model, _) in enumerate(predictor.models):
        expected = load_file(str(checkpoint / f"fold_{fold}" / "model.safetensors"))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
    signature = json.loads((folder / "signature.json").read_text())
    assert signature["inputs"]["audio"]["shape"] == ["segments", 6] and signature["inputs"]["text"]["dtype"] == "float32"
    assert signature["outputs"]["probabilities"]["topic"]["classes"] == ["a", "b", "c"]
    assert set(signature["outputs"]["embeddings"]) == {"audio", "text", "joint"} and signature["folds"] == 2

    for uri in ("models:/stance/1", "models:/stance/latest", f"runs:/{run_id}/model"):
        assert len(load_predictor(resolve_model(uri, tmp_path / uri.replace(":", "").replace("/", "_"),
                                                tracking_uri=store)).models) == 2, uri
    assert resolve_model(checkpoint / "fold_0") == checkpoint / "fold_0"  # a local folder is used as it is


def test_resolved_alias_loads_in_a_new_process_with_the_same_weights(tmp_path, store, trial_run):
    checkpoint = fold_checkpoints(tmp_path / "trial", score=0.5, folds=1)
    register_checkpoint(trial_run(), checkpoint / "fold_0", "fresh", tracking_uri=store)
    script = textwrap.dedent("""
        import json, sys
        from hilbert.predict import load_predictor
        from hilbert.tracking.registry import resolve_model
        folder = resolve_model("models:/fresh@challenger", "downloaded")
        model, _ = load_predictor(folder).models[0]
        json.dump({name: tensor.double().sum().item() for name, tensor in model.state_dict().items()}, sys.stdout)
    """)
    environment = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    sums = json.loads(done.stdout)
    expected = load_file(str(checkpoint / "fold_0" / "model.safetensors"))
    assert sums == {name: tensor.double().sum().item() for name, tensor in expected.items()}
    assert not (tmp_path / "mlflow.db").exists()  # the store came from the environment, nothing implicit


def test_champion_moves_only_to_a_better_challenger_unless_forced(tmp_path, store, trial_run):
    def register(score: float) -> str:
        folder = fold_checkpoints(tmp_path / f"trial-{score}", score=score, folds=1)
        return register_checkpoint(trial_run(), folder, "ranked", tracking_uri=store)

    def champion() -> str:
        return str(mlflow_client(store).get_registered_model("ranked").aliases["champion"])  # an int in MLflow 3

    first = register(0.7)
    decision = promote("ranked", score_of, tracking_uri=store)
    assert decision.promoted and decision.champion_version is None and decision.challenger_score == pytest.approx(0.7)
    assert champion() == first

    worse = register(0.6)
    decision = promote("ranked", score_of, tracking_uri=store)
    assert not decision.promoted and (decision.challenger_score, decision.champion_score) == pytest.approx((0.6, 0.7))
    assert champion() == first
    version = _version(store, "ranked", worse)
    assert version.tags["promotion.decision"] == "not promoted"
    assert float(version.tags["promotion.challenger_score"]) == pytest.approx(0.6)
    assert float(version.tags["promotion.champion_score"]) == pytest.approx(0.7)
    assert version.tags["promotion.champion_version"] == first and "champion kept" in version.description

    decision = promote("ranked", score_of, force=True, tracking_uri=store)
    assert decision.promoted and decision.forced and champion() == worse
    assert _version(store, "ranked", worse).tags["promotion.decision"] == "promoted (forced)"
    assert _version(store, "ranked", first).tags["promotion.replaced_by"] == worse

    assert not promote("ranked", score_of, tracking_uri=store).promoted  # challenger is the champion already
    better = register(0.9)
    assert promote("ranked", score_of, tracking_uri=store).promoted and champion() == better


def test_unknown_alias_non_checkpoints_and_mixed_checkpoints_give_clear_errors(tmp_path, store, trial_run):
    run_id = trial_run()
    register_checkpoint(run_id, fold_checkpoints(tmp_path / "trial", 0.5, folds=1) / "fold_0", "named",
                        tracking_uri=store)
    with pytest.raises(RegistryError, match="already holds a different model/"):  # would mix two models
        register_checkpoint(run_id, fold_checkpoints(tmp_path / "other", 0.5, folds=2), "named", tracking_uri=store)
    with pytest.raises(RegistryError, match="no alias 'champion'.*challenger"):
        resolve_model("models:/named@champion", tmp_path / "x", tracking_uri=store)
    with pytest.raises(RegistryError, match="no registered model named 'missing'"):
        resolve_model("models:/missing/1", tmp_path / "y", tracking_uri=store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="holds no hilbert checkpoint"):
        register_checkpoint(trial_run(), tmp_path / "empty", "named", tracking_uri=store)
    with pytest.raises(RegistryError, match="holds no hilbert checkpoint"):
        resolve_model(tmp_path / "empty")
