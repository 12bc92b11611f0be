"""The evaluation split: outer test folds, an inner validation split in each, fixed in a file.

Every outer fold's documents are its **test** documents: they are scored once, by the model of
the epoch chosen without them, and nothing (an epoch, a threshold, a regularisation strength) is
ever selected on them. Inside the outer training documents, a **validation** split (a fraction
of them, stratified on the same task and grouped the same way) is what early stopping and the
baseline's regularisation are chosen on; the rest is what the fold trains on. With
``repeats`` > 1 the whole k-fold split is drawn again with the next seeds, so a small corpus
yields ``k * repeats`` outer folds and every document is tested ``repeats`` times.

Results are only comparable across runs, ablations and sweep trials when every one of them sees
the same folds, so the split is computed once, written next to the run (or wherever the user
points) and read back by everything after.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hilbert.data.manifest import Manifest
from hilbert.features.cache import atomic_write_json

UNLABELLED = "\u2205"  # documents without a label for the stratification task form their own stratum
FORMAT = 2  # 1: outer folds only (fold_of), before validation splits existed


class SplitError(ValueError):
    """The corpus cannot be split as asked (too few groups or documents for k folds)."""


@dataclass(frozen=True)
class Fold:
    """One outer fold: ``index`` counts over repeats (``repeat * k + outer``)."""

    index: int
    repeat: int
    train: list[str]
    validation: list[str]
    test: list[str]


@dataclass(frozen=True)
class Split:
    k: int
    seed: int
    stratify: str | None
    validation_fraction: float
    repeats: int
    folds: list[Fold]

    def fold(self, index: int) -> Fold:
        return self.folds[index]

    def to_json(self) -> dict:
        return {"format": FORMAT, "k": self.k, "seed": self.seed, "stratify": self.stratify,
                "validation_fraction": self.validation_fraction, "repeats": self.repeats,
                "folds": [asdict(fold) for fold in self.folds]}

    @classmethod
    def from_json(cls, saved: dict) -> "Split":
        return cls(saved["k"], saved["seed"], saved["stratify"], saved["validation_fraction"], saved["repeats"],
                   [Fold(**fold) for fold in saved["folds"]])

    def document_ids(self) -> set[str]:
        first = [fold for fold in self.folds if fold.repeat == 0]
        return {doc for fold in first for doc in (*fold.train, *fold.validation, *fold.test)}


def group_of(doc) -> str:
    """What the split keeps together: the document's group, else the document alone."""
    return doc.group if doc.group is not None else f"\0{doc.doc_id}"


def _stratified_group_parts(ids: list[str], strata: list[str], groups: list[str], parts: int, seed: int
                            ) -> list[list[int]]:
    """Indices of each of ``parts`` stratified, grouped parts of ``ids``."""
    # A class rarer than `parts` cannot be spread over every part; StratifiedGroupKFold copes.
    splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    return [held.tolist() for _, held in splitter.split(np.zeros(len(ids)), strata, groups)]


def make_split(manifest: Manifest, k: int, *, stratify: str | None = None, seed: int = 0,
               validation_fraction: float = 0.2, repeats: int = 1) -> Split:
    """Outer test folds and, inside each, a validation split of the training documents.

    Documents sharing a ``group`` land in the same part at both levels (a speaker is never in
    the training and the test or validation documents of one fold); class proportions of
    ``stratify`` follow the corpus as closely as the groups allow. With no stratification task
    the first task of the corpus is used, if any. The validation split takes one part in
    ``round(1 / validation_fraction)`` of the outer training documents (one group, when the
    training documents have fewer groups than that).
    """
    if k < 2:
        raise SplitError(f"k must be at least 2, got {k}")
    stratify = stratify if stratify is not None else (manifest.tasks[0] if manifest.tasks else None)
    if stratify is not None and stratify not in manifest.tasks:
        raise SplitError(f"stratification task {stratify!r} is not in the corpus (tasks: {manifest.tasks})")
    ids = [doc.doc_id for doc in manifest]
    groups = [group_of(doc) for doc in manifest]
    strata = [(doc.labels.get(stratify) or UNLABELLED) if stratify else UNLABELLED for doc in manifest]
    if len(set(groups)) < k:
        raise SplitError(f"{len(set(groups))} groups cannot fill {k} folds: lower k or give fewer documents a shared group")
    inner_parts = max(2, round(1 / validation_fraction)) if validation_fraction > 0 else 0
    folds: list[Fold] = []
    for repeat in range(repeats):
        for outer, test in enumerate(_stratified_group_parts(ids, strata, groups, k, seed + repeat)):
            held = set(test)
            rest = [i for i in range(len(ids)) if i not in held]
            validation: list[int] = []
            if inner_parts:
                rest_groups = [groups[i] for i in rest]
                # Few groups (a handful of speakers): one group per part, so the validation
                # split is one group, a larger share than asked; the split file records it.
                parts_here = min(inner_parts, len(set(rest_groups)))
                if parts_here < 2:
                    raise SplitError(
                        f"fold {outer}: {len(set(rest_groups))} group(s) of training documents cannot give a "
                        "validation split: add documents or groups, lower cv.folds, or set "
                        "optimization.early_stopping: false with cv.validation_fraction: 0")
                # Seeded per outer fold: each fold's validation split is its own draw.
                parts = _stratified_group_parts([ids[i] for i in rest], [strata[i] for i in rest], rest_groups,
                                                parts_here, (seed + repeat) * 1000 + outer + 1)
                validation = [rest[i] for i in parts[0]]
            chosen = set(validation)
            folds.append(Fold(index=repeat * k + outer, repeat=repeat,
                              train=[ids[i] for i in rest if i not in chosen],
                              validation=[ids[i] for i in validation], test=[ids[i] for i in test]))
    return Split(k, seed, stratify, float(validation_fraction), repeats, folds)


def load_or_make_split(path: Path, manifest: Manifest, k: int, *, stratify: str | None = None, seed: int = 0,
                       validation_fraction: float = 0.2, repeats: int = 1) -> Split:
    """Read the split at ``path`` when it matches the corpus and settings, else make and write it."""
    ids = {doc.doc_id for doc in manifest}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("format") != FORMAT:
            raise SplitError(f"split file {path} has test folds but no validation splits (written by an older "
                             "hilbert); delete it, or point cv.split_file to another file, to make a new one")
        split = Split.from_json(saved)
        if (split.document_ids() == ids and split.k == k and (stratify is None or split.stratify == stratify)
                and split.validation_fraction == validation_fraction and split.repeats == repeats):
            return split
        raise SplitError(f"split file {path} does not match this corpus or settings (it has k={split.k}, "
                         f"{len(split.document_ids())} documents, stratified on {split.stratify!r}, validation "
                         f"fraction {split.validation_fraction:g}, {split.repeats} repeat(s)); delete it or point to "
                         "another split file")
    split = make_split(manifest, k, stratify=stratify, seed=seed, validation_fraction=validation_fraction,
                       repeats=repeats)
    atomic_write_json(path, split.to_json())
    return split


def fold_class_counts(split: Split, manifest: Manifest, task: str, part: str = "test") -> list[Counter]:
    """Class counts of ``task`` in ``part`` (train, validation or test) of every fold."""
    by_id = manifest.by_id()
    return [Counter(by_id[d].labels.get(task) for d in getattr(fold, part)) for fold in split.folds]
