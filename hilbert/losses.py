"""HILBERT's objectives as small pure functions, plus the module that owns the temperature.

Definitions, formulas and the reasons for each choice: docs/losses.md. Shapes: ``N`` documents
in the batch, ``D`` embedding width, ``C`` classes of a task.

Under DDP the cross-modal terms use negatives from the global batch: ``hilbert_loss`` gathers the
embeddings of every rank once (``all_gather_with_grad``) and computes each term on the gathered
batch, so every rank computes the same value and, after DDP's gradient averaging, their
gradients on W workers match one worker's on the global batch. Given the documents' identities
(``document_ids``), a document that appears in several rows (``DistributedSampler`` pads the last
round with repeats) is counted once, so it is never its own false negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from hilbert.model import HilbertOutput

NULL_LABEL = -1


# --------------------------------------------------------------------------------------------
# distributed gathering


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(local: Tensor) -> Tensor:
    """All ranks' rows of ``local`` ``[n, ...]`` -> ``[sum_r n_r, ...]``, in rank order; ranks may
    differ in ``n_r``.

    The gather is differentiable, and its backward sums the gradient of the gathered tensor over
    ranks before handing each rank its rows: when every rank computes the same loss ``L`` on the
    gathered batch, each local row gets ``W * dL/dz``, and DDP's mean over ``W`` ranks gives
    parameter gradients identical to one process on the global batch, on the same scale as
    per-rank mean losses (the task loss). (open_clip's variant, which keeps only the local
    slice's own gradient, leaves these terms ``W`` times too weak after DDP's averaging, so the
    effective loss weights would change with the number of workers.) Every rank must call this
    in the same order and, in training, backpropagate through it. A no-op when
    ``torch.distributed`` is not initialised or has one rank.
    """
    if not _distributed():
        return local
    sizes = _gather_sizes(local)
    # The collective needs the same shape on every rank (gloo aborts the process otherwise):
    # pad to the largest, gather, cut each rank's padding off again.
    padded = torch.cat([local, local.new_zeros((max(sizes) - local.shape[0], *local.shape[1:]))])
    parts = _differentiable_all_gather()(padded.contiguous(), 0, dist.group.WORLD).chunk(len(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _differentiable_all_gather() -> Callable[..., Tensor]:
    """PyTorch's all-gather with autograd; its backward is the sum over ranks (a reduce-scatter).

    ``torch.distributed.nn.functional.all_gather`` computes the same, but torch 2.14 deprecates it
    in favour of this one. Imported here, not at the top: builds without distributed support
    lack the module, and single-process use never gets this far.
    """
    from torch.distributed import _functional_collectives as collectives

    # older torch (pyproject allows >= 2.9) calls it all_gather_tensor_autograd, now a deprecated alias
    return getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd


def _gather_sizes(local: Tensor) -> list[int]:
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _global_batch(*tensors: Tensor, gather: bool, document_ids: Tensor | None) -> tuple[Tensor, ...]:
    """The rows a cross-modal term is computed on: every rank's (``gather`` under DDP), and each
    document once (the first of its rows, when ``document_ids`` are given)."""
    if gather and _distributed():
        # one collective for all of them: stack along features, gather, split back
        widths = [t.shape[-1] for t in tensors]
        gathered = all_gather_with_grad(torch.cat([t.float() for t in tensors], dim=-1))
        tensors = gathered.split(widths, dim=-1)
        if document_ids is not None:
            document_ids = all_gather_with_grad(document_ids.to(gathered.device))
    if document_ids is None:
        return tuple(tensors)
    ids = document_ids.to(tensors[0].device)
    first_copy = ~(ids[:, None] == ids[None, :]).tril(diagonal=-1).any(dim=1)
    return tuple(t[first_copy] for t in tensors)


# --------------------------------------------------------------------------------------------
# contrastive alignment


class JointAlignmentLoss(NamedTuple):
    """A reciprocal loss and its two parts: audio <-> joint and text <-> joint."""

    total: Tensor
    audio_joint: Tensor
    text_joint: Tensor


def info_nce(
    x: Tensor, y: Tensor, temperature: Tensor | float, gather: bool = False, document_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``x`` and ``y`` (CLIP's loss).

    ``S_ij = <x_i / |x_i|, y_j / |y_j|> / temperature`` and, with ``CE`` the mean cross entropy
    against the diagonal, ``loss = (CE(S) + CE(S^T)) / 2``: row ``i`` of ``x`` must pick row ``i``
    of ``y`` among the ``N`` rows and vice versa. ``log N`` for uninformative embeddings, 0 for
    perfectly aligned ones at low temperature; ``log N - loss`` is a lower bound on ``I(x; y)``.

    Args:
        x: ``[N, D]`` embeddings of one view (not necessarily normalised).
        y: ``[N, D']`` embeddings of the paired view, ``D' == D``.
        temperature: scalar (float or 0-dim tensor, e.g. ``LearnableTemperature()``).
        gather: take negatives from every rank (``all_gather_with_grad``); no-op without DDP.
        document_ids: ``[N]`` integer identity of each row's document (a batch's ``"index"``).
            Rows of one document are the same positive pair, and each would be the other's
            false negative: only the first row of each document is kept, so the loss is that
            of the distinct documents (each counted once as a positive and once as a negative).
    Returns:
        0-dim float32 tensor.
    """
    x, y = _global_batch(x, y, gather=gather, document_ids=document_ids)
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    logits = x @ y.T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def dual_contrastive_loss(
    z_a: Tensor,
    z_t: Tensor,
    z_j: Tensor,
    temperature: Tensor | float,
    gather: bool = False,
    document_ids: Tensor | None = None,
) -> JointAlignmentLoss:
    """HILBERT's reciprocal dual contrastive loss: ``InfoNCE(a, j) + InfoNCE(t, j)``.

    Each modality is aligned with the joint embedding, never with the other modality: the
    similarity of ``z_a`` and ``z_t`` does not enter the loss at all.

    Args:
        z_a: ``[N, D]`` audio document embeddings.
        z_t: ``[N, D]`` text document embeddings.
        z_j: ``[N, D]`` joint (cross-attentive) document embeddings.
        temperature: scalar shared by both terms.
        gather: negatives from every rank (see ``info_nce``).
        document_ids: ``[N]``, each document counted once (see ``info_nce``).
    Returns:
        ``JointAlignmentLoss(total, audio_joint, text_joint)``, 0-dim tensors.
    """
    z_a, z_t, z_j = _global_batch(z_a, z_t, z_j, gather=gather, document_ids=document_ids)
    audio_joint = info_nce(z_a, z_j, temperature)
    text_joint = info_nce(z_t, z_j, temperature)
    return JointAlignmentLoss(audio_joint + text_joint, audio_joint, text_joint)


