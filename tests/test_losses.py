"""Math properties of HILBERT's objectives (hilbert/losses.py)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hilbert.losses import (
    BALANCE_ESTIMATORS,
    HilbertLoss,
    InformationBalance,
    LearnableTemperature,
    LossConfig,
    all_gather_with_grad,
    cka_loss,
    dual_contrastive_loss,
    hilbert_loss,
    info_nce,
    information_balance,
    information_balance_loss,
    joint_attention_share,
    linear_cka,
    masked_task_loss,
    pairwise_contrastive_loss,
)
from hilbert.model import HilbertOutput


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def fake_output(n=8, d=16, tasks=None, seed=0, requires_grad=True) -> HilbertOutput:
    g = torch.Generator().manual_seed(seed)
    tasks = tasks or {"diagnosis": 3, "severity": 2}

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    return HilbertOutput(
        audio_embedding=leaf(n, d),
        text_embedding=leaf(n, d),
        joint_embedding=leaf(n, d),
        audio_pooling=None,
        text_pooling=None,
        joint_pooling=torch.zeros(n, 1, 2, 1),
        logits={task: leaf(n, c) for task, c in tasks.items()},
        gate_probs=None,
        load_balance_loss=torch.tensor(1.5, requires_grad=requires_grad),
    )


# ---------------------------------------------------------------------------- InfoNCE


def test_info_nce_of_identical_pairs_at_low_temperature_is_near_zero():
    x = random_orthogonal(16)[:8]  # orthonormal rows: every negative has cosine 0
    assert info_nce(x, x.clone(), temperature=0.01).item() < 1e-6


def test_info_nce_of_uninformative_embeddings_is_log_batch():
    n = 16
    constant = torch.ones(n, 32)
    assert info_nce(constant, constant, 0.07).item() == pytest.approx(math.log(n), abs=1e-5)
    torch.manual_seed(0)
    unrelated = info_nce(torch.randn(n, 512), torch.randn(n, 512), temperature=1.0)
    assert unrelated.item() == pytest.approx(math.log(n), abs=0.05)


def test_info_nce_is_symmetric_and_ignores_embedding_norms():
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    assert info_nce(x, y, 0.1).item() == pytest.approx(info_nce(y, x, 0.1).item(), abs=1e-6)
    assert info_nce(3 * x, 0.5 * y, 0.1).item() == pytest.approx(info_nce(x, y, 0.1).item(), abs=1e-6)


def test_dual_contrastive_loss_does_not_use_audio_text_similarity():
    torch.manual_seed(0)
    n, d = 8, 32
    z_a, z_t, z_j = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    # a Householder reflection that fixes the span of z_j: text-joint similarities stay exactly
    # the same while text-audio similarities change
    basis, _ = torch.linalg.qr(z_j.T, mode="complete")
    v = basis[:, n]  # orthogonal to every row of z_j
    reflected_t = z_t - 2 * (z_t @ v)[:, None] * v[None, :]
    torch.testing.assert_close(reflected_t @ z_j.T, z_t @ z_j.T, atol=1e-4, rtol=0)
    assert not torch.allclose(reflected_t @ z_a.T, z_t @ z_a.T, atol=1e-2)

    before = dual_contrastive_loss(z_a, z_t, z_j, 0.1)
    after = dual_contrastive_loss(z_a, reflected_t, z_j, 0.1)
    assert after.total.item() == pytest.approx(before.total.item(), abs=1e-5)
    # the CLIP baseline does see the change, so the check above is not vacuous
    assert pairwise_contrastive_loss(z_a, reflected_t, 0.1).item() != pytest.approx(
        pairwise_contrastive_loss(z_a, z_t, 0.1).item(), abs=1e-3
    )


def test_dual_contrastive_loss_is_the_sum_of_audio_joint_and_text_joint_infonce():
    torch.manual_seed(0)
    z_a, z_t, z_j = torch.randn(3, 6, 8).unbind(0)
    dual = dual_contrastive_loss(z_a, z_t, z_j, 0.2)
    assert dual.audio_joint.item() == pytest.approx(info_nce(z_a, z_j, 0.2).item())
    assert dual.text_joint.item() == pytest.approx(info_nce(z_t, z_j, 0.2).item())
    assert dual.total.item() == pytest.approx(dual.audio_joint.item() + dual.text_joint.item())


# ---------------------------------------------------------------------------- temperature


def test_learnable_temperature_stays_within_its_clamp_and_comes_back_from_a_bound():
    temperature = LearnableTemperature(initial=0.07, minimum=0.02, maximum=0.5)
    assert temperature().item() == pytest.approx(0.07)
    for direction, bound in ((+1.0, 0.5), (-1.0, 0.02)):  # large gradient steps, up and then down
        for _ in range(20):
            temperature.log_temperature.grad = None
            (-direction * temperature()).backward()
            with torch.no_grad():
                temperature.log_temperature -= 10.0 * temperature.log_temperature.grad
            assert 0.02 - 1e-7 <= temperature().item() <= 0.5 + 1e-7
        assert temperature().item() == pytest.approx(bound)  # not stuck at the other bound
    with torch.no_grad():
        temperature.log_temperature.fill_(math.log(1e-6))
    assert temperature().item() == pytest.approx(0.02)


def test_fixed_temperature_has_no_parameters():
    temperature = LearnableTemperature(initial=0.1, learnable=False)
    assert list(temperature.parameters()) == []
    assert temperature().item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="minimum <= initial <= maximum"):
        LearnableTemperature(initial=2.0, minimum=0.01, maximum=1.0)


# ---------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_identical_inputs_is_one(unbiased):
    x = torch.randn(16, 8)
    assert linear_cka(x, x.clone(), unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_is_invariant_to_isotropic_scaling_and_rotation(unbiased):
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 12)
    y = y + x @ torch.randn(8, 12)  # related, so CKA is far from 0
    reference = linear_cka(x, y, unbiased=unbiased).item()
    assert linear_cka(7.0 * x, 0.01 * y, unbiased=unbiased).item() == pytest.approx(reference, abs=1e-4)
    rotated = linear_cka(x @ random_orthogonal(8, 1), y @ random_orthogonal(12, 2), unbiased=unbiased)
    assert rotated.item() == pytest.approx(reference, abs=1e-4)


def test_biased_cka_lies_in_the_unit_interval():
    torch.manual_seed(0)
    for mixing in (0.0, 0.3, 1.0, 10.0):
        x = torch.randn(10, 6)
        y = torch.randn(10, 20) + mixing * x @ torch.randn(6, 20)
        value = linear_cka(x, y).item()
        assert 0.0 <= value <= 1.0 + 1e-6


def test_unbiased_cka_of_independent_inputs_is_near_zero_where_biased_is_not():
    torch.manual_seed(0)
    x, y = torch.randn(400, 64), torch.randn(400, 64)
    assert abs(linear_cka(x, y, unbiased=True).item()) < 0.02
    assert linear_cka(x, y, unbiased=False).item() > 0.1  # the small-n bias of Murphy et al. 2024


def test_unbiased_cka_needs_four_examples():
    with pytest.raises(ValueError, match="at least 4 examples"):
        linear_cka(torch.randn(3, 5), torch.randn(3, 5), unbiased=True)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_constant_representation_is_zero_not_nan(unbiased):
    value = linear_cka(torch.ones(8, 4), torch.randn(8, 4), unbiased=unbiased)
    assert torch.isfinite(value) and value.item() == pytest.approx(0.0, abs=1e-6)


def test_cka_is_computed_in_float32_under_autocast():
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = linear_cka(x.bfloat16(), (x @ random_orthogonal(8)).bfloat16(), unbiased=True)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(1.0, abs=1e-2)


def test_cka_loss_is_zero_when_each_modality_matches_the_joint_structure():
    torch.manual_seed(0)
    z_j = torch.randn(12, 8)
    loss = cka_loss(3 * z_j, z_j @ random_orthogonal(8), z_j)
    assert loss.total.item() == pytest.approx(0.0, abs=1e-5)
    assert cka_loss(torch.randn(12, 8), torch.randn(12, 8), z_j).total.item() > 0.5


# ---------------------------------------------------------------------------- information balance


@pytest.mark.parametrize("estimator", sorted(BALANCE_ESTIMATORS))
def test_balance_is_zero_when_audio_and_text_reach_the_joint_equally(estimator):
    torch.manual_seed(0)
    z_same, z_j = torch.randn(8, 16), torch.randn(8, 16)
    balanced = information_balance_loss(z_same, z_same.clone(), z_j, 0.1, estimator=estimator)
    assert balanced.item() == pytest.approx(0.0, abs=1e-8)
    aligned_audio, unrelated_text = z_j + 0.01 * torch.randn(8, 16), torch.randn(8, 16)
    unbalanced = information_balance_loss(aligned_audio, unrelated_text, z_j, 0.1, estimator=estimator)
    assert unbalanced.item() > 1e-3


def test_infonce_gap_is_the_squared_difference_of_the_two_mutual_information_bounds():
    torch.manual_seed(0)
    z_a, z_t, z_j = torch.randn(3, 8, 16).unbind(0)
    n = 8
    bound_audio = math.log(n) - info_nce(z_a, z_j, 0.1).item()
    bound_text = math.log(n) - info_nce(z_t, z_j, 0.1).item()
    gap = information_balance_loss(z_a, z_t, z_j, 0.1, estimator="infonce_gap").item()
    assert gap == pytest.approx((bound_audio - bound_text) ** 2, rel=1e-5)


def test_raise_weaker_sends_gradient_only_to_the_weaker_modality():
    torch.manual_seed(0)
    z_j = torch.randn(8, 16)
    z_a = (z_j + 0.1 * torch.randn(8, 16)).requires_grad_()  # well aligned: the stronger
    z_t = torch.randn(8, 16, requires_grad=True)
    information_balance_loss(z_a, z_t, z_j, 0.1, estimator="infonce_gap_raise_weaker").backward()
    assert z_a.grad.abs().max().item() == 0.0
    assert z_t.grad.abs().max().item() > 0.0
    symmetric_a = z_a.detach().clone().requires_grad_()
    information_balance_loss(symmetric_a, z_t.detach(), z_j, 0.1, estimator="infonce_gap").backward()
    assert symmetric_a.grad.abs().max().item() > 0.0


def test_balance_estimator_may_be_a_function_and_unknown_names_are_rejected():
    def mean_norm_gap(z_a, z_t, z_j, *, temperature, unbiased_cka):
        return (z_a.norm(dim=1).mean() - z_t.norm(dim=1).mean()).square()

    z = torch.randn(3, 6, 4)
    assert information_balance_loss(*z.unbind(0), 0.1, estimator=mean_norm_gap).item() >= 0
    with pytest.raises(ValueError, match="unknown balance estimator"):
        information_balance_loss(*z.unbind(0), 0.1, estimator="kraskov")


def test_information_balance_is_near_one_when_the_joint_copies_one_modality_and_near_zero_when_balanced():
    torch.manual_seed(0)
    n, d = 16, 64
    z_a, z_t = torch.randn(n, d), torch.randn(n, d)
    log_n = math.log(n)
    copies_audio = information_balance(z_a, z_t, z_a.clone(), 0.1)
    assert copies_audio.audio.item() == pytest.approx(log_n, rel=1e-2)  # all log N nats about audio
    assert copies_audio.text.item() < 0.05 * log_n
    assert copies_audio.imbalance.item() > 0.95
    assert information_balance(z_a, z_t, z_t.clone(), 0.1).imbalance.item() > 0.95
    balanced = information_balance(z_a, z_t, F.normalize(z_a, dim=-1) + F.normalize(z_t, dim=-1), 0.1)
    assert min(balanced.audio.item(), balanced.text.item()) > 0.95 * log_n
    assert balanced.imbalance.item() < 0.02


def test_information_balance_bounds_are_the_infonce_bounds_whose_squared_gap_is_the_balance_penalty():
    torch.manual_seed(0)
    z_a, z_t = torch.randn(16, 64), torch.randn(16, 64)
    z_j = F.normalize(z_a, dim=-1) + 0.3 * F.normalize(z_t, dim=-1)  # mostly audio
    balance = information_balance(z_a, z_t, z_j, 0.1)
    assert isinstance(balance, InformationBalance)
    log_n = math.log(16)
    assert balance.audio.item() == pytest.approx(log_n - info_nce(z_a, z_j, 0.1).item(), rel=1e-6)
    assert balance.text.item() == pytest.approx(log_n - info_nce(z_t, z_j, 0.1).item(), rel=1e-6)
    assert 0 < balance.text.item() < balance.audio.item() < log_n  # neither clamped
    penalty = information_balance_loss(z_a, z_t, z_j, 0.1, estimator="infonce_gap")
    assert penalty.item() == pytest.approx((balance.imbalance.item() * log_n) ** 2, rel=1e-5)


def test_joint_attention_share_is_the_attention_mass_on_each_stream():
    reads_audio = torch.zeros(4, 3, 2, 5)
    reads_audio[:, :, 0, :] = 0.2  # every head's weights: all on the audio stream
    torch.testing.assert_close(joint_attention_share(reads_audio), torch.tensor([1.0, 0.0]))
    uniform = torch.full((4, 3, 2, 5), 0.1)
    torch.testing.assert_close(joint_attention_share(uniform), torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------------------- task loss


def test_null_labels_do_not_change_the_task_loss_or_get_gradient():
    torch.manual_seed(0)
    logits = {"diagnosis": torch.randn(6, 3, requires_grad=True)}
    labels = {"diagnosis": torch.tensor([0, -1, 2, -1, 1, 1])}
    loss = masked_task_loss(logits, labels).total
    loss.backward()
    assert logits["diagnosis"].grad[[1, 3]].abs().max().item() == 0.0
    changed = logits["diagnosis"].detach().clone()
    changed[[1, 3]] = torch.tensor([[50.0, -50.0, 3.0], [-9.0, 0.0, 99.0]])
    assert masked_task_loss({"diagnosis": changed}, labels).total.item() == pytest.approx(loss.item())
    labelled = torch.tensor([0, 2, 4, 5])
    expected = F.cross_entropy(logits["diagnosis"].detach()[labelled], labels["diagnosis"][labelled])
    assert loss.item() == pytest.approx(expected.item())


def test_class_weights_give_the_weighted_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 2, -1])
    weights = torch.tensor([0.2, 1.0, 3.0])
    per_document = F.cross_entropy(logits[:5], labels[:5], reduction="none")
    w = weights[labels[:5]]
    expected = (w * per_document).sum() / w.sum()
    weighted = masked_task_loss({"t": logits}, {"t": labels}, {"t": weights}).total
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    # up-weighting the class the model gets most wrong raises the loss
    worst_class = int(labels[:5][per_document.argmax()])
    heavier = torch.ones(3)
    heavier[worst_class] = 10.0
    unweighted = masked_task_loss({"t": logits}, {"t": labels}).total
    assert masked_task_loss({"t": logits}, {"t": labels}, {"t": heavier}).total.item() > unweighted.item()


def test_a_task_without_labels_contributes_zero_without_nan():
    torch.manual_seed(0)
    logits = {"a": torch.randn(4, 2, requires_grad=True), "b": torch.randn(4, 3, requires_grad=True)}
    labels = {"a": torch.tensor([1, 0, -1, 1]), "b": torch.full((4,), -1)}
    result = masked_task_loss(logits, labels)
    assert result.total.item() == pytest.approx(result.per_task["a"].item())  # mean over labelled tasks only
    assert result.per_task["b"].item() == 0.0 and result.labelled["b"].item() == 0
    result.total.backward()
    assert torch.isfinite(logits["b"].grad).all() and logits["b"].grad.abs().max().item() == 0.0

    nothing = masked_task_loss(logits, {"a": torch.full((4,), -1), "b": torch.full((4,), -1)})
    assert nothing.total.item() == 0.0 and nothing.total.requires_grad


def test_bad_labels_are_rejected_with_the_task_named():
    logits = {"diagnosis": torch.randn(3, 3)}
    with pytest.raises(ValueError, match=r"labels\['diagnosis'\] must be in \[0, 3\)"):
        masked_task_loss(logits, {"diagnosis": torch.tensor([0, 3, -1])})
    with pytest.raises(ValueError, match="must be in"):
        masked_task_loss(logits, {"diagnosis": torch.tensor([0, -2, 1])})
    with pytest.raises(ValueError, match="model predicts"):
        masked_task_loss(logits, {"diagnosys": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match=r"class_weights\['diagnosis'\]"):
        masked_task_loss(logits, {"diagnosis": torch.tensor([0, 1, 2])}, {"diagnosis": torch.ones(2)})


# ---------------------------------------------------------------------------- the full objective


def test_hilbert_loss_total_is_the_weighted_sum_of_its_components():
    config = LossConfig(lambda_contrastive=0.7, lambda_cka=0.3, lambda_balance=0.2, lambda_moe=0.05)
    output = fake_output()
    labels = {"diagnosis": torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), "severity": torch.tensor([1, 0] * 4)}
    total, parts = hilbert_loss(output, labels, config)
    expected = (
        parts["task"] + 0.7 * parts["contrastive"] + 0.3 * parts["cka"] + 0.2 * parts["balance"]
        + 0.05 * parts["load_balance"]
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["contrastive"].item() == pytest.approx(
        (parts["contrastive/audio_joint"] + parts["contrastive/text_joint"]).item(), rel=1e-6
    )
    assert parts["temperature"].item() == pytest.approx(0.07)
    assert all(not value.requires_grad for value in parts.values())
    total.backward()
    assert all(t.grad is not None for t in (output.audio_embedding, output.text_embedding, output.joint_embedding))


def test_disabled_terms_are_neither_computed_nor_added():
    labels = {"diagnosis": torch.zeros(8, dtype=torch.long), "severity": torch.ones(8, dtype=torch.long)}
    config = LossConfig(use_cka=False, use_balance=False, lambda_moe=0.0)
    total, parts = hilbert_loss(fake_output(), labels, config)
    assert "cka" not in parts and "balance" not in parts
    assert total.item() == pytest.approx((parts["task"] + parts["contrastive"]).item(), rel=1e-6)


def test_pairwise_alignment_is_the_audio_text_infonce():
    output = fake_output()
    labels = {"diagnosis": torch.zeros(8, dtype=torch.long), "severity": torch.ones(8, dtype=torch.long)}
    _, parts = hilbert_loss(output, labels, LossConfig(alignment="pairwise"))
    expected = info_nce(output.audio_embedding, output.text_embedding, 0.07)
    assert parts["contrastive"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert "contrastive/audio_joint" not in parts


def test_unimodal_output_gets_only_task_and_load_balance_terms():
    output = fake_output()
    output.text_embedding = None
    labels = {"diagnosis": torch.zeros(8, dtype=torch.long), "severity": torch.ones(8, dtype=torch.long)}
    total, parts = hilbert_loss(output, labels, LossConfig())
    assert set(parts) >= {"task", "load_balance"} and not {"contrastive", "cka", "balance"} & set(parts)


def test_objective_learns_its_temperature_and_config_errors_name_the_field():
    objective = HilbertLoss(LossConfig(temperature=0.1))
    labels = {"diagnosis": torch.zeros(8, dtype=torch.long), "severity": torch.ones(8, dtype=torch.long)}
    total, parts = objective(fake_output(), labels)
    total.backward()
    assert objective.temperature.log_temperature.grad.abs().item() > 0
    assert parts["temperature"].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="LossConfig.lambda_cka"):
        LossConfig(lambda_cka=-1.0)
    with pytest.raises(ValueError, match="LossConfig.alignment"):
        LossConfig(alignment="triplet")
    with pytest.raises(ValueError, match="LossConfig.balance_estimator"):
        LossConfig(balance_estimator="mine")


# ---------------------------------------------------------------------------- repeated documents


def info_nce_by_hand(x: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    """docs/losses.md's symmetric InfoNCE, in Python floats."""
    n = len(x)
    s = [[float(F.normalize(x[i], dim=0) @ F.normalize(y[k], dim=0)) / temperature for k in range(n)]
         for i in range(n)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][k]) for k in range(n))) for i in range(n)) / n
    columns = sum(-s[k][k] + math.log(sum(math.exp(s[i][k]) for i in range(n))) for k in range(n)) / n
    return (rows + columns) / 2


