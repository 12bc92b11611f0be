"""Classifier heads over the document embeddings: a mixture of experts, and a linear baseline.

Both take the concatenated document embeddings ``[B, F]`` and return one logit tensor per
label task (``{task: [B, n_classes]}``), so the label regimes of different tasks (binary,
many-class, rare classes) share the trunk and differ only in their output heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ClassifierOutput:
    logits: dict[str, Tensor]  # task -> [B, n_classes]
    gate_probs: Tensor | None  # [B, n_experts]; None for the linear head
    load_balance_loss: Tensor  # scalar; 0 for the linear head


def switch_load_balance(gate_probs: Tensor) -> Tensor:
    """Switch Transformer load balance (Fedus et al. 2021): ``K * sum_k f_k * P_k``.

    ``gate_probs`` ``[B, K]``. ``f_k`` is the fraction of documents whose largest gate is expert
    ``k`` (not differentiable), ``P_k`` the mean gate probability of expert ``k``; the gradient
    flows through ``P_k`` and pushes probability away from over-used experts. 1 for a uniform
    gate (a near-uniform one can dip just below), ``K`` when one expert takes everything.
    """
    n_experts = gate_probs.shape[-1]
    top_expert_fraction = F.one_hot(gate_probs.argmax(dim=-1), n_experts).float().mean(dim=0)
    mean_probability = gate_probs.float().mean(dim=0)
    return n_experts * (top_expert_fraction * mean_probability).sum()


def importance_cv_squared(gate_probs: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of expert importance (Shazeer et al. 2017).

    ``gate_probs`` ``[B, K]``; importance ``I_k = sum_b g_bk``; returns ``Var(I) / (mean(I)^2 + eps)``,
    0 when every expert carries the same total gate mass, and fully differentiable.
    """
    importance = gate_probs.float().sum(dim=0)
    return importance.var(unbiased=False) / (importance.mean() ** 2 + eps)


LOAD_BALANCE = {"switch": switch_load_balance, "cv2": importance_cv_squared}


class TaskHeads(nn.Module):
    """One linear output layer per label task."""

    def __init__(self, d_in: int, tasks: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({task: nn.Linear(d_in, n_classes) for task, n_classes in tasks.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {task: head(x) for task, head in self.heads.items()}


class ExpertMLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class MixtureOfExpertsClassifier(nn.Module):
    """Dense softmax-gated mixture of expert MLPs with shared per-task output heads.

    ``g = softmax(W_g x)``, ``h = sum_k g_k * expert_k(x)``, ``logits_task = head_task(h)``.
    Every expert runs on every document (K is small and batches are documents, not tokens), so
    the gate is soft and fully differentiable; the load-balance term keeps it from collapsing
    onto one expert.
    """

    def __init__(
        self, d_in: int, tasks: dict[str, int], n_experts: int, d_hidden: int, dropout: float, balance: str = "switch"
    ):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.gate = nn.Linear(d_in, n_experts)
        self.experts = nn.ModuleList(ExpertMLP(d_in, d_hidden, dropout) for _ in range(n_experts))
        self.heads = TaskHeads(d_hidden, tasks)
        self.load_balance = LOAD_BALANCE[balance]

    def forward(self, features: Tensor) -> ClassifierOutput:
        x = self.norm(features)
        gate_probs = torch.softmax(self.gate(x).float(), dim=-1)
        expert_outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, K, H]
        mixed = torch.einsum("bk,bkh->bh", gate_probs.to(expert_outputs.dtype), expert_outputs)
        return ClassifierOutput(self.heads(mixed), gate_probs, self.load_balance(gate_probs))


class LinearClassifier(nn.Module):
    """LayerNorm and one linear layer per task: the baseline the mixture of experts is compared with."""

    def __init__(self, d_in: int, tasks: dict[str, int]):
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.heads = TaskHeads(d_in, tasks)

    def forward(self, features: Tensor) -> ClassifierOutput:
        return ClassifierOutput(self.heads(self.norm(features)), None, features.new_zeros(()))