def pairwise_contrastive_loss(
    z_a: Tensor, z_t: Tensor, temperature: Tensor | float, gather: bool = False, document_ids: Tensor | None = None
) -> Tensor:
    """The CLIP/CLAP baseline: ``InfoNCE(a, t)``, audio aligned directly with text.

    Args:
        z_a: ``[N, D]`` audio document embeddings.
        z_t: ``[N, D]`` text document embeddings.
        temperature: scalar.
        gather: negatives from every rank (see ``info_nce``).
        document_ids: ``[N]``, each document counted once (see ``info_nce``).
    Returns:
        0-dim tensor.
    """
    return info_nce(z_a, z_t, temperature, gather=gather, document_ids=document_ids)


class LearnableTemperature(nn.Module):
    """The softmax temperature, stored as ``log(tau)`` and clamped to ``[minimum, maximum]``.

    ``forward()`` first projects the stored ``log_tau`` back into ``[log(minimum), log(maximum)]``
    (in place, as CLIP clamps its logit scale after each optimizer step), then returns
    ``exp(log_tau)``. So the value is always within the bounds, and a step past a bound does not
    leave the parameter where a clamp in the graph would pass no gradient and hold it there for
    good. The log keeps the temperature positive and makes its steps relative. With
    ``learnable=False`` it is a buffer and stays at ``initial``.
    """

    def __init__(self, initial: float = 0.07, minimum: float = 0.01, maximum: float = 1.0, learnable: bool = True):
        super().__init__()
        if not 0 < minimum <= initial <= maximum:
            raise ValueError(
                f"temperature needs 0 < minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}"
            )
        log_initial = torch.tensor(math.log(initial))
        if learnable:
            self.log_temperature = nn.Parameter(log_initial)
        else:
            self.register_buffer("log_temperature", log_initial)
        self.log_minimum, self.log_maximum = math.log(minimum), math.log(maximum)

    def forward(self) -> Tensor:
        # projection, not part of the graph: .data so no autograd version bump and no host sync
        self.log_temperature.data.clamp_(self.log_minimum, self.log_maximum)
        return self.log_temperature.exp()


