"""The per-worker training function: the cross-validation folds trained in lockstep, under DDP.

``train_folds(plan)`` is what every Ray Train worker runs; it also runs as a plain function in
one process (tests, debugging). It learns how many workers it has and where to report from a
:class:`WorkerContext`, never from Ray directly, so scale is configuration.

The protocol (:mod:`hilbert.train.folds`): each fold trains on its training documents, scores
its **validation** documents every epoch, and keeps the model of the epoch with the best
validation score (early stopping); with ``optimization.early_stopping`` off it keeps the last
epoch. Only when training has ended is each fold's kept model run on its **test** documents,
once: the reported figure of a fold. Test documents never influence a choice.

Why lockstep: each epoch trains every still-active fold for one epoch, then reports the mean
validation score over folds (``objective``, ``val/...``). One report per epoch is what Tune's
schedulers (ASHA, median stopping) need to compare trials, and it keeps the folds' early
stopping independent. The last report adds the test figures (``test/...``). Every epoch ends
with a checkpoint holding all folds, so a run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from hilbert.config import to_dict
from hilbert.evaluation.predictions import evaluate, objective_score
from hilbert.features.batches import DocumentFeatures, LabelMaps, collate_documents, segment_statistics
from hilbert.features.cache import FeatureCache, FeatureSet
from hilbert.losses import HilbertLoss
from hilbert.model.hilbert import HilbertModel
from hilbert.train.checkpoint import CheckpointInfo, load_training_state, save_checkpoint
from hilbert.train.config import OptimizationConfig, TrainConfig
from hilbert.train.plan import Plan, fold_dataset
from hilbert.train.report import (ACTIVE_FOLDS, EPOCH, EPOCH_SCORE, EPOCHS_COMPLETED, OBJECTIVE, REPEATED_REPORT,
                                  TEST_OBJECTIVE)

STATE_FILE = "state.json"


# ---------------------------------------------------------------------------------------------
# Where the loop runs: one process, or a Ray Train worker


@dataclass
class WorkerContext:
    """What the loop needs from its runtime: rank, world size, device, report, resume point."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, checkpoint: None
    resume_from: Path | None = None

    @classmethod
    def from_ray(cls) -> "WorkerContext":
        # Imported here: the loop also runs without Ray (one process, tests), and ray.train
        # takes seconds to import.
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        checkpoint = ray.train.get_checkpoint()
        resume_from = Path(checkpoint.to_directory()) if checkpoint else None

        def report(metrics: dict[str, Any], folder: Path | None) -> None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)

        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                   report, resume_from)


