"""Class weights (scikit-learn's "balanced" weights) and the learning-rate schedule of the training
loop, against their closed forms; a schedule restored from a checkpoint continues where it stopped."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hilbert.features.batches import LabelMaps
from hilbert.model.hilbert import HilbertModel, HilbertModelConfig
from hilbert.train.checkpoint import CheckpointInfo, load_training_state, save_checkpoint
from hilbert.train.loop import _class_weights, balanced_class_weights, warmup_cosine_schedule

BASE_RATE = 3e-4


def balanced_formula(labels: list[int], n_classes: int) -> list[float]:
    """n_samples / (n_present_classes * count) for a present class, 0 for an absent one; -1 is unlabelled."""
    counts = Counter(label for label in labels if label >= 0)
    n_samples = sum(counts.values())
    return [n_samples / (len(counts) * counts[c]) if counts[c] else 0.0 for c in range(n_classes)]


LABEL_SETS = {
    "three classes, one dominant": ([0, 0, 0, 0, 0, 0, 1, 1, 2], 3),
    "two classes, 15 to 1": ([0] * 15 + [1], 2),
    "absent classes and unlabelled rows": ([0, 0, 2, 2, 2, -1, -1, 2, 0, -1], 4),
    "only the last class present": ([3, 3, -1, 3], 4),
    "nothing labelled": ([-1, -1, -1], 3),
    "no documents": ([], 2),
    "many classes, random": (list(np.random.default_rng(0).choice([-1, 0, 1, 2, 4, 5, 6], 200,
                                                                  p=[.1, .4, .2, .1, .1, .05, .05])), 8),
}


@pytest.mark.parametrize("labels, n_classes", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_balanced_class_weights_are_n_samples_over_present_classes_times_count(labels, n_classes):
    weights = balanced_class_weights(labels, n_classes)
    assert weights.dtype == np.float32 and weights.shape == (n_classes,)
    np.testing.assert_allclose(weights, balanced_formula(labels, n_classes), rtol=1e-6)


def test_class_weights_are_per_task_from_the_fold_and_off_with_none():
    labels = [{"mood": 0, "topic": 1}, {"mood": 0, "topic": -1}, {"mood": 0, "topic": 1}, {"mood": 2, "topic": 0}]
    fold = SimpleNamespace(labels=labels)  # what _class_weights reads of a DocumentFeatures
    label_maps = LabelMaps({"mood": ("calm", "tense", "angry"), "topic": ("sport", "news")})
    weights = _class_weights(fold, label_maps, "balanced", torch.device("cpu"))
    assert set(weights) == {"mood", "topic"}
    for task, n_classes in label_maps.sizes().items():
        assert weights[task].dtype == torch.float32
        expected = balanced_formula([row[task] for row in labels], n_classes)
        torch.testing.assert_close(weights[task], torch.tensor(expected, dtype=torch.float32))
    assert weights["mood"][1].item() == 0.0  # absent from the fold
    assert _class_weights(fold, label_maps, "none", torch.device("cpu")) is None


def closed_form_rate(step: int, warmup: int, total: int) -> float:
    """Linear warm-up (step + 1) / warmup, then cosine from 1 down to a floor of 0.05 at ``total``."""
    if step < warmup:
        return BASE_RATE * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return BASE_RATE * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def fresh_schedule(warmup: int, total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter], lr=BASE_RATE)
    return optimizer, warmup_cosine_schedule(optimizer, warmup, total)


def train_step(optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    schedule.step()


# (warmup steps, total steps) as _build_fold computes them: epochs x steps per epoch.
SETTINGS = {"no warm-up": (0, 12), "no warm-up, one step": (0, 1), "one warm-up step": (1, 12),
            "one step per epoch": (2, 8), "warm-up as long as training": (3, 3),
            "warm-up longer than training": (5, 3), "three steps per epoch": (6, 60), "long": (50, 2000)}


@pytest.mark.parametrize("warmup, total", SETTINGS.values(), ids=SETTINGS.keys())
def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor(warmup, total):
    optimizer, schedule = fresh_schedule(warmup, total)
    for step in range(total + 1):  # the loop steps the schedule `total` times at most
        rate = optimizer.param_groups[0]["lr"]
        assert rate == pytest.approx(closed_form_rate(step, warmup, total), rel=1e-9, abs=0), step
        assert schedule.get_last_lr() == [rate]
        train_step(optimizer, schedule)
    if total > warmup:
        assert closed_form_rate(warmup, warmup, total) == pytest.approx(BASE_RATE)  # the peak
        assert closed_form_rate(total, warmup, total) == pytest.approx(0.05 * BASE_RATE)  # the floor


@pytest.mark.parametrize("warmup, total, interrupted_at",
                         [(0, 12, 5), (1, 12, 1), (2, 8, 2), (2, 8, 7), (6, 60, 3), (6, 60, 31), (5, 3, 2)])
def test_a_schedule_restored_from_a_checkpoint_continues_with_the_same_rates(tmp_path: Path, warmup, total,
                                                                            interrupted_at):
    """As _write_checkpoint and _resume do it: the optimiser through save_checkpoint, the schedule's
    state dict through extra.json; a fresh optimiser and schedule restored from them."""
    optimizer, schedule = fresh_schedule(warmup, total)
    for _ in range(interrupted_at):
        train_step(optimizer, schedule)
    model = HilbertModel(HilbertModelConfig(audio_dim=2, text_dim=2, tasks={"t": 2}, d_model=8, d_embed=8, n_heads=2,
                                            pooling_heads=2, n_experts=2, expert_hidden=8))
    info = CheckpointInfo(model=model.config, label_maps=LabelMaps({"t": ("a", "b")}))
    save_checkpoint(tmp_path / "fold_0", model, info, optimizer, {"scheduler": schedule.state_dict()})

    resumed_optimizer, resumed_schedule = fresh_schedule(warmup, total)
    _, extra = load_training_state(tmp_path / "fold_0", model, resumed_optimizer)
    resumed_schedule.load_state_dict(extra["scheduler"])
    assert resumed_schedule.last_epoch == interrupted_at
    for step in range(interrupted_at, total + 1):
        rate = resumed_optimizer.param_groups[0]["lr"]
        assert rate == optimizer.param_groups[0]["lr"], step  # identical, not just close
        assert rate == pytest.approx(closed_form_rate(step, warmup, total), rel=1e-9, abs=0)
        train_step(optimizer, schedule)
        train_step(resumed_optimizer, resumed_schedule)