# --------------------------------------------------------------------------------------------
# CKA


def linear_cka(
    x: Tensor,
    y: Tensor,
    unbiased: bool = False,
    eps: float = 1e-12,
    gather: bool = False,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Minibatch linear CKA (Kornblith et al. 2019) between two representations of ``N`` examples.

    Biased: with column-centred ``X``, ``Y``,
    ``CKA = |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F)``, in ``[0, 1]``; for ``N`` not much larger than
    the width it is high even for unrelated inputs. Unbiased (``unbiased=True``): the same ratio
    of unbiased HSIC estimates (Song et al. 2012; Nguyen et al. 2021) on the Gram matrices
    ``K = X X^T``, ``L = Y Y^T``; close to 0 for independent inputs, may go slightly negative,
    needs ``N >= 4``. Invariant to orthogonal transforms and isotropic scaling of either input.
    Computed in float32 with autocast off; ``eps`` guards the denominator (0 is returned when a
    representation is constant).

    Args:
        x: ``[N, Dx]``.
        y: ``[N, Dy]``; widths may differ.
        unbiased: use the unbiased HSIC estimator.
        eps: floor for the denominator's factors.
        gather: compute over every rank's examples (see ``all_gather_with_grad``).
        document_ids: ``[N]``; a repeated document would weigh twice in the centring and in
            HSIC, so only its first row is kept (see ``info_nce``).
    Returns:
        0-dim float32 tensor.
    """
    x, y = _global_batch(x, y, gather=gather, document_ids=document_ids)
    n = x.shape[0]
    if unbiased and n < 4:
        raise ValueError(
            f"unbiased CKA needs at least 4 examples, got {n}: use batches of >= 4 documents "
            "(drop the last incomplete batch) or set unbiased_cka=False"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float() - x.float().mean(dim=0, keepdim=True)
        y = y.float() - y.float().mean(dim=0, keepdim=True)
        if unbiased:
            return _unbiased_cka(x @ x.T, y @ y.T, eps)
        cross = (y.T @ x).square().sum()
        return cross / ((x.T @ x).norm().clamp_min(eps) * (y.T @ y).norm().clamp_min(eps))


def _unbiased_cka(gram_x: Tensor, gram_y: Tensor, eps: float) -> Tensor:
    xy = _unbiased_hsic(gram_x, gram_y)
    xx = _unbiased_hsic(gram_x, gram_x).clamp_min(eps)
    yy = _unbiased_hsic(gram_y, gram_y).clamp_min(eps)
    return xy / (xx * yy).sqrt()


def _unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    """Song et al. 2012, eq. 5, for ``n >= 4``: on Gram matrices with zeroed diagonals,
    ``[tr(KL) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))``."""
    n = k.shape[0]
    k = k - torch.diag(torch.diagonal(k))
    l = l - torch.diag(torch.diagonal(l))  # noqa: E741
    trace = (k * l).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k.sum(dim=0) @ l.sum(dim=1)) / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def cka_loss(
    z_a: Tensor,
    z_t: Tensor,
    z_j: Tensor,
    unbiased: bool = True,
    gather: bool = False,
    document_ids: Tensor | None = None,
) -> JointAlignmentLoss:
    """Structure-preservation loss: ``(1 - CKA(a, j)) + (1 - CKA(t, j))``.

    Keeps the similarity structure of each modality's document embeddings visible in the
    joint space. Args as in ``linear_cka``; ``z_a``, ``z_t``, ``z_j`` are ``[N, D]``.
    Returns ``JointAlignmentLoss(total, audio_joint, text_joint)`` with parts ``1 - CKA``.
    """
    z_a, z_t, z_j = _global_batch(z_a, z_t, z_j, gather=gather, document_ids=document_ids)
    audio_joint = 1 - linear_cka(z_a, z_j, unbiased=unbiased)
    text_joint = 1 - linear_cka(z_t, z_j, unbiased=unbiased)
    return JointAlignmentLoss(audio_joint + text_joint, audio_joint, text_joint)


# --------------------------------------------------------------------------------------------
# information balance

BalanceEstimator = Callable[..., Tensor]
"""``estimator(z_a, z_t, z_j, *, temperature, unbiased_cka) -> 0-dim tensor``, >= 0, 0 when balanced."""


def infonce_gap(
    z_a: Tensor, z_t: Tensor, z_j: Tensor, *, temperature: Tensor | float, unbiased_cka: bool = True
) -> Tensor:
    """``(L_aj - L_tj)^2`` with ``L_xj = InfoNCE(x, j)``.

    ``I(x; j) >= log N - L_xj``, so the gap between the two bounds on the information that
    reaches the joint embedding from audio and from text is ``L_tj - L_aj`` (``log N`` cancels):
    the squared gap of ``information_balance``'s bounds before their clamp.
    """
    return (info_nce(z_a, z_j, temperature) - info_nce(z_t, z_j, temperature)).square()


def infonce_gap_raise_weaker(
    z_a: Tensor, z_t: Tensor, z_j: Tensor, *, temperature: Tensor | float, unbiased_cka: bool = True
) -> Tensor:
    """``infonce_gap`` with the better-aligned modality's term detached.

    Same value; the gradient only lowers the weaker modality's InfoNCE (raises its bound)
    instead of also worsening the stronger modality's alignment to close the gap.
    """
    audio_joint, text_joint = info_nce(z_a, z_j, temperature), info_nce(z_t, z_j, temperature)
    weaker, stronger = torch.maximum(audio_joint, text_joint), torch.minimum(audio_joint, text_joint)
    return (weaker - stronger.detach()).square()


def cka_gap(z_a: Tensor, z_t: Tensor, z_j: Tensor, *, temperature: Tensor | float, unbiased_cka: bool = True) -> Tensor:
    """``(CKA(a, j) - CKA(t, j))^2``: a contribution-based estimate (how much of each modality's
    structure the joint embedding carries) that does not depend on the temperature."""
    return (linear_cka(z_a, z_j, unbiased=unbiased_cka) - linear_cka(z_t, z_j, unbiased=unbiased_cka)).square()


BALANCE_ESTIMATORS: dict[str, BalanceEstimator] = {
    "infonce_gap": infonce_gap,
    "infonce_gap_raise_weaker": infonce_gap_raise_weaker,
    "cka_gap": cka_gap,
}


def information_balance_loss(
    z_a: Tensor,
    z_t: Tensor,
    z_j: Tensor,
    temperature: Tensor | float,
    estimator: str | BalanceEstimator = "infonce_gap",
    unbiased_cka: bool = True,
    gather: bool = False,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Penalty on unequal information flow from audio and from text into the joint embedding.

    The estimators compare how well ``z_a`` and ``z_t`` each match ``z_j``. That is the flow
    from each modality only when ``z_a`` and ``z_t`` are modality-specific (the model's
    ``streams="separate"``); with ``streams="shared"`` both have read both modalities, and the
    term equalises two mixed views instead.

    Args:
        z_a, z_t, z_j: ``[N, D]`` audio, text and joint document embeddings.
        temperature: scalar, for the InfoNCE-based estimators.
        estimator: a name in ``BALANCE_ESTIMATORS`` or a function with the same signature.
        unbiased_cka: for the CKA-based estimator.
        gather: over every rank's documents (see ``all_gather_with_grad``).
        document_ids: ``[N]``, each document counted once (see ``info_nce``).
    Returns:
        0-dim tensor, 0 when balanced.
    """
    if isinstance(estimator, str):
        if estimator not in BALANCE_ESTIMATORS:
            raise ValueError(f"unknown balance estimator {estimator!r}; choose from {sorted(BALANCE_ESTIMATORS)}")
        estimator = BALANCE_ESTIMATORS[estimator]
    z_a, z_t, z_j = _global_batch(z_a, z_t, z_j, gather=gather, document_ids=document_ids)
    return estimator(z_a, z_t, z_j, temperature=temperature, unbiased_cka=unbiased_cka)