def ray_train_entry(plan: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for Ray Train's TorchTrainer."""
    train_folds(plan, WorkerContext.from_ray())


# ---------------------------------------------------------------------------------------------
# One fold's model, optimiser and early stopping


@dataclass
class FoldRun:
    fold: int
    model: nn.Module  # DistributedDataParallel-wrapped under DDP
    loss: HilbertLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_loader: DataLoader
    validation: DocumentFeatures
    test: DocumentFeatures
    best_score: float = -math.inf
    last_score: float = math.nan  # validation score (the objective's weighted AUC) of scored_epoch
    scored_epoch: int = -1
    best_epoch: int = -1
    epochs_since_best: int = 0
    done: bool = False
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the kept epoch
    test_metrics: dict[str, float] = field(default_factory=dict)  # the kept model on the test documents
    last_train: dict[str, float] = field(default_factory=dict)
    last_validation: dict[str, float] = field(default_factory=dict)
    seen_documents: list[str] = field(default_factory=list)  # identities of the train + validation documents

    @property
    def temperature(self) -> float:
        """The InfoNCE temperature as trained so far (what validation diagnostics use)."""
        return float(self.loss.temperature().detach())

    @property
    def core(self) -> HilbertModel:
        return self.model.module if hasattr(self.model, "module") else self.model

    def early_stopping_state(self) -> dict[str, Any]:
        return {"fold": self.fold, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "epochs_since_best": self.epochs_since_best, "done": self.done, "best_metrics": self.best_metrics,
                "test_metrics": self.test_metrics}

    def result(self) -> dict[str, float]:
        """What this fold reports: the test figures of the kept epoch, and how it was chosen."""
        return {"epoch": float(self.best_epoch), "val/score": self.best_score if self.best_score > -math.inf
                else math.nan, **{f"test/{name}": value for name, value in self.test_metrics.items()}}


def train_folds(plan_json: dict[str, Any], context: WorkerContext | None = None) -> dict[int, dict[str, float]]:
    """Train every fold of the plan, keep each fold's chosen epoch, score it on the fold's test
    documents; returns fold -> :meth:`FoldRun.result`."""
    context = context or WorkerContext()
    plan = Plan.from_json(plan_json)
    optimization = plan.config.optimization
    _seed_everything(optimization.seed)
    cache = FeatureCache(plan.cache_dir)
    runs = [_build_fold(plan, cache, fold, context) for fold in plan.fold_indices]
    start_epoch = 0
    if context.resume_from:
        start_epoch, restored_report = _resume(runs, context.resume_from)
        if restored_report is not None:
            # The checkpoint was persisted before its report was consumed: whoever consumed it
            # (a sweep's driver logging to MLflow) may have died in between. Say it again.
            context.report({**restored_report, REPEATED_REPORT: True}, None)
    if start_epoch >= optimization.epochs or all(run.done for run in runs):
        _score_tests(runs, plan, context)  # a run resumed after its last epoch: the test figures again
    for epoch in range(start_epoch, optimization.epochs):
        active = [run for run in runs if not run.done]
        if not active:
            break
        timings = {"train_seconds": 0.0, "validation_seconds": 0.0, "train_documents": 0.0}
        for run in active:
            started = time.perf_counter()
            run.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            run.last_train = _train_one_epoch(run, plan.config, context)
            timings["train_seconds"] += time.perf_counter() - started
            timings["train_documents"] += len(run.train_loader) * run.train_loader.batch_size * context.world_size
            started = time.perf_counter()
            if len(run.validation):
                run.last_validation, _ = evaluate(run.core, run.validation, plan.label_maps, context.device,
                                                  run.temperature)
            _update_early_stopping(run, epoch, plan.config, context)
            timings["validation_seconds"] += time.perf_counter() - started
        timings["train_documents_per_second"] = timings["train_documents"] / max(timings["train_seconds"], 1e-9)
        if epoch == optimization.epochs - 1 or all(run.done for run in runs):
            started = time.perf_counter()
            _score_tests(runs, plan, context)
            timings["test_seconds"] = time.perf_counter() - started
        report = {**_epoch_metrics(runs, epoch), **{f"time/{k}": v for k, v in timings.items()}}
        started = time.perf_counter()
        checkpoint = _write_checkpoint(runs, plan, epoch, context, report) if context.rank == 0 else None
        report["time/checkpoint_seconds"] = time.perf_counter() - started
        context.report(report, checkpoint)
        if checkpoint is not None:  # persisted (copied) by the report; the temporary folder goes
            shutil.rmtree(checkpoint, ignore_errors=True)
    return {run.fold: run.result() for run in runs}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_fold(plan: Plan, cache: FeatureCache, fold: int, context: WorkerContext) -> FoldRun:
    config = plan.config
    train_set = fold_dataset(plan, cache, fold, "train")
    validation = fold_dataset(plan, cache, fold, "validation")
    test = fold_dataset(plan, cache, fold, "test")
    # At least 2 documents a rank and 4 in the global batch: unbiased CKA needs n >= 4.
    per_worker = max(2, -(-4 // context.world_size), config.optimization.batch_size // context.world_size)
    sampler = DistributedSampler(train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=config.optimization.seed + fold)
    # Full batches only: batch-level CKA and InfoNCE are biased on a ragged last batch, and
    # equal batch sizes on every rank are what all_gather needs.
    drop_last = len(train_set) // context.world_size >= per_worker
    loader = DataLoader(train_set, batch_size=per_worker, sampler=sampler, collate_fn=collate_documents,
                        drop_last=drop_last)
    torch.manual_seed(config.optimization.seed + fold)  # the same initial weights on every rank
    model_config = config.model_config(*plan.input_dims, plan.label_maps.sizes(), plan.layers)
    model = HilbertModel(model_config)
    for modality, (mean, std) in segment_statistics(train_set).items():  # training fold only: no leak
        model.set_feature_statistics(modality, mean, std)
    model = model.to(context.device)
    class_weights = _class_weights(train_set, plan.label_maps, config.optimization.class_weighting, context.device)
    loss = HilbertLoss(config.loss, class_weights).to(context.device)
    if context.world_size > 1:
        # Unimodal ablations leave the other stream's parameters unused in some steps.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[context.device.index] if context.device.type == "cuda" else None,
            find_unused_parameters=model_config.modality != "both")
    optimizer = torch.optim.AdamW(parameter_groups(model, loss, config.optimization),
                                  lr=config.optimization.learning_rate, weight_decay=config.optimization.weight_decay)
    steps_per_epoch = max(1, len(loader))
    warmup = config.optimization.warmup_epochs * steps_per_epoch
    total = config.optimization.epochs * steps_per_epoch
    scheduler = warmup_cosine_schedule(optimizer, warmup, total)
    seen = sorted({plan.feature_set.document_identity(doc_id) for part in ("train", "validation")
                   for doc_id in plan.fold(fold)[part]})
    return FoldRun(fold, model, loss, optimizer, scheduler, loader, validation, test, seen_documents=seen)


def parameter_groups(model: nn.Module, loss: nn.Module, optimization: OptimizationConfig) -> list[dict]:
    """The optimizer's parameter groups: everything at ``optimization.learning_rate``, except, when
    ``optimization.layer_weight_learning_rate`` is set, the ``layer=all`` weighting logits, which get
    that rate and no weight decay (decay would pull them back to the plain average)."""
    everything = [*model.parameters(), *loss.parameters()]
    rate = optimization.layer_weight_learning_rate
    logits = [p for name, p in model.named_parameters() if name.endswith("layer_weighting.logits")]
    if rate is None or not logits:
        return [{"params": everything}]
    chosen = {id(p) for p in logits}
    return [{"params": [p for p in everything if id(p) not in chosen]},
            {"params": logits, "lr": rate, "weight_decay": 0.0}]


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int
                           ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine from the base rate down to 5 % of it at
    step ``total``."""
    # Not LinearLR + CosineAnnealingLR in a SequentialLR: same rates, 4x the code with old checkpoints' replay.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, warmup, total))


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _class_weights(dataset: DocumentFeatures, label_maps: LabelMaps, mode: str, device: torch.device
                   ) -> dict[str, torch.Tensor] | None:
    """Inverse-frequency ("balanced") class weights from the training fold, per task."""
    if mode == "none":
        return None
    return {task: torch.tensor(balanced_class_weights([row[task] for row in dataset.labels], len(classes)),
                               device=device)
            for task, classes in label_maps.classes.items()}


def balanced_class_weights(labels: list[int], n_classes: int) -> np.ndarray:
    """scikit-learn's "balanced" weights of the classes present in ``labels`` (unlabelled rows,
    -1, left out); a class absent from the fold gets weight 0."""
    labelled = np.asarray([label for label in labels if label >= 0], dtype=np.int64)
    present = np.unique(labelled)
    weight = np.zeros(n_classes, dtype=np.float32)
    if present.size:
        weight[present] = compute_class_weight("balanced", classes=present, y=labelled)
    return weight


def _train_one_epoch(run: FoldRun, config: TrainConfig, context: WorkerContext) -> dict[str, float]:
    run.model.train()
    autocast = config.optimization.mixed_precision and context.device.type == "cuda"
    sums: dict[str, float] = {}
    steps = 0
    for batch in run.train_loader:
        audio, text, mask = (batch[k].to(context.device, non_blocking=True) for k in ("audio", "text", "mask"))
        labels = {task: value.to(context.device) for task, value in batch["labels"].items()}
        with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=autocast):
            output = run.model(audio, text, mask)
        loss, components = run.loss(output, labels, document_ids=batch["index"])
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optimization.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for group in run.optimizer.param_groups for p in group["params"]],
                                     config.optimization.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        for name, value in components.items():
            if not name.startswith("labelled/"):
                sums[name] = sums.get(name, 0.0) + float(value)
        steps += 1
    return {name: total / max(1, steps) for name, total in sums.items()}


def _update_early_stopping(run: FoldRun, epoch: int, config: TrainConfig, context: WorkerContext) -> None:
    """Keep this epoch's model when its validation score is the best so far (or, without early
    stopping, always: the last epoch is the one reported); stop after ``patience`` worse epochs."""
    optimization = config.optimization
    score = objective_score(run.last_validation, list(run.core.config.tasks), optimization.objective_tasks,
                            optimization.objective_weights) if run.last_validation else math.nan
    if context.world_size > 1:
        # Rank 0 decides: float noise between devices must never split the ranks' decisions.
        shared = [score]
        dist.broadcast_object_list(shared, src=0)
        score = shared[0]
    run.last_score, run.scored_epoch = score, epoch
    if not optimization.early_stopping:
        run.best_score = score if not math.isnan(score) else -math.inf
        run.best_epoch, run.epochs_since_best = epoch, 0
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.core.state_dict().items()}
        run.best_metrics = {"score": score, "epoch": float(epoch), **run.last_validation,
                            "temperature": run.temperature}
        return
    if not math.isnan(score) and score > run.best_score:
        run.best_score, run.best_epoch, run.epochs_since_best = score, epoch, 0
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.core.state_dict().items()}
        run.best_metrics = {"score": score, "epoch": float(epoch), **run.last_validation,
                            "temperature": run.temperature}
    else:
        run.epochs_since_best += 1
        if run.epochs_since_best >= config.optimization.patience:
            run.done = True


def _score_tests(runs: list[FoldRun], plan: Plan, context: WorkerContext) -> None:
    """Each fold's kept model (the chosen epoch's) on the fold's test documents, once training
    has ended: the figure the fold reports. Nothing is chosen from it."""
    optimization = plan.config.optimization
    for run in runs:
        if run.best_state is None:
            continue  # no epoch was kept (every validation score undefined): nothing to report
        model = copy.deepcopy(run.core)
        model.load_state_dict(run.best_state)
        metrics, _ = evaluate(model, run.test, plan.label_maps, context.device, run.temperature)
        score = objective_score(metrics, list(run.core.config.tasks), optimization.objective_tasks,
                                optimization.objective_weights)
        run.test_metrics = {"score": score, **metrics}


def _epoch_metrics(runs: list[FoldRun], epoch: int) -> dict[str, Any]:
    """One flat dict per epoch: means over folds of training losses and validation metrics
    (``objective`` is the validation score, the selection signal), and once the test documents
    are scored, the means of the folds' test figures (``test/...``, ``test/objective``). The
    names are :mod:`hilbert.train.report`'s."""
    metrics: dict[str, Any] = {EPOCH: epoch, EPOCHS_COMPLETED: epoch + 1, ACTIVE_FOLDS: sum(not r.done for r in runs)}
    best = [r.best_score for r in runs if r.best_score > -math.inf]
    metrics[OBJECTIVE] = float(np.mean(best)) if best else math.nan  # mean over folds of best-so-far
    # The learning curve (objective never falls): this epoch's score, over the folds it trained.
    trained = [r.last_score for r in runs if r.scored_epoch == epoch and not math.isnan(r.last_score)]
    metrics[EPOCH_SCORE] = float(np.mean(trained)) if trained else math.nan
    tested = [r.test_metrics["score"] for r in runs if r.test_metrics and not math.isnan(r.test_metrics["score"])]
    if any(r.test_metrics for r in runs):
        metrics[TEST_OBJECTIVE] = float(np.mean(tested)) if tested else math.nan
    for prefix, source in (("train", "last_train"), ("val", "last_validation"), ("test", "test_metrics")):
        names = sorted({name for run in runs for name in getattr(run, source)})
        for name in names:
            values = [getattr(run, source)[name] for run in runs if name in getattr(run, source)]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if values:
                metrics[f"{prefix}/{name}"] = float(np.mean(values))
    metrics.update(layer_weight_metrics(runs))
    return metrics


