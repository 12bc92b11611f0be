"""The evaluation split: test folds partition the corpus once per repeat, validation documents
come from the training side only, groups never straddle parts, and the file is what is read back."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import document, write_manifest
from hilbert.data.manifest import load_manifest
from hilbert.train.folds import SplitError, load_or_make_split, make_split


@pytest.fixture
def corpus(tmp_path: Path):
    records = [document(f"d{i:02d}", f"audio/d{i}.wav", labels={"topic": "aab"[i % 3], "mood": "xy"[i % 2]},
                        group=f"speaker{i // 3}") for i in range(60)]
    return load_manifest(write_manifest(tmp_path, records), check_audio=False)


def test_each_repeat_tests_every_document_once_and_parts_are_disjoint(corpus):
    split = make_split(corpus, 4, stratify="topic", seed=3, validation_fraction=0.25, repeats=2)
    assert len(split.folds) == 8 and [f.index for f in split.folds] == list(range(8))
    group = {doc.doc_id: doc.group for doc in corpus}
    for repeat in (0, 1):
        tested = Counter(d for fold in split.folds if fold.repeat == repeat for d in fold.test)
        assert set(tested) == {doc.doc_id for doc in corpus} and set(tested.values()) == {1}
    for fold in split.folds:
        parts = [set(fold.train), set(fold.validation), set(fold.test)]
        assert sum(map(len, parts)) == 60 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        groups = [{group[d] for d in part} for part in parts]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]), fold.index
        assert 0.15 < len(fold.validation) / (len(fold.train) + len(fold.validation)) < 0.35
    first = [sorted(f.test) for f in split.folds if f.repeat == 0]
    second = [sorted(f.test) for f in split.folds if f.repeat == 1]
    assert first != second  # another seed, another split


def test_without_a_validation_fraction_the_training_side_is_whole(corpus):
    split = make_split(corpus, 3, validation_fraction=0)
    assert all(not fold.validation and len(fold.train) + len(fold.test) == 60 for fold in split.folds)


def test_the_split_file_is_read_back_and_a_mismatch_or_an_old_file_is_refused(corpus, tmp_path: Path):
    path = tmp_path / "split.json"
    made = load_or_make_split(path, corpus, 3, stratify="topic", validation_fraction=0.2)
    assert load_or_make_split(path, corpus, 3, stratify="topic", validation_fraction=0.2) == made
    with pytest.raises(SplitError, match="does not match"):
        load_or_make_split(path, corpus, 3, stratify="topic", validation_fraction=0.3)
    with pytest.raises(SplitError, match="does not match"):
        load_or_make_split(path, corpus, 3, stratify="topic", validation_fraction=0.2, repeats=2)
    path.write_text(json.dumps({"k": 3, "seed": 0, "stratify": "topic", "fold_of": {d.doc_id: 0 for d in corpus}}))
    with pytest.raises(SplitError, match="older hilbert"):
        load_or_make_split(path, corpus, 3, stratify="topic")


def test_few_groups_give_one_group_to_validation_and_too_few_are_refused(tmp_path: Path):
    def corpus_of(groups: int):
        records = [document(f"d{i}", f"audio/d{i}.wav", labels={"topic": "ab"[i % 2]}, group=f"g{i % groups}")
                   for i in range(12)]
        folder = tmp_path / str(groups)
        folder.mkdir(exist_ok=True)
        return load_manifest(write_manifest(folder, records), check_audio=False)

    split = make_split(corpus_of(3), 3, validation_fraction=0.2)  # 2 groups left in each fold's training side
    assert all(len(fold.validation) == 4 and len(fold.train) == 4 for fold in split.folds)
    with pytest.raises(SplitError, match="cannot give a validation split"):
        make_split(corpus_of(2), 2, validation_fraction=0.2)  # 1 group left: nothing to validate on
    assert all(not fold.validation for fold in make_split(corpus_of(2), 2, validation_fraction=0).folds)
