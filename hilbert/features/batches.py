"""Cached segment features -> padded tensors with masks and integer labels, for training.

A document is a variable-length sequence of aligned (audio, text) segment features. Batches pad
to the longest document of the batch and carry a boolean mask (True = real segment). Labels are
class indices per task, -1 where the document is unlabelled for that task (never a class).

With segment timing (:mod:`hilbert.features.timing`), its audio-side columns (duration, pause,
position) are appended to each segment's audio features and its text-side columns (words,
characters) to its text features, before any subsampling: the model's audio input is
``[S, Da + 4]`` and its text input ``[S, Dt + 2]``, and the per-feature standardisation on the
training fold (:func:`segment_statistics`) covers those columns like every other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hilbert.data.manifest import Document, Manifest
from hilbert.features.cache import CacheError, FeatureCache, FeatureSet
from hilbert.features.timing import split_timing, timing_label

UNLABELLED_INDEX = -1


class UnknownLabelError(ValueError):
    """A document carries a class the model was not trained on."""


@dataclass(frozen=True)
class LabelMaps:
    """task -> ordered class names; the index of a class is its output unit."""

    classes: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_manifest(cls, manifest: Manifest, tasks: Sequence[str] | None = None) -> "LabelMaps":
        chosen = list(tasks) if tasks else manifest.tasks
        return cls({task: tuple(manifest.classes(task)) for task in chosen})

    @property
    def tasks(self) -> list[str]:
        return list(self.classes)

    def sizes(self) -> dict[str, int]:
        return {task: len(names) for task, names in self.classes.items()}

    def encode(self, document: Document) -> dict[str, int]:
        """Class index per task for ``document`` (-1 where unlabelled); unknown classes raise."""
        encoded = {}
        for task, names in self.classes.items():
            value = document.labels.get(task)
            if value is None:
                encoded[task] = UNLABELLED_INDEX
            elif value in names:
                encoded[task] = names.index(value)
            else:
                raise UnknownLabelError(f"doc_id {document.doc_id!r}, field 'labels.{task}': unknown class "
                                        f"{value!r} (known: {', '.join(names)})")
        return encoded

    def to_json(self) -> dict[str, list[str]]:
        return {task: list(names) for task, names in self.classes.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[str]]) -> "LabelMaps":
        return cls({task: tuple(names) for task, names in data.items()})


def input_dims(feature_set: FeatureSet, timing: Mapping[str, Any] | None) -> tuple[int, int]:
    """Widths of the model's audio and text inputs: the encoders' features, plus the timing
    columns ``timing`` (a timing fingerprint; None: no timing) appends to each."""
    if timing is None:
        return feature_set.audio_dim, feature_set.text_dim
    return feature_set.audio_dim + len(timing["audio"]), feature_set.text_dim + len(timing["text"])


def layered_inputs(feature_set: FeatureSet) -> dict[str, int]:
    """The model config fields a ``layer=all`` encoder decides: ``{modality}_layers`` (its hidden
    states, side by side in each segment's features) and ``{modality}_layer_dim`` (one state's
    width), from the encoders' fingerprints; empty when neither encoder keeps all its layers."""
    fields = {}
    for modality in ("audio", "text"):
        fingerprint = getattr(feature_set, f"{modality}_fingerprint")
        if fingerprint.get("layer") == "all":
            fields[f"{modality}_layers"] = int(fingerprint["layers"])
            fields[f"{modality}_layer_dim"] = int(fingerprint["dim"])
    return fields


def document_inputs(cache: FeatureCache, feature_set: FeatureSet, doc_id: str, timing: Mapping[str, Any] | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One document's model inputs: audio [S, Da (+ timing)], text [S, Dt (+ timing)], all segments."""
    audio, text = cache.load_document(feature_set, doc_id)
    if timing is None:
        return audio, text
    audio_timing, text_timing = split_timing(cache.load_timing(feature_set, doc_id), dict(timing))
    if audio_timing.shape[0] != audio.shape[0]:
        raise CacheError(f"doc_id {doc_id!r}: {audio_timing.shape[0]} timing rows vs {audio.shape[0]} segment features")
    return np.hstack([audio, audio_timing]), np.hstack([text, text_timing])


def timing_of(feature_set: FeatureSet, wanted: bool) -> dict[str, Any] | None:
    """The timing columns a model of ``feature_set`` reads: the set's when ``wanted``
    (``data.timing``), else None. A feature set written before timing features existed has none,
    so its runs train without them (and their checkpoints say so); extracting again adds them."""
    return feature_set.timing if wanted else None


def check_timing(feature_set: FeatureSet, timing: Mapping[str, Any] | None) -> None:
    """Refuse a feature set whose timing entries are not the columns ``timing`` names."""
    if timing is None or feature_set.timing == dict(timing):
        return
    if feature_set.timing is None:
        raise CacheError(f"feature set {feature_set.id} was written before segment timing features existed: "
                         "run `hilbert extract` again to add them")
    raise CacheError(f"feature set {feature_set.id} holds {timing_label(feature_set.timing)} timing features, "
                     f"not the {timing_label(timing)} ones asked for")


class DocumentFeatures(Dataset):
    """Documents of a feature set as (audio [S, Da], text [S, Dt], labels) items.

    Features are read from the cache on first access and kept (they are small next to what the
    encoders produced them from); ``max_segments`` keeps evenly spaced segments of longer
    documents so attention stays affordable on recordings with thousands of utterances.
    ``timing`` (a timing fingerprint, the feature set's) appends those timing columns to each
    modality's features first, so the rows kept stay aligned; None: encoder features only.
    """

    def __init__(self, cache: FeatureCache, feature_set: FeatureSet, doc_ids: Sequence[str],
                 labels: Sequence[Mapping[str, int]], max_segments: int | None = None,
                 loaded: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 timing: Mapping[str, Any] | None = None):
        """``loaded`` (doc_id -> features) may be shared by datasets over the same feature set,
        ``max_segments`` and ``timing``: k folds then read and hold each document once, not k
        times. ``feature_set`` may be None when ``cache`` answers without one (served features)."""
        if len(doc_ids) != len(labels):
            raise ValueError(f"{len(doc_ids)} documents but {len(labels)} label rows")
        if feature_set is not None:
            check_timing(feature_set, timing)
        self.cache = cache
        self.feature_set = feature_set
        self.doc_ids = list(doc_ids)
        self.labels = [dict(row) for row in labels]
        self.max_segments = max_segments
        self.timing = dict(timing) if timing is not None else None
        self._loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {} if loaded is None else loaded

    @classmethod
    def for_documents(cls, cache: FeatureCache, feature_set: FeatureSet, documents: Sequence[Document],
                      label_maps: LabelMaps, max_segments: int | None = None,
                      timing: Mapping[str, Any] | None = None) -> "DocumentFeatures":
        """Encode each document's labels with ``label_maps`` (unknown classes raise)."""
        return cls(cache, feature_set, [d.doc_id for d in documents], [label_maps.encode(d) for d in documents],
                   max_segments, timing=timing)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index: int) -> dict:
        doc_id = self.doc_ids[index]
        if doc_id not in self._loaded:
            audio, text = document_inputs(self.cache, self.feature_set, doc_id, self.timing)
            self._loaded[doc_id] = _subsample(audio, text, self.max_segments)
        audio, text = self._loaded[doc_id]
        return {"index": index, "audio": audio, "text": text, "labels": self.labels[index]}


