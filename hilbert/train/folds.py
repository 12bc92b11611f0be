"""k-fold splits that are stratified on one task, grouped by ``group``, and fixed in a file.

Results are only comparable across runs, ablations and sweep trials when every one of them sees
the same folds, so the split is computed once, written next to the run (or wherever the user
points) and read back by everything after.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hilbert.data.manifest import Manifest
from hilbert.features.cache import atomic_write_json

UNLABELLED = "\u2205"  # documents without a label for the stratification task form their own stratum


class SplitError(ValueError):
    """The corpus cannot be split as asked (too few groups or documents for k folds)."""


@dataclass(frozen=True)
class Split:
    """Fold index of every document."""

    k: int
    seed: int
    stratify: str | None
    fold_of: dict[str, int]

    def train_ids(self, fold: int) -> list[str]:
        return [doc for doc, f in self.fold_of.items() if f != fold]

    def validation_ids(self, fold: int) -> list[str]:
        return [doc for doc, f in self.fold_of.items() if f == fold]

    def to_json(self) -> dict:
        return {"k": self.k, "seed": self.seed, "stratify": self.stratify, "fold_of": self.fold_of}


def make_split(manifest: Manifest, k: int, *, stratify: str | None = None, seed: int = 0) -> Split:
    """Assign every document to one of ``k`` folds.

    Documents sharing a ``group`` land in the same fold; fold class proportions of ``stratify``
    follow the corpus as closely as the groups allow. With no stratification task the first
    task of the corpus is used, if any.
    """
    if k < 2:
        raise SplitError(f"k must be at least 2, got {k}")
    stratify = stratify if stratify is not None else (manifest.tasks[0] if manifest.tasks else None)
    if stratify is not None and stratify not in manifest.tasks:
        raise SplitError(f"stratification task {stratify!r} is not in the corpus (tasks: {manifest.tasks})")
    ids = [doc.doc_id for doc in manifest]
    groups = [doc.group if doc.group is not None else f"\0{doc.doc_id}" for doc in manifest]
    if len(set(groups)) < k:
        raise SplitError(f"{len(set(groups))} groups cannot fill {k} folds: lower k or give fewer documents a shared group")
    strata = [(doc.labels.get(stratify) or UNLABELLED) if stratify else UNLABELLED for doc in manifest]
    # A class rarer than k cannot be spread over every fold; StratifiedGroupKFold copes but warns.
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, validation) in enumerate(splitter.split(np.zeros(len(ids)), strata, groups)):
        for index in validation:
            fold_of[ids[index]] = fold
    return Split(k, seed, stratify, fold_of)


def load_or_make_split(path: Path, manifest: Manifest, k: int, *, stratify: str | None = None,
                       seed: int = 0) -> Split:
    """Read the split at ``path`` when it matches the corpus and settings, else make and write it."""
    ids = {doc.doc_id for doc in manifest}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        split = Split(saved["k"], saved["seed"], saved["stratify"], saved["fold_of"])
        if set(split.fold_of) == ids and split.k == k and (stratify is None or split.stratify == stratify):
            return split
        raise SplitError(f"split file {path} does not match this corpus or k={k} (it has k={split.k}, "
                         f"{len(split.fold_of)} documents, stratified on {split.stratify!r}); "
                         "delete it or point to another split file")
    split = make_split(manifest, k, stratify=stratify, seed=seed)
    atomic_write_json(path, split.to_json())
    return split


def fold_class_counts(split: Split, manifest: Manifest, task: str) -> list[Counter]:
    by_id = manifest.by_id()
    return [Counter(by_id[d].labels.get(task) for d in split.validation_ids(f)) for f in range(split.k)]