class InformationBalance(NamedTuple):
    """Lower bounds (nats) on what the joint embedding holds about each modality, and their imbalance."""

    audio: Tensor  # B_a
    text: Tensor  # B_t
    imbalance: Tensor  # |B_a - B_t| / log N, in [0, 1]


def information_balance(
    z_a: Tensor, z_t: Tensor, z_j: Tensor, temperature: Tensor | float, document_ids: Tensor | None = None
) -> InformationBalance:
    """How much of each modality reaches the joint embedding, estimated from the InfoNCE bound.

    ``B_m = clamp(log N - InfoNCE(z_m, z_j), 0, log N)`` for ``m`` in audio, text, and
    ``imbalance = |B_a - B_t| / log N``.

    ``log N - InfoNCE(z_m, z_j)`` is a lower bound on ``I(z_m; z_j)`` (van den Oord et al. 2018).
    When ``z_m`` is a function of modality ``m``'s segments alone (the model's
    ``streams="separate"``), the data processing inequality makes it a lower bound on what the
    joint embedding holds about those segments as well. The bound never exceeds ``log N``
    (InfoNCE >= 0) and information is never negative, hence the clamp; so ``imbalance`` is in
    ``[0, 1]``: 0 when both modalities reach the joint embedding equally, near 1 when it copies
    one modality and holds nothing of the other. Read it with ``B_a`` and ``B_t``: two empty
    bounds are balanced too. With ``streams="shared"`` both embeddings have read both
    modalities, and the bounds no longer tell them apart.

    Args:
        z_a, z_t, z_j: ``[N, D]`` audio, text and joint document embeddings, ``N >= 2``.
        temperature: the trained temperature (the bound depends on it).
        document_ids: ``[N]``, each document counted once (see ``info_nce``).
    Returns:
        ``InformationBalance(audio, text, imbalance)``, 0-dim float32 tensors.
    """
    z_a, z_t, z_j = _global_batch(z_a, z_t, z_j, gather=False, document_ids=document_ids)
    if z_j.shape[0] < 2:
        raise ValueError(f"information_balance needs at least 2 documents, got {z_j.shape[0]}")
    log_n = math.log(z_j.shape[0])
    audio, text = ((log_n - info_nce(z, z_j, temperature)).clamp(0.0, log_n) for z in (z_a, z_t))
    return InformationBalance(audio, text, (audio - text).abs() / log_n)