# Documents read in this process, for the most recent feature set only (see shared_documents).
_SHARED: dict[tuple[str, str, int | None, bool], dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def shared_documents(cache: FeatureCache, feature_set: FeatureSet, max_segments: int | None,
                     timing: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ``loaded`` dict (doc_id -> features) that every :class:`DocumentFeatures` over this
    feature set shares in this process.

    A sweep's Tune actors run trial after trial on the same features, and each trial builds k
    folds and then scores them again: reading each document once per process, not once per
    trial, is ~1 s a trial on the demo corpus (docs/benchmarks.md). Sharing is safe because
    cache entries are content-addressed (a feature set id never names other features) and
    nothing writes to the arrays (they are made read-only). Only the latest feature set is
    kept (with or without ``timing`` columns: a dict holds one of the two), so a sweep over
    encoder pairs holds one pair's features at a time.
    """
    key = (str(cache.location), feature_set.id, max_segments, timing)
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = _ReadOnlyDocuments()
    return _SHARED[key]


class _ReadOnlyDocuments(dict):
    def __setitem__(self, doc_id: str, features: tuple[np.ndarray, np.ndarray]) -> None:
        for array in features:
            array.flags.writeable = False
        super().__setitem__(doc_id, features)


def _subsample(audio: np.ndarray, text: np.ndarray, max_segments: int | None) -> tuple[np.ndarray, np.ndarray]:
    if max_segments is None or audio.shape[0] <= max_segments:
        return audio, text
    keep = np.linspace(0, audio.shape[0] - 1, max_segments).round().astype(int)
    return audio[keep], text[keep]


def collate_documents(items: Sequence[dict]) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Pad a list of dataset items into one batch: audio [B, S, Da], text [B, S, Dt], mask [B, S]."""
    longest = max(item["audio"].shape[0] for item in items)
    batch = len(items)
    audio_dim, text_dim = items[0]["audio"].shape[1], items[0]["text"].shape[1]
    audio = torch.zeros(batch, longest, audio_dim)
    text = torch.zeros(batch, longest, text_dim)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    audio_rows, text_rows = audio.numpy(), text.numpy()  # views: numpy copies (and casts) into them
    for row, item in enumerate(items):
        length = item["audio"].shape[0]
        audio_rows[row, :length] = item["audio"]
        text_rows[row, :length] = item["text"]
        mask[row, :length] = True
    labels = {task: torch.tensor([item["labels"][task] for item in items], dtype=torch.long)
              for task in items[0]["labels"]}
    return {"index": torch.tensor([item["index"] for item in items]), "audio": audio, "text": text,
            "mask": mask, "labels": labels}


def segment_statistics(dataset: DocumentFeatures) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-feature mean and standard deviation over every real segment of ``dataset``, per modality.

    Accumulated in float64 one document at a time, so large corpora need no concatenation.
    """
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    count = 0
    for index in range(len(dataset)):
        item = dataset[index]
        for modality in ("audio", "text"):
            values = np.asarray(item[modality], dtype=np.float64)
            sums[modality] = sums.get(modality, 0.0) + values.sum(axis=0)
            squares[modality] = squares.get(modality, 0.0) + (values ** 2).sum(axis=0)
        count += item["audio"].shape[0]
    statistics = {}
    for modality in sums:
        mean = sums[modality] / max(count, 1)
        variance = np.maximum(squares[modality] / max(count, 1) - mean ** 2, 0.0)
        statistics[modality] = (torch.tensor(mean, dtype=torch.float32), torch.tensor(np.sqrt(variance), dtype=torch.float32))
    return statistics