def layer_weight_metrics(runs: list[FoldRun]) -> dict[str, float]:
    """``layer_weight/<modality>/<layer>``: the learned weight of each encoder layer (layer=all
    features), mean over the folds' models as they stand; empty for one-layer features."""
    weights: dict[str, list[np.ndarray]] = {}
    for run in runs:
        for modality, values in run.core.layer_weights().items():
            weights.setdefault(modality, []).append(values.cpu().numpy())
    return {f"layer_weight/{modality}/{layer}": float(value)
            for modality, folds in weights.items() for layer, value in enumerate(np.mean(folds, axis=0))}


# ---------------------------------------------------------------------------------------------
# Checkpoints: all folds, every epoch (rank 0 writes; Ray Train persists it)


def _write_checkpoint(runs: list[FoldRun], plan: Plan, epoch: int, context: WorkerContext,
                      report: dict[str, Any]) -> Path:
    """All folds (weights, optimiser, scheduler, early stopping, best models) and ``report``, the
    epoch's metrics, which a resumed run reports again."""
    folder = Path(tempfile.mkdtemp(prefix="hilbert-ckpt-"))
    for run in runs:
        info = CheckpointInfo(model=run.core.config, label_maps=plan.label_maps,
                              features=feature_description(plan.feature_set, plan.timing),
                              training={**to_dict(plan.config), "variant": plan.variant, "fold": run.fold},
                              epoch=epoch, metrics=run.best_metrics, seen_documents=run.seen_documents)
        # "objective": the loss's learnable state (its temperature), under the key checkpoints have always used.
        extra = {"scheduler": run.scheduler.state_dict(), "objective": _loss_state(run.loss)}
        save_checkpoint(folder / f"fold_{run.fold}", run.core, info, run.optimizer, extra)
        if run.best_state is not None:
            best_model = copy.deepcopy(run.core)
            best_model.load_state_dict(run.best_state)
            best_info = copy.copy(info)
            best_info.epoch = run.best_epoch
            save_checkpoint(folder / f"fold_{run.fold}_best", best_model, best_info)
    state = {"epoch": epoch, "variant": plan.variant, "folds": [run.early_stopping_state() for run in runs],
             # Dropout draws continue where they stopped, so a resumed run equals an uninterrupted one.
             "torch_rng": torch.get_rng_state().tolist(), "report": report}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return folder