def joint_attention_share(joint_pooling: Tensor) -> Tensor:
    """The joint pooling's attention mass on each modality's stream: ``[n_modalities]``, sums to 1.

    ``share_m = mean_{b, h} sum_s A[b, h, m, s]`` for ``A`` the model's ``joint_pooling``
    ``[B, heads, n_modalities, S]`` (each head's weights sum to 1 over both streams). It shows,
    for free, which stream the joint embedding reads. Each cross-attended stream also carries
    the other modality, so this is where the joint embedding looks, not where its information
    came from: ``information_balance`` estimates that.
    """
    return joint_pooling.float().sum(dim=-1).mean(dim=(0, 1))


# --------------------------------------------------------------------------------------------
# supervised task loss


class TaskLoss(NamedTuple):
    total: Tensor  # mean over the tasks that have at least one label in the batch
    per_task: dict[str, Tensor]  # task -> weighted mean cross entropy; 0 where the task has no label
    labelled: dict[str, Tensor]  # task -> number of labelled documents in the batch


def masked_task_loss(
    logits: dict[str, Tensor], labels: dict[str, Tensor], class_weights: dict[str, Tensor] | None = None
) -> TaskLoss:
    """Cross entropy per label task over the labelled documents only.

    For a task with logits ``s`` ``[N, C]``, labels ``y`` ``[N]`` (``-1`` = no label, never a
    class) and class weights ``w`` ``[C]`` (1 if not given):
    ``L_task = sum_{i: y_i >= 0} w_{y_i} CE(s_i, y_i) / sum_{i: y_i >= 0} w_{y_i}``
    (``F.cross_entropy``'s weighted mean). ``total`` is the mean of ``L_task`` over tasks with at
    least one label; a task without labels contributes exactly 0 (no NaN), and documents without
    a label have no effect on the value or the gradient. Every head stays in the graph (with zero
    gradient when unlabelled), so DDP needs no ``find_unused_parameters``.

    Args:
        logits: task -> ``[N, C_task]``.
        labels: task -> ``[N]`` integer labels in ``[0, C_task)`` or ``-1``; same tasks as ``logits``.
        class_weights: task -> ``[C_task]`` non-negative weights (e.g. inverse class frequency);
            tasks missing from the dict are unweighted.
    """
    _check_label_tasks(logits, labels)
    per_task, labelled = {}, {}
    for task, task_logits in logits.items():
        task_labels = labels[task].to(device=task_logits.device, dtype=torch.long)
        weight = _class_weight(task, task_logits, class_weights)
        per_task[task], labelled[task] = _weighted_cross_entropy(task_logits.float(), task_labels, weight)
    tasks_with_labels = torch.stack([(count > 0).float() for count in labelled.values()]).sum()
    total = torch.stack(list(per_task.values())).sum() / tasks_with_labels.clamp_min(1)
    return TaskLoss(total, per_task, labelled)