def test_a_repeated_document_is_not_its_own_false_negative_and_counts_once():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    y = x + 0.1 * torch.randn(4, 8)
    ids = torch.tensor([10, 11, 12, 13, 11])  # document 11 twice, as DistributedSampler pads
    x_repeated, y_repeated = torch.cat([x, x[1:2]]), torch.cat([y, y[1:2]])
    distinct = info_nce_by_hand(x, y, 0.1)
    assert info_nce(x_repeated, y_repeated, 0.1, document_ids=ids).item() == pytest.approx(distinct, rel=1e-5)
    # without the identities each copy's positive score is the other copy's negative
    naive = info_nce(x_repeated, y_repeated, 0.1).item()
    assert naive == pytest.approx(info_nce_by_hand(x_repeated, y_repeated, 0.1), rel=1e-5)
    assert naive > distinct + 0.1
    # copies that differ (dropout) count once too: the first is kept
    second_copy_differs = torch.cat([x, x[1:2] + torch.randn(1, 8)])
    assert info_nce(second_copy_differs, y_repeated, 0.1, document_ids=ids).item() == pytest.approx(distinct, rel=1e-5)


def test_a_repeated_document_counts_once_in_every_cross_modal_term():
    output = fake_output(requires_grad=False)
    labels = {"diagnosis": torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), "severity": torch.tensor([1, 0] * 4)}
    repeat = [*range(8), 2, 5]
    repeated = fake_output(requires_grad=False)
    for name in ("audio_embedding", "text_embedding", "joint_embedding"):
        setattr(repeated, name, getattr(output, name)[repeat])
    repeated.logits = {task: value[repeat] for task, value in output.logits.items()}
    repeated_labels = {task: value[repeat] for task, value in labels.items()}
    config = LossConfig(balance_estimator="cka_gap")
    _, expected = hilbert_loss(output, labels, config)
    _, parts = hilbert_loss(repeated, repeated_labels, config, document_ids=torch.tensor(repeat))
    for name in ("contrastive", "contrastive/audio_joint", "contrastive/text_joint", "cka", "cka/audio_joint",
                 "cka/text_joint", "balance"):
        assert parts[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-7), name
    _, uncounted = hilbert_loss(repeated, repeated_labels, config)
    assert uncounted["cka"].item() != pytest.approx(expected["cka"].item(), rel=1e-3)


# ---------------------------------------------------------------------------- distributed


# Two-process (gloo) checks of the gather and of repeated documents: tests/test_ddp_losses.py.


def test_all_gather_with_grad_is_a_no_op_without_distributed():
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    gathered = all_gather_with_grad(x)
    assert gathered is x
    gathered.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 3))
