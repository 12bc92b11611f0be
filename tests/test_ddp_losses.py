"""The cross-modal losses under DDP: two gloo processes on loopback against one process on the
global batch (the property that matters: W workers train like one worker on W times the batch)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from hilbert.losses import (
    HilbertLoss,
    LossConfig,
    all_gather_with_grad,
    cka_loss,
    cross_modal_loss,
    dual_contrastive_loss,
    hilbert_loss,
    info_nce,
    information_balance_loss,
)
from hilbert.model import HilbertModel, HilbertModelConfig

WORLD = 2

pytestmark = pytest.mark.slow

# Each cross-modal term on the same [3, N, D] inputs (audio, text, joint), with or without the gather.
TERMS = {
    "info_nce": lambda z, **kw: info_nce(z[0], z[2], 0.1, **kw),
    "dual_contrastive": lambda z, **kw: dual_contrastive_loss(z[0], z[1], z[2], 0.1, **kw).total,
    "cka_unbiased": lambda z, **kw: cka_loss(z[0], z[1], z[2], unbiased=True, **kw).total,
    "cka_biased": lambda z, **kw: cka_loss(z[0], z[1], z[2], unbiased=False, **kw).total,
    "balance": lambda z, **kw: information_balance_loss(z[0], z[1], z[2], 0.1, **kw),
}


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(check, *args):
    mp.spawn(_in_process_group, args=(check, _free_loopback_port(), *args), nprocs=WORLD, join=True)


def _in_process_group(rank: int, check, port: int, *args):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback too
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        check(rank, *args)
        # No rank tears its gloo pairs down while the other still has collectives in flight on
        # them (on a loaded machine that aborted the slower process with "terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _tiny_model_config() -> HilbertModelConfig:
    return HilbertModelConfig(
        audio_dim=10, text_dim=6, tasks={"diagnosis": 3, "severity": 2}, d_model=16, d_embed=8, n_heads=2,
        n_cross_layers=1, pooling_heads=2, dropout=0.0, n_experts=2, expert_hidden=8,
    )


def _documents(n: int = 8, segments: int = 5):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, segments, dtype=torch.bool)
    mask[1, 3:] = mask[6, 2:] = False
    labels = {"diagnosis": torch.randint(0, 3, (n,), generator=g), "severity": torch.randint(0, 2, (n,), generator=g)}
    return torch.randn(n, segments, 10, generator=g), torch.randn(n, segments, 6, generator=g), mask, labels


def _assert_parameter_gradients_match(loss, reference, parameters):
    """DDP's mean over ranks of this rank's gradient == the one-process gradient."""
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    expected_grads = torch.autograd.grad(reference, parameters, allow_unused=True)
    for parameter, grad, expected in zip(parameters, grads, expected_grads):
        expected = torch.zeros_like(parameter) if expected is None else expected
        grad = torch.zeros_like(parameter) if grad is None else grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad / WORLD, expected, atol=2e-5, rtol=1e-4)


def _check_gather_and_global_batch_gradients(rank: int):
    # gathered values and gradients with unequal local batch sizes
    sizes = [3, 5]
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    full = torch.arange(8 * 2, dtype=torch.float32).view(8, 2)
    local = full[rows].clone().requires_grad_()
    gathered = all_gather_with_grad(local)
    torch.testing.assert_close(gathered, full)
    weights = torch.linspace(-1, 1, 16).view(8, 2)
    (gathered * weights).sum().backward()  # the same loss on every rank
    torch.testing.assert_close(local.grad, WORLD * weights[rows])

    # every cross-modal term: value and gradient of the local rows == one process on the 8 rows
    embeddings = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(2))
    for name, term in TERMS.items():
        whole = embeddings.clone().requires_grad_()
        reference = term(whole, gather=False)
        (reference_grad,) = torch.autograd.grad(reference, whole)
        local = embeddings[:, rows].clone().requires_grad_()
        value = term(local, gather=True)
        (grad,) = torch.autograd.grad(value, local)
        torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(grad / WORLD, reference_grad[:, rows], atol=1e-6, rtol=1e-5, msg=name)

    # the whole objective: W ranks with gather + DDP-style gradient mean == one process
    torch.manual_seed(0)
    model = HilbertModel(_tiny_model_config())
    config = LossConfig(lambda_moe=0.0, lambda_cka=0.5, lambda_balance=0.5)
    objective = HilbertLoss(config)
    audio, text, mask, labels = _documents()
    parameters = [*model.parameters(), *objective.parameters()]
    one_process = LossConfig(**{**vars(config), "gather": False})
    reference, _ = hilbert_loss(model(audio, text, mask), labels, one_process, objective.temperature())
    rows = slice(4 * rank, 4 * (rank + 1))
    local_labels = {task: value[rows] for task, value in labels.items()}
    loss, _ = objective(model(audio[rows], text[rows], mask[rows]), local_labels)
    _assert_parameter_gradients_match(loss, reference, parameters)


def test_two_process_gather_matches_one_process_on_the_global_batch():
    _spawn(_check_gather_and_global_batch_gradients)


def _check_sampler_repeat_counts_once(rank: int):
    # 7 documents on 2 ranks: DistributedSampler pads rank 1 with a second copy of document 0
    n = 7
    local_index = torch.tensor(list(DistributedSampler(range(n), num_replicas=WORLD, rank=rank, shuffle=False)))
    assert local_index.tolist() == [[0, 2, 4, 6], [1, 3, 5, 0]][rank]
    torch.manual_seed(0)
    model = HilbertModel(_tiny_model_config())
    config = LossConfig(lambda_cka=0.5, lambda_balance=0.5)
    temperature = torch.tensor(0.1, requires_grad=True)
    audio, text, mask, _ = _documents(n)
    parameters = [*model.parameters(), temperature]

    def cross_modal(rows, document_ids, gather):
        out = model(audio[rows], text[rows], mask[rows])
        one = LossConfig(**{**vars(config), "gather": gather})
        return cross_modal_loss(out.audio_embedding, out.text_embedding, out.joint_embedding, one, temperature,
                                document_ids)[0]

    reference = cross_modal(torch.arange(n), None, gather=False)  # one process, each document once
    loss = cross_modal(local_index, local_index, gather=True)
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    _assert_parameter_gradients_match(loss, reference, parameters)
    # without the identities the repeat is its own false negative and counts twice
    assert abs(cross_modal(local_index, None, gather=True).item() - reference.item()) > 1e-3


def test_two_process_sampler_repeat_counts_once_like_one_process_on_the_distinct_documents():
    _spawn(_check_sampler_repeat_counts_once)