def _weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    is_labelled = labels != NULL_LABEL
    safe_labels = labels.clamp_min(0)  # null rows need some index; their weight is 0 below
    per_document = F.cross_entropy(logits, safe_labels, reduction="none")
    document_weight = weight[safe_labels] if weight is not None else torch.ones_like(per_document)
    document_weight = torch.where(is_labelled, document_weight, torch.zeros_like(document_weight))
    weighted = torch.where(is_labelled, document_weight * per_document, torch.zeros_like(per_document))
    return weighted.sum() / document_weight.sum().clamp_min(1e-12), is_labelled.sum()


def _check_label_tasks(logits: dict[str, Tensor], labels: dict[str, Tensor]):
    if set(logits) != set(labels):
        raise ValueError(
            f"labels are for tasks {sorted(labels)} but the model predicts {sorted(logits)}; "
            "give a label tensor (with -1 for unlabelled documents) for exactly the model's tasks"
        )
    for task, task_logits in logits.items():
        task_labels = labels[task]
        if task_labels.shape != task_logits.shape[:1]:
            raise ValueError(
                f"labels[{task!r}] has shape {tuple(task_labels.shape)}, expected [{task_logits.shape[0]}]"
            )
        n_classes = task_logits.shape[1]
        if bool(((task_labels < NULL_LABEL) | (task_labels >= n_classes)).any()):
            raise ValueError(
                f"labels[{task!r}] must be in [0, {n_classes}) or -1 for no label, got {task_labels.tolist()}"
            )


def _class_weight(task: str, task_logits: Tensor, class_weights: dict[str, Tensor] | None) -> Tensor | None:
    if not class_weights or task not in class_weights:
        return None
    weight = torch.as_tensor(class_weights[task], dtype=torch.float32, device=task_logits.device)
    if weight.shape != (task_logits.shape[1],):
        raise ValueError(f"class_weights[{task!r}] has shape {tuple(weight.shape)}, expected [{task_logits.shape[1]}]")
    return weight


# --------------------------------------------------------------------------------------------
# the full objective

ALIGNMENTS = ("dual", "pairwise")


@dataclass
class LossConfig:
    """Weights and options of the HILBERT objective (definitions in docs/losses.md)."""

    lambda_contrastive: float = 1.0
    lambda_cka: float = 0.1
    lambda_balance: float = 0.1
    lambda_moe: float = 0.01
    alignment: str = "dual"  # "dual": a<->j + t<->j (HILBERT); "pairwise": a<->t (CLIP/CLAP baseline)
    temperature: float = 0.07  # initial value when learnable
    learnable_temperature: bool = True
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    use_cka: bool = True
    unbiased_cka: bool = True
    use_balance: bool = True
    balance_estimator: str = "infonce_gap"  # a name in BALANCE_ESTIMATORS
    gather: bool = True  # negatives and CKA over the global batch under DDP

    def __post_init__(self):
        for name in ("lambda_contrastive", "lambda_cka", "lambda_balance", "lambda_moe"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"LossConfig.alignment must be one of {list(ALIGNMENTS)}, got {self.alignment!r}")
        if self.balance_estimator not in BALANCE_ESTIMATORS:
            raise ValueError(
                f"LossConfig.balance_estimator must be one of {sorted(BALANCE_ESTIMATORS)}, "
                f"got {self.balance_estimator!r}"
            )
        if not 0 < self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError(
                "LossConfig needs 0 < min_temperature <= temperature <= max_temperature, got "
                f"{self.min_temperature}, {self.temperature}, {self.max_temperature}"
            )


