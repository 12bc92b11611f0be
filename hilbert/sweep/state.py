"""Where a sweep keeps its state: the sweep folder (``sweep.json``, Tune's state, the trials'
epoch checkpoints), on a local path or an object-store URI every node reaches."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hilbert import storage
from hilbert.config import from_dict
from hilbert.sweep.config import SweepConfig
from hilbert.train.config import TrainConfig, stored_train_config

STATE_FILE = "sweep.json"


class SweepError(RuntimeError):
    """A sweep that cannot start or resume as asked (the message says what to change)."""


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl-C): its run ends KILLED, nothing is
    registered, and ``--resume`` continues it."""


@dataclass(frozen=True)
class SweepFolder:
    """``<sweeps dir>/<name>/``: ``sweep.json``, Tune's state (``tune/``: the Optuna study, trial
    results) and the trials' epoch checkpoints (``train/<trial_id>/``: one-worker trials'
    :class:`TrialCheckpoints`, DDP trials' Train runs). A local path, or a URI
    (``s3://bucket/sweeps/NAME``) that every node of a cluster reaches."""

    root: str

    @classmethod
    def of(cls, sweeps_dir: str | Path, name: str) -> "SweepFolder":
        return cls(storage.join(storage.absolute(sweeps_dir), name))

    @property
    def name(self) -> str:
        return storage.name_of(self.root)

    @property
    def parent(self) -> str:
        return storage.parent_of(self.root)

    @property
    def state_file(self) -> str:
        return storage.join(self.root, STATE_FILE)

    @property
    def tune(self) -> str:
        return storage.join(self.root, "tune")

    @property
    def train(self) -> str:
        return storage.join(self.root, "train")


def sweeps_dir_for(config: TrainConfig) -> str:
    return storage.join(str(config.output_dir), "sweeps")


@dataclass
class SweepState:
    """What ``sweep.json`` holds: enough to resume without the YAML files."""

    name: str
    sweep: dict[str, Any]
    base_config: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    created: str
    registered_version: str | None = None
    registered_run_id: str | None = None

    def sweep_config(self) -> SweepConfig:
        # base_config is derived (init=False): it is stored apart, as base_config.
        sweep = from_dict(SweepConfig, {k: v for k, v in self.sweep.items() if k != "base_config"})
        sweep.base_config = stored_train_config(self.base_config)  # as it ran, even from older hilbert
        return sweep

    def write(self, folder: SweepFolder) -> None:
        storage.write_text(folder.state_file, json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, folder: SweepFolder) -> "SweepState":
        try:
            return cls(**json.loads(storage.read_text(folder.state_file)))
        except FileNotFoundError:
            raise SweepError(f"no sweep at {folder.root} (no {STATE_FILE}): check the name and --sweeps-dir") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise SweepError(f"{folder.state_file} is unreadable ({error})") from error
