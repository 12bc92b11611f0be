"""hilbert models as MLflow ``python_function`` models, written as *models from code*.

A logged hilbert model is one folder that two readers open::

    fold_0/model.safetensors, fold_0/checkpoint.json, ...   the fold checkpoints (safetensors + JSON)
    signature.json                                         hilbert's description (hilbert predict)
    MLmodel                                                MLflow's: python_function flavour, signature
    pyfunc_model.py                                        the code MLflow imports to load it
    python_env.yaml, requirements.txt, conda.yaml          the environment it needs (hilbert)
    input_example.json, serving_input_example.json         a request, as MLflow shows and checks it

``MLmodel`` names ``pyfunc_model.py`` (``model_code_path``; :mod:`hilbert.serving.pyfunc_model`
imports :class:`HilbertPythonModel` from the installed hilbert and calls ``set_model``) and one
artifact, ``checkpoints``, whose path is the folder itself: the checkpoints stay where
``hilbert predict`` reads them, and loading unpickles nothing (MLflow only unpickles a
``python_model.pkl``, which a model from code does not have).

The signature: input columns ``doc_id`` and ``audio`` (strings) and ``segments`` (a list of
``{"start", "end", "text"}``, declared ``Any``), all optional *to MLflow*: MLflow's own schema
check would refuse a missing or malformed field with a message naming neither the document nor
the field, and silently drops fields it does not know, so hilbert checks them itself
(:mod:`hilbert.serving.requests`) and refuses with an ``MlflowException`` of error code
``INVALID_PARAMETER_VALUE``, which the scoring server answers with 400 and the message. The
output: ``doc_id``, ``<task>`` (predicted class), ``<task>/p/<class>``; with the parameter
``embeddings=True`` also ``hilbert embed``'s columns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# As hilbert.tracking.store does (which comes after this package): no usage reports from MLflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow.pyfunc  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import Model, ModelSignature  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402
from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema  # noqa: E402

from hilbert import __version__  # noqa: E402
from hilbert.predict import EMBEDDING_COLUMNS, ModelLocationError  # noqa: E402
from hilbert.serving.requests import RequestError, documents_from_rows  # noqa: E402
from hilbert.train.checkpoint import CheckpointInfo  # noqa: E402

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
CHECKPOINTS = "checkpoints"  # the artifact: the model folder itself
EMBEDDINGS_PARAM = "embeddings"
# What load_model(uri, model_config={...}) or $MLFLOW_PYFUNC_INFERENCE_CONFIG (JSON; for `mlflow
# models serve`) may set: MLflow passes on only keys the logged model_config already holds.
MODEL_CONFIG = {"cache_dir": None, "device": "cpu", "audio_root": None}
INPUT_EXAMPLE = [{"doc_id": "d0001", "audio": "audio/d0001.wav",
                  "segments": [{"start": 0.0, "end": 2.31, "text": "so how was the week"},
                               {"start": 2.6, "end": 5.0, "text": ""}]}]


class HilbertPythonModel(mlflow.pyfunc.PythonModel):
    """The fold models of the artifact ``checkpoints``; predicts documents (rows) in-process.

    ``model_config`` (:data:`MODEL_CONFIG`; ``mlflow.pyfunc.load_model(uri, model_config={...})``,
    or for ``mlflow models serve`` ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"cache_dir": "cache"}'``):
    ``cache_dir`` (a feature cache; default none: features in memory for the request only),
    ``device`` (default ``cpu``), ``audio_root`` (what relative audio paths are relative to;
    default the working directory).
    """

    def load_context(self, context) -> None:
        from hilbert.serving.served import ServedModel  # torch and the encoders: only when loading

        config = {**MODEL_CONFIG, **(context.model_config or {})}
        self.audio_root = config["audio_root"] or None
        try:
            self.served = ServedModel(context.artifacts[CHECKPOINTS], cache_dir=config["cache_dir"] or None,
                                      device=config["device"] or "cpu")
        except ModelLocationError as error:
            raise MlflowException(f"cannot serve this hilbert model: {error}") from error

    # A DataFrame hint: MLflow infers no signature from it (the logged signature says it all)
    # and does not warn that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = _rows(model_input)
        try:
            documents = documents_from_rows(rows, self.audio_root)
            return self.served.predict(documents, embeddings=bool((params or {}).get(EMBEDDINGS_PARAM, False)))
        except RequestError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


def _rows(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input):
        return model_input
    raise MlflowException(f"expected documents as rows (a DataFrame or a list of objects with "
                          f"doc_id, audio, segments), got {type(model_input).__name__}",
                          error_code=INVALID_PARAMETER_VALUE)


def model_signature(info: CheckpointInfo) -> ModelSignature:
    """Documents in, per task the predicted class and class probabilities out (module docstring)."""
    inputs = Schema([ColSpec("string", "doc_id", required=False), ColSpec("string", "audio", required=False),
                     ColSpec(AnyType(), "segments", required=False)])
    columns = [ColSpec("string", "doc_id")]
    for task, classes in info.label_maps.classes.items():
        columns.append(ColSpec("string", task))
        columns += [ColSpec("float", f"{task}/p/{name}") for name in classes]
    columns.append(ColSpec("long", "segments", required=False))
    columns += [ColSpec(Array("float") if name.endswith("_embedding") else AnyType(), name, required=False)
                for name in EMBEDDING_COLUMNS]
    return ModelSignature(inputs=inputs, outputs=Schema(columns),
                          params=ParamSchema([ParamSpec(EMBEDDINGS_PARAM, "boolean", False)]))


def write_pyfunc_files(destination: str | Path, info: CheckpointInfo, folds: int) -> list[str]:
    """Write the pyfunc files (``MLmodel``, the code, environment and input example) into
    ``destination``, the folder that holds (or, once logged beside them, will hold) the
    checkpoints of ``info``; returns the names written."""
    destination = Path(destination)
    with tempfile.TemporaryDirectory(prefix="hilbert-pyfunc-") as scratch:
        saved = Path(scratch) / "model"
        mlflow.pyfunc.save_model(
            path=str(saved), python_model=str(CODE_FILE), signature=model_signature(info),
            input_example=pd.DataFrame(INPUT_EXAMPLE), pip_requirements=[f"hilbert=={__version__}"],
            model_config=MODEL_CONFIG, metadata=_metadata(info, folds))
        written = sorted(p.name for p in saved.iterdir())
        destination.mkdir(parents=True, exist_ok=True)
        for name in written:
            target = destination / name
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(saved / name), str(target))
    _point_artifacts_at_the_folder(destination)
    return written


def _point_artifacts_at_the_folder(folder: Path) -> None:
    """``checkpoints`` is the model folder itself ("."): the checkpoints are not copied under
    ``artifacts/``, where ``hilbert predict`` (and hilbert before this flavour) would not look."""
    model = Model.load(str(folder / "MLmodel"))
    model.flavors[mlflow.pyfunc.FLAVOR_NAME]["artifacts"] = {CHECKPOINTS: {"path": ".", "uri": "."}}
    model.model_size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    model.save(str(folder / "MLmodel"))


def _metadata(info: CheckpointInfo, folds: int) -> dict[str, Any]:
    """What the model was trained with, readable in the MLflow UI; the served model checks the
    encoders against the checkpoints' own record when it loads."""
    features = info.features
    return {"hilbert_version": __version__, "folds": folds, "tasks": dict(info.label_maps.classes),
            "audio_encoder": features.get("audio_encoder"), "text_encoder": features.get("text_encoder"),
            "audio_fingerprint": features.get("audio_fingerprint"),
            "text_fingerprint": features.get("text_fingerprint"), "timing": features.get("timing")}
