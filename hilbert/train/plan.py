"""The plan of a cross-validated training run: everything a worker needs, as plain JSON.

Built once on the driver (:func:`hilbert.train.run.make_plan`), sent to every worker as
:meth:`Plan.to_json`, read back there by :meth:`Plan.from_json` (the training loop) and
afterwards by the test predictions of the fold models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hilbert.config import to_dict
from hilbert.features.batches import (DocumentFeatures, LabelMaps, input_dims, layered_inputs, shared_documents,
                                      timing_of)
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.train.config import TrainConfig, stored_train_config


@dataclass
class Plan:
    config: TrainConfig
    variant: str
    cache_dir: str
    feature_set: FeatureSet
    label_maps: LabelMaps
    labels: dict[str, dict[str, int]]  # doc_id -> task -> class index (-1: unlabelled)
    folds: list[dict[str, Any]]  # hilbert.train.folds.Fold as JSON: index, repeat, train, validation, test

    def to_json(self) -> dict[str, Any]:
        return {"config": to_dict(self.config), "variant": self.variant, "cache_dir": self.cache_dir,
                "feature_set": to_dict(self.feature_set), "label_maps": self.label_maps.to_json(),
                "labels": self.labels, "folds": self.folds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        return cls(stored_train_config(data["config"], "config"), data["variant"], data["cache_dir"],
                   FeatureSet(**data["feature_set"]), LabelMaps.from_json(data["label_maps"]), data["labels"],
                   data["folds"])

    def fold(self, index: int) -> dict[str, Any]:
        return next(fold for fold in self.folds if fold["index"] == index)

    @property
    def fold_indices(self) -> list[int]:
        return [fold["index"] for fold in self.folds]

    @property
    def timing(self) -> dict[str, Any] | None:
        """The timing columns the model reads (the feature set's), None with ``data.timing`` off
        or for a feature set written before timing entries existed (its runs train without them)."""
        return timing_of(self.feature_set, self.config.data.timing)

    @property
    def input_dims(self) -> tuple[int, int]:
        """Widths of the model's audio and text inputs (the feature set's, plus timing columns)."""
        return input_dims(self.feature_set, self.timing)

    @property
    def layers(self) -> dict[str, int]:
        """The model's ``{modality}_layers`` and ``{modality}_layer_dim`` for ``layer=all`` encoders."""
        return layered_inputs(self.feature_set)


def fold_dataset(plan: Plan, cache: FeatureCache, fold: int, part: str) -> DocumentFeatures:
    """The ``train``, ``validation`` or ``test`` documents of ``fold``, as the loop trains or
    scores them. Every fold, and every later trial in this process, reads a document only once."""
    ids = plan.fold(fold)[part]
    max_segments, timing = plan.config.data.max_segments, plan.timing
    return DocumentFeatures(cache, plan.feature_set, ids, [plan.labels[d] for d in ids], max_segments,
                            shared_documents(cache, plan.feature_set, max_segments, timing is not None), timing)