def hilbert_loss(
    output: HilbertOutput,
    labels: dict[str, Tensor],
    config: LossConfig,
    temperature: Tensor | float | None = None,
    class_weights: dict[str, Tensor] | None = None,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``total = task + l_c * alignment + l_cka * cka + l_b * balance + l_moe * load_balance``.

    Args:
        output: a ``hilbert.model.HilbertOutput`` (embeddings ``[N, D]``, logits per task,
            ``load_balance_loss``). If the audio or text embedding is None (unimodal ablation)
            the cross-modal terms (alignment, CKA, balance) are left out.
        labels: task -> ``[N]`` labels, ``-1`` for none (see ``masked_task_loss``).
        config: the weights and options.
        temperature: scalar; ``config.temperature`` (fixed) when None. Pass
            ``LearnableTemperature()`` to learn it, or use ``HilbertLoss``.
        class_weights: task -> ``[C_task]``.
        document_ids: ``[N]`` dataset index of each document (a batch's ``"index"``): in the
            cross-modal terms a document repeated in the (global) batch is counted once.
    Returns:
        ``(total, components)``: ``total`` 0-dim with gradient; ``components`` name -> detached
        0-dim tensor for logging (``total``, ``task``, ``task/<name>``, ``labelled/<name>``,
        ``contrastive``, ``contrastive/audio_joint``, ``contrastive/text_joint``, ``cka``,
        ``cka/audio_joint``, ``cka/text_joint``, ``balance``, ``load_balance``, ``temperature``;
        each present only when its term is computed). ``cka*`` are the ``1 - CKA`` terms.
    """
    temperature = config.temperature if temperature is None else temperature
    task = masked_task_loss(output.logits, labels, class_weights)
    total = task.total
    components = {"task": task.total}
    components.update({f"task/{name}": value for name, value in task.per_task.items()})
    components.update({f"labelled/{name}": count for name, count in task.labelled.items()})
    if output.audio_embedding is not None and output.text_embedding is not None:
        cross_modal, cross_components = cross_modal_loss(
            output.audio_embedding, output.text_embedding, output.joint_embedding, config, temperature, document_ids
        )
        total = total + cross_modal
        components.update(cross_components)
    if output.load_balance_loss is not None:
        total = total + config.lambda_moe * output.load_balance_loss
        components["load_balance"] = output.load_balance_loss
    components["temperature"] = torch.as_tensor(temperature)
    components["total"] = total
    return total, {name: value.detach() for name, value in components.items()}


def cross_modal_loss(
    z_a: Tensor,
    z_t: Tensor,
    z_j: Tensor,
    config: LossConfig,
    temperature: Tensor | float,
    document_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted alignment, CKA and balance terms, on the global batch when ``config.gather``.

    ``z_a``, ``z_t``, ``z_j``: ``[N, D]``; ``document_ids`` ``[N]`` counts each document once
    (see ``info_nce``). Returns ``(weighted sum, components)``.
    """
    z_a, z_t, z_j = _global_batch(z_a, z_t, z_j, gather=config.gather, document_ids=document_ids)
    components = {}
    if config.alignment == "dual":
        dual = dual_contrastive_loss(z_a, z_t, z_j, temperature)
        contrastive = dual.total
        components.update({"contrastive/audio_joint": dual.audio_joint, "contrastive/text_joint": dual.text_joint})
    else:
        contrastive = pairwise_contrastive_loss(z_a, z_t, temperature)
    components["contrastive"] = contrastive
    total = config.lambda_contrastive * contrastive
    if config.use_cka:
        cka = cka_loss(z_a, z_t, z_j, unbiased=config.unbiased_cka)
        components.update({"cka": cka.total, "cka/audio_joint": cka.audio_joint, "cka/text_joint": cka.text_joint})
        total = total + config.lambda_cka * cka.total
    if config.use_balance:
        balance = information_balance_loss(
            z_a, z_t, z_j, temperature, estimator=config.balance_estimator, unbiased_cka=config.unbiased_cka
        )
        components["balance"] = balance
        total = total + config.lambda_balance * balance
    return total, components


class HilbertLoss(nn.Module):
    """``hilbert_loss`` with its state: the (learnable) temperature and the class weights.

    Its one parameter (``temperature.log_temperature``) must go to the optimizer and the
    checkpoint with the model's. With ``config.gather`` every rank computes the same
    cross-modal loss, so the temperature's gradient is already identical on every rank and
    needs no DDP wrapping.
    """

    def __init__(self, config: LossConfig, class_weights: dict[str, Tensor] | None = None):
        super().__init__()
        self.config = config
        self.temperature = LearnableTemperature(
            config.temperature, config.min_temperature, config.max_temperature, learnable=config.learnable_temperature
        )
        self.class_weights = class_weights

    def forward(
        self, output: HilbertOutput, labels: dict[str, Tensor], document_ids: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return hilbert_loss(output, labels, self.config, self.temperature(), self.class_weights, document_ids)
