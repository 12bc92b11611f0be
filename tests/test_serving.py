"""A registered hilbert model is an MLflow pyfunc model from code, against a real sqlite store:
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and ``mlflow models serve`` answer what
``hilbert predict`` answers on the same documents; bad documents are refused with a 400 naming the
document and the field; a version registered before the flavour still loads with ``hilbert
predict`` and gains the flavour with ``add_pyfunc_flavour``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from conftest import document, extract_in_process, write_manifest, write_tone
from hilbert.cli import app
from hilbert.data.manifest import load_manifest
from hilbert.features.batches import LabelMaps
from hilbert.features.encoders import encoder_fingerprint
from hilbert.features.timing import AUDIO_COLUMNS, TEXT_COLUMNS, timing_fingerprint
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.predict import embeddings_table, load_predictor, predict_probabilities, predictions_table
from hilbert.serving.requests import RequestError, documents_from_rows
from hilbert.serving.served import ServedModel
from hilbert.tracking.registry import (
    MODEL_FOLDER,
    add_pyfunc_flavour,
    register_checkpoint,
    register_logged_model,
    resolve_model,
    stage_model,
)
from hilbert.tracking.runs import SweepTracker, TrialTracker
from hilbert.tracking.store import Experiment, mlflow_client
from hilbert.train.checkpoint import CheckpointInfo, save_checkpoint

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

AUDIO, TEXT = "logmel", "hashngram?dim=16"
CONFIG = HilbertModelConfig(audio_dim=140, text_dim=16, tasks={"loud": 2, "topic": 3}, d_model=8, d_embed=8,
                            n_heads=2, pooling_heads=2, n_experts=2, expert_hidden=8, n_cross_layers=1, dropout=0.0)
LABELS = LabelMaps({"loud": ("quiet", "loud"), "topic": ("a", "b", "c")})
# Both sides run the same float32 model on the same features in batches of the same documents;
# measured: identical (max |difference| 0.0). The bound leaves room for other BLAS kernels only.
TOLERANCE = 1e-6
PROBABILITIES = [f"{task}/p/{name}" for task, names in LABELS.classes.items() for name in names]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three documents of different lengths; the manifest holds labels, which serving ignores."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, seconds in enumerate((3.0, 2.0, 4.0)):
        write_tone(folder / "audio" / f"d{i}.wav", seconds=seconds, frequency=140 + 70 * i)
    segments = [[(0.0, 1.0, "so how was the week"), (1.2, 2.5, "fine thanks")], [(0.1, 1.9, "not great")],
                [(0.0, 1.5, "we won the match"), (1.5, 3.0, ""), (3.1, 3.9, "again and again")]]
    return write_manifest(folder, [document(f"d{i}", f"audio/d{i}.wav", segs) for i, segs in enumerate(segments)])


def request_rows(manifest: Path) -> list[dict]:
    """The manifest's documents as a request: doc_id, absolute audio path, segments."""
    return [{"doc_id": d.doc_id, "audio": str(d.audio_path),
             "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in d.segments]}
            for d in load_manifest(manifest)]


def fold_checkpoints(folder: Path, folds: int = 2, timing: bool = False) -> Path:
    """Tiny random fold models trained (as far as their checkpoints say) on logmel + hashngram;
    without ``timing``, as every model was before segment timing features existed."""
    features = {"audio_encoder": AUDIO, "text_encoder": TEXT, "audio_fingerprint": encoder_fingerprint("audio", AUDIO),
                "text_fingerprint": encoder_fingerprint("text", TEXT)}
    config = CONFIG
    if timing:
        features["timing"] = timing_fingerprint()
        config = dataclasses.replace(CONFIG, audio_dim=CONFIG.audio_dim + len(AUDIO_COLUMNS),
                                     text_dim=CONFIG.text_dim + len(TEXT_COLUMNS))
    for fold in range(folds):
        model = HilbertModel(config)
        info = CheckpointInfo(model=config, label_maps=LABELS, metrics={"score": 0.5 + 0.1 * fold}, features=features)
        save_checkpoint(folder / f"fold_{fold}", model, info, torch.optim.AdamW(model.parameters()), {"patience": 1})
    return folder


def new_run(store: str, name: str) -> str:
    experiment = Experiment.open(store, name)
    sweep = SweepTracker.start(experiment, "sweep", search_space={}, objective={"mode": "max"})
    with TrialTracker(experiment, sweep.run_id, "t0") as trial:
        return trial.run_id


@pytest.fixture(scope="module")
def champion(store, tmp_path_factory) -> str:
    """``models:/served@champion``: two fold models registered the way a sweep registers its best."""
    checkpoint = fold_checkpoints(tmp_path_factory.mktemp("trial") / "model")
    version = register_checkpoint(new_run(store, "served"), checkpoint, "served", tracking_uri=store)
    mlflow_client(store).set_registered_model_alias("served", "champion", version)
    return "models:/served@champion"


@pytest.fixture
def global_store(store, monkeypatch):
    """What an MLflow user sets before calling MLflow's own functions."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return store


def hilbert_predict(store: str, uri: str, manifest: Path, folder: Path) -> pd.DataFrame:
    """What ``hilbert predict URI MANIFEST`` writes (features through a cache)."""
    predictor = load_predictor(resolve_model(uri, folder / "model", tracking_uri=store))
    extract_in_process(load_manifest(manifest), AUDIO, TEXT, folder / "cache")  # so no Ray is started
    _, probabilities = predict_probabilities(predictor, load_manifest(manifest), folder / "cache")
    return predictions_table(load_manifest(manifest), predictor.label_maps, probabilities).to_pandas()


def assert_same_answers(served: pd.DataFrame, expected: pd.DataFrame) -> float:
    assert served["doc_id"].tolist() == expected["doc_id"].tolist()
    for task in LABELS.tasks:
        assert served[task].tolist() == expected[task].tolist(), task
    difference = float(np.abs(served[PROBABILITIES].to_numpy(float) - expected[PROBABILITIES].to_numpy(float)).max())
    assert difference <= TOLERANCE
    return difference


def test_champion_loads_with_mlflow_pyfunc_and_predicts_what_hilbert_predict_does(
        tmp_path, store, corpus, champion, global_store):
    folder = resolve_model(champion, tmp_path / "downloaded", tracking_uri=store)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "signature.json", "fold_0/model.safetensors", "fold_1/checkpoint.json",
            "input_example.json", "serving_input_example.json", "python_env.yaml"} <= files
    assert not any(name.endswith((".pkl", ".pickle", ".pt")) for name in files)  # nothing to unpickle
    flavour = mlflow.models.Model.load(str(folder)).flavors["python_function"]
    assert flavour["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavour
    assert flavour["artifacts"]["checkpoints"]["path"] == "."  # the checkpoints hilbert predict reads

    model = mlflow.pyfunc.load_model(champion)
    assert model.metadata.get_input_schema().input_names() == ["doc_id", "audio", "segments"]
    assert model.metadata.metadata["text_fingerprint"] == encoder_fingerprint("text", TEXT)
    served = model.predict(pd.DataFrame(request_rows(corpus)))
    expected = hilbert_predict(store, champion, corpus, tmp_path)
    print(f"max |served - hilbert predict| = {assert_same_answers(served, expected):.3g}")

    embedded = model.predict(pd.DataFrame(request_rows(corpus)), params={"embeddings": True})
    table = embeddings_table(load_predictor(folder), load_manifest(corpus), tmp_path / "cache").to_pandas()
    for column in ("audio_embedding", "text_embedding", "joint_embedding"):
        np.testing.assert_allclose(np.stack(embedded[column]), np.stack(table[column]), atol=TOLERANCE)
    assert "joint_embedding" not in served


def test_a_model_trained_with_timing_is_served_the_timing_columns_hilbert_predict_gives_it(tmp_path, corpus):
    folder = fold_checkpoints(tmp_path / "timed", timing=True)
    manifest = load_manifest(corpus)
    served_model = ServedModel(folder)
    item = served_model.dataset(manifest)[2]
    assert item["audio"].shape == (3, CONFIG.audio_dim + len(AUDIO_COLUMNS))
    assert item["text"].shape == (3, CONFIG.text_dim + len(TEXT_COLUMNS))
    served = served_model.predict(manifest)
    predictor = load_predictor(folder)
    extract_in_process(manifest, AUDIO, TEXT, tmp_path / "cache")
    _, probabilities = predict_probabilities(predictor, manifest, tmp_path / "cache")
    expected = predictions_table(manifest, predictor.label_maps, probabilities).to_pandas()
    print(f"max |served - hilbert predict| with timing = {assert_same_answers(served, expected):.3g}")


def test_served_features_go_through_a_cache_when_one_is_configured(tmp_path, corpus, champion, global_store):
    rows = pd.DataFrame(request_rows(corpus))
    uncached = mlflow.pyfunc.load_model(champion).predict(rows)
    cached = mlflow.pyfunc.load_model(champion, model_config={"cache_dir": str(tmp_path / "cache")})
    first = cached.predict(rows)
    entries = sorted(p.name for p in (tmp_path / "cache" / "entries").rglob("*.safetensors"))
    assert len(entries) == 2 * len(rows)  # audio and text of every document
    assert_same_answers(first, uncached)
    assert_same_answers(cached.predict(rows), uncached)  # read back from the cache
    assert sorted(p.name for p in (tmp_path / "cache" / "entries").rglob("*.safetensors")) == entries


def test_served_model_refuses_bad_documents_naming_document_and_field(tmp_path, corpus, champion, global_store):
    model = mlflow.pyfunc.load_model(champion)
    good = request_rows(corpus)[0]
    cases = {
        "missing segments": ([{"doc_id": "x", "audio": good["audio"]}], "document 'x' (row 0), field 'segments'"),
        "unreadable audio": ([{**good, "doc_id": "y", "audio": str(tmp_path / "gone.wav")}],
                             "document 'y' (row 0), field 'audio': audio file not found"),
        "unknown segment field": ([{**good, "segments": [{"start": 0, "end": 1, "text": "a", "speaker": "s1"}]}],
                                  "document 'd0' (row 0), field 'segments[0].speaker': unknown field"),
        "time past the audio": ([good, {**good, "doc_id": "z", "segments": [{"start": 1, "end": 9.5, "text": "a"}]}],
                                "document 'z' (row 1), field 'segments[0].end': end 9.500 s is past the end"),
        "reversed times": ([{**good, "segments": [{"start": 2, "end": 1, "text": "a"}]}],
                           "document 'd0' (row 0), field 'segments[0]': end (1.0) must be greater than start"),
    }
    for case, (rows, message) in cases.items():
        with pytest.raises(MlflowException, match=re.escape(message)) as raised:
            model.predict(pd.DataFrame(rows))
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE", case
    # MLflow drops undeclared columns before predict; called directly, hilbert refuses them too.
    with pytest.raises(RequestError, match="document 'd0' \\(row 0\\), field 'speaker': unknown field"):
        documents_from_rows([{**good, "speaker": "s1", "labels": {"topic": "a"}}])


def test_version_registered_before_the_flavour_loads_with_hilbert_predict_and_gains_it(
        tmp_path, store, corpus, global_store):
    run_id = new_run(store, "older")
    stage_model(fold_checkpoints(tmp_path / "trial"), tmp_path / "staged", pyfunc=False)  # what was logged before
    mlflow_client(store).log_artifacts(run_id, str(tmp_path / "staged"), MODEL_FOLDER)
    version = register_logged_model(run_id, "older", tracking_uri=store)
    uri = f"models:/older/{version}"

    expected = hilbert_predict(store, uri, corpus, tmp_path)  # hilbert predict opens it as before
    with pytest.raises(MlflowException, match="MLmodel"):
        mlflow.pyfunc.load_model(uri)
    added = CliRunner().invoke(app, ["add-pyfunc", "models:/older@challenger", "--tracking-uri", store])
    assert added.exit_code == 0 and "added MLmodel" in added.output and "pyfunc_model.py" in added.output, added.output
    assert add_pyfunc_flavour(uri, tracking_uri=store) == []  # once is enough
    assert_same_answers(mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(request_rows(corpus))), expected)
    assert mlflow_client(store).get_model_version("older", version).tags["pyfunc"] == "added"


# ---------------------------------------------------------------------------------------------
# mlflow models serve


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until_serving(server: subprocess.Popen, port: int, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping in {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_hilbert_predict_and_refuses_bad_requests_with_400(
        tmp_path, store, corpus, champion):
    expected = hilbert_predict(store, champion, corpus, tmp_path)
    port, log = free_port(), tmp_path / "serve.log"
    scripts = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH: the environment's, as when activated
    environment = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true",
                   "OMP_NUM_THREADS": "1", "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
                   "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"cache_dir": str(tmp_path / "served-cache")})}
    command = [str(scripts / "mlflow"), "models", "serve", "-m", champion, "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until_serving(server, port, log)
        rows = request_rows(corpus)
        for payload in ({"dataframe_records": rows}, {"inputs": rows}):
            status, answer = post(port, payload)
            assert status == 200, answer
            assert_same_answers(pd.DataFrame(answer["predictions"]), expected)
        status, answer = post(port, {"dataframe_records": rows[:1], "params": {"embeddings": True}})
        assert status == 200 and len(answer["predictions"][0]["joint_embedding"]) == CONFIG.d_embed
        assert len(list((tmp_path / "served-cache" / "entries").rglob("*.safetensors"))) == 2 * len(rows)

        good = rows[0]
        bad = {
            "missing segments": ([{"doc_id": "x", "audio": good["audio"]}], "document 'x' (row 0), field 'segments'"),
            "unreadable audio": ([{**good, "doc_id": "y", "audio": str(tmp_path / "gone.wav")}],
                                 "document 'y' (row 0), field 'audio': audio file not found"),
            "unknown field": ([{**good, "segments": [{"start": 0, "end": 1, "text": "a", "speaker": "s1"}]}],
                              "document 'd0' (row 0), field 'segments[0].speaker': unknown field"),
            "time past the audio": ([{**good, "segments": [{"start": 1, "end": 9.5, "text": "a"}]}],
                                    "document 'd0' (row 0), field 'segments[0].end': end 9.500 s is past the end"),
        }
        for case, (records, message) in bad.items():
            for payload in ({"dataframe_records": records}, {"inputs": records}):
                status, answer = post(port, payload)
                assert status == 400, (case, status, answer)
                assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and message in answer["message"], case
                assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer, case
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        server.wait(timeout=30)
