"""Checkpoints that load without unpickling: safetensors for tensors, JSON for everything else.

A checkpoint is a folder::

    model.safetensors      the model's state dict
    checkpoint.json        model config, label maps, feature encoders, training config, epoch,
                           metrics, hilbert version: what is needed to rebuild and use the model
    optimizer.safetensors  optimizer tensors (moments), flattened as "<param index>.<name>"
    optimizer.json         the rest of the optimizer state (step counts, param groups)
    extra.json             free-form JSON the trainer wants back on resume (early stopping state)

``torch.load`` is never called, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hilbert import __version__
from hilbert.config import from_dict, to_dict
from hilbert.features.batches import LabelMaps
from hilbert.model.hilbert import OLDER_CONFIG_VALUES, HilbertModel, HilbertModelConfig

FORMAT = "hilbert-checkpoint/1"


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot continue this run: it holds another model."""


@dataclass
class CheckpointInfo:
    """The JSON half of a checkpoint."""

    model: HilbertModelConfig
    label_maps: LabelMaps
    features: dict[str, Any] = field(default_factory=dict)  # encoders, dims, fingerprints
    training: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # FeatureSet.document_identity of every document the model trained or chose its epoch on
    # (its fold's train and validation documents); None: not recorded (older checkpoints).
    seen_documents: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        written = {"format": FORMAT, "hilbert_version": __version__, "model": to_dict(self.model),
                   "label_maps": self.label_maps.to_json(), "features": self.features,
                   "training": self.training, "epoch": self.epoch, "metrics": self.metrics}
        return written if self.seen_documents is None else {**written, "seen_documents": self.seen_documents}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CheckpointInfo":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a hilbert checkpoint (format {data.get('format')!r}, expected {FORMAT!r})")
        # a field missing from an older checkpoint takes the value it was trained with, not today's default
        return cls(model=from_dict(HilbertModelConfig, {**OLDER_CONFIG_VALUES, **data["model"]}, "model"),
                   label_maps=LabelMaps.from_json(data["label_maps"]), features=data.get("features", {}),
                   training=data.get("training", {}), epoch=int(data.get("epoch", 0)),
                   metrics=data.get("metrics", {}), seen_documents=data.get("seen_documents"))


def save_checkpoint(folder: str | Path, model: torch.nn.Module, info: CheckpointInfo,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (built beside it, then renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in _unwrap(model).state_dict().items()}
        save_file(state, str(staging / "model.safetensors"))
        _write_json(staging / "checkpoint.json", info.to_json())
        if optimizer is not None:
            tensors, rest = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(staging / "optimizer.safetensors"))
            _write_json(staging / "optimizer.json", rest)
        _write_json(staging / "extra.json", extra or {})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_info(folder: str | Path) -> CheckpointInfo:
    path = Path(folder) / "checkpoint.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {folder} (missing checkpoint.json)")
    return CheckpointInfo.from_json(json.loads(path.read_text(encoding="utf-8")))


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[HilbertModel, CheckpointInfo]:
    """Rebuild the model of a checkpoint folder, in eval mode."""
    info = load_info(folder)
    model = HilbertModel(info.model)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors"), device=str(device)))
    return model.to(device).eval(), info


def load_training_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                        ) -> tuple[CheckpointInfo, dict[str, Any]]:
    """Restore weights (and optimizer state) in place for resuming; returns info and extra.

    A checkpoint of another architecture than ``model`` (a run continued with a changed model
    config, or started before a default changed) is refused with the differing fields, before
    any weights are read."""
    folder = Path(folder)
    info = load_info(folder)
    built = to_dict(_unwrap(model).config)
    differing = {name: (value, built.get(name)) for name, value in to_dict(info.model).items() if built.get(name) != value}
    if differing:
        raise CheckpointMismatch(
            f"checkpoint {folder} holds a model with " + ", ".join(f"model.{k}={v!r}" for k, (v, _) in differing.items())
            + "; this run builds " + ", ".join(f"model.{k}={v!r}" for k, (_, v) in differing.items())
            + ": continue it with the model config it was started with (the `model:` section of its YAML; for a sweep, "
            "`base_config.model` in its sweep.json), or train into a new output folder")
    _unwrap(model).load_state_dict(load_file(str(folder / "model.safetensors")))
    if optimizer is not None and (folder / "optimizer.json").is_file():
        rest = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer.load_state_dict(_join_optimizer_state(tensors, rest))
    extra = json.loads((folder / "extra.json").read_text(encoding="utf-8")) if (folder / "extra.json").is_file() else {}
    return info, extra


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate tensors (to safetensors) from plain values (to JSON) in an optimizer state dict."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for param_id, slots in state["state"].items():
        plain_state[str(param_id)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state[str(param_id)][name] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}