def feature_description(feature_set: FeatureSet, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records of its inputs: the encoders (their features' widths and
    fingerprints) and, for a model trained with segment timing, the timing columns appended to
    them (``timing``; absent: none, as in every checkpoint written before timing existed)."""
    described = {"audio_encoder": feature_set.audio_encoder, "text_encoder": feature_set.text_encoder,
                 "audio_dim": feature_set.audio_dim, "text_dim": feature_set.text_dim,
                 "audio_fingerprint": feature_set.audio_fingerprint, "text_fingerprint": feature_set.text_fingerprint}
    return {**described, "timing": dict(timing)} if timing is not None else described


def _loss_state(loss: HilbertLoss) -> dict[str, list[float]]:
    return {name: tensor.detach().cpu().flatten().tolist() for name, tensor in loss.state_dict().items()}


def _resume(runs: list[FoldRun], folder: Path) -> tuple[int, dict[str, Any] | None]:
    """Restore every fold from a checkpoint written by :func:`_write_checkpoint`; returns the next
    epoch and the checkpointed epoch's report (None from checkpoints that predate it)."""
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    saved = {entry["fold"]: entry for entry in state["folds"]}
    for run in runs:
        _, extra = load_training_state(folder / f"fold_{run.fold}", run.model, run.optimizer)
        run.scheduler.load_state_dict(extra["scheduler"])
        run.loss.load_state_dict({name: torch.tensor(values).reshape(tensor.shape) for (name, values), tensor
                                  in zip(extra["objective"].items(), run.loss.state_dict().values())})
        entry = saved[run.fold]
        run.best_score, run.best_epoch = entry["best_score"], entry["best_epoch"]
        run.epochs_since_best, run.done, run.best_metrics = entry["epochs_since_best"], entry["done"], entry["best_metrics"]
        run.test_metrics = entry.get("test_metrics", {})
        best = folder / f"fold_{run.fold}_best" / "model.safetensors"
        run.best_state = load_file(str(best)) if best.is_file() else None
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["epoch"]) + 1, state.get("report")
