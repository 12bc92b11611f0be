"""Behaviour of the HILBERT model (hilbert/model) on tiny randomly initialised instances."""

import dataclasses
import json

import pytest
import torch

from hilbert.features.batches import LabelMaps
from hilbert.losses import HilbertLoss, LossConfig, joint_attention_share
from hilbert.model import HilbertModel, HilbertModelConfig
from hilbert.model.moe import importance_cv_squared, switch_load_balance
from hilbert.train.checkpoint import CheckpointInfo, load_model, save_checkpoint
from hilbert.train.config import TrainConfig

AUDIO_DIM, TEXT_DIM = 24, 10  # deliberately unequal, like 1024-wide speech vs 384-wide text
TASKS = {"diagnosis": 3, "severity": 2}


pytestmark = pytest.mark.usefixtures("seeded_single_thread")


def tiny_config(**overrides) -> HilbertModelConfig:
    base = dict(
        audio_dim=AUDIO_DIM, text_dim=TEXT_DIM, tasks=TASKS, d_model=16, d_embed=8, n_heads=2,
        n_cross_layers=2, pooling_heads=3, dropout=0.1, n_experts=3, expert_hidden=12,
    )
    return HilbertModelConfig(**{**base, **overrides})


def batch(n=4, segments=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([segments, 2, segments - 1, 1] * n)[:n]
    mask = torch.arange(segments)[None, :] < lengths[:, None]
    audio = torch.randn(n, segments, AUDIO_DIM, generator=g)
    text = torch.randn(n, segments, TEXT_DIM, generator=g)
    labels = {"diagnosis": torch.tensor([0, 2, -1, 1] * n)[:n], "severity": torch.tensor([1, 0, 1, -1] * n)[:n]}
    return audio, text, mask, labels


def all_outputs(output) -> dict[str, torch.Tensor]:
    tensors = {f"logits/{task}": value for task, value in output.logits.items()}
    for field in dataclasses.fields(output):
        value = getattr(output, field.name)
        if isinstance(value, torch.Tensor):
            tensors[field.name] = value
    return tensors


def test_output_shapes_and_pooling_weights_are_distributions_over_real_segments():
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    out = model(audio, text, mask)
    assert out.audio_embedding.shape == out.text_embedding.shape == out.joint_embedding.shape == (4, 8)
    assert out.audio_pooling.shape == out.text_pooling.shape == (4, 3, 6)
    assert out.joint_pooling.shape == (4, 3, 2, 6)  # [B, heads, (audio, text), S]
    assert {task: logits.shape for task, logits in out.logits.items()} == {"diagnosis": (4, 3), "severity": (4, 2)}
    for weights in (out.audio_pooling, out.text_pooling):
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3))
        assert weights.masked_select(~mask[:, None, :]).abs().max() == 0
    torch.testing.assert_close(out.joint_pooling.sum((-2, -1)), torch.ones(4, 3))
    assert out.joint_pooling.masked_select(~mask[:, None, None, :]).abs().max() == 0
    torch.testing.assert_close(joint_attention_share(out.joint_pooling).sum(), torch.tensor(1.0))


@pytest.mark.parametrize("changed, unchanged", [("text", "audio"), ("audio", "text")])
def test_each_modality_embedding_sees_only_its_own_modality_and_the_joint_sees_both(changed, unchanged):
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    inputs = {"audio": audio, "text": text}
    edited = dict(inputs)
    edited[changed] = inputs[changed].clone()
    edited[changed][0] = torch.randn_like(edited[changed][0])  # document 0's other modality only
    with torch.no_grad():
        before, after = model(inputs["audio"], inputs["text"], mask), model(edited["audio"], edited["text"], mask)
    assert torch.equal(getattr(after, f"{unchanged}_embedding"), getattr(before, f"{unchanged}_embedding"))
    assert torch.equal(getattr(after, f"{unchanged}_pooling"), getattr(before, f"{unchanged}_pooling"))
    for name in (f"{changed}_embedding", "joint_embedding"):
        assert (getattr(after, name)[0] - getattr(before, name)[0]).abs().max() > 1e-3, name
        torch.testing.assert_close(getattr(after, name)[1:], getattr(before, name)[1:])  # other documents


def test_shared_streams_pool_the_modality_embeddings_after_cross_attention():
    model = HilbertModel(tiny_config(streams="shared")).eval()
    assert len(model.self_encoders) == 0
    audio, text, mask, _ = batch()
    other_text = text.clone()
    other_text[0] = torch.randn_like(other_text[0])
    with torch.no_grad():
        before, after = model(audio, text, mask), model(audio, other_text, mask)
    assert (after.audio_embedding[0] - before.audio_embedding[0]).abs().max() > 1e-3  # audio has read the text


def test_checkpoint_saved_before_streams_existed_loads_as_the_shared_stream_model(tmp_path):
    config = tiny_config(streams="shared", dropout=0.0)
    model = HilbertModel(config).eval()
    folder = save_checkpoint(tmp_path / "old", model, CheckpointInfo(config, LabelMaps({"diagnosis": ("a", "b", "c"),
                                                                                        "severity": ("lo", "hi")})))
    saved = json.loads((folder / "checkpoint.json").read_text())
    for added in ("streams", "n_self_layers"):  # what a config written before these fields holds
        del saved["model"][added]
    (folder / "checkpoint.json").write_text(json.dumps(saved))
    loaded, info = load_model(folder)  # strict load_state_dict: the weights fit
    assert info.model.streams == "shared"
    audio, text, mask, _ = batch()
    with torch.no_grad():
        expected, out = model(audio, text, mask), loaded(audio, text, mask)
    for name in ("audio_embedding", "text_embedding", "joint_embedding"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), atol=0, rtol=0)
    # a checkpoint that names its streams keeps them
    separate = tiny_config()
    folder = save_checkpoint(tmp_path / "new", HilbertModel(separate), CheckpointInfo(separate, info.label_maps))
    assert load_model(folder)[1].model.streams == "separate"


def test_ablation_variants_select_the_shared_streams_and_turn_the_contrastive_term_off():
    base = TrainConfig()
    shared = base.variant("shared_streams").model_config(AUDIO_DIM, TEXT_DIM, TASKS)
    assert shared.streams == "shared" and base.model_config(AUDIO_DIM, TEXT_DIM, TASKS).streams == "separate"
    no_contrastive = base.variant("no_contrastive").loss
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, labels = batch()
    with torch.no_grad():
        total, parts = HilbertLoss(no_contrastive)(model(audio, text, mask), labels)
    expected = parts["task"] + 0.1 * parts["cka"] + 0.1 * parts["balance"] + 0.01 * parts["load_balance"]
    assert parts["contrastive"].item() > 0 and total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_moe_gate_probabilities_sum_to_one():
    torch.manual_seed(0)
    model = HilbertModel(tiny_config()).eval()
    out = model(*batch()[:3])
    assert out.gate_probs.shape == (4, 3)
    assert (out.gate_probs >= 0).all()
    torch.testing.assert_close(out.gate_probs.sum(-1), torch.ones(4))
    assert 0.0 < out.load_balance_loss.item() <= 3.0  # the Switch term: 1 when balanced, K when collapsed


def test_load_balance_terms_for_a_uniform_and_a_collapsed_gate():
    uniform = torch.full((8, 4), 0.25)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 1.0
    assert switch_load_balance(uniform).item() == pytest.approx(1.0)
    assert switch_load_balance(collapsed).item() == pytest.approx(4.0)
    assert importance_cv_squared(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert importance_cv_squared(collapsed).item() == pytest.approx(3.0)


def test_padded_segments_do_not_change_any_output():
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    extra = 7
    padded_audio = torch.cat([audio, 100 * torch.randn(4, extra, AUDIO_DIM)], dim=1)
    padded_text = torch.cat([text, torch.full((4, extra, TEXT_DIM), float("nan"))], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    # also scribble over the positions that were already padding
    padded_audio[~padded_mask] = 1e4
    with torch.no_grad():
        reference = all_outputs(model(audio, text, mask))
        padded = all_outputs(model(padded_audio, padded_text, padded_mask))
    for name, value in reference.items():
        other = padded[name]
        if name.endswith("pooling"):  # same weights on the real segments, 0 on the new padding
            assert other[..., 6:].abs().max() == 0
            other = other[..., :6]
        torch.testing.assert_close(other, value, atol=1e-5, rtol=1e-4, msg=name)


def test_a_document_gets_the_same_outputs_alone_and_in_a_batch():
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    with torch.no_grad():
        batched = model(audio, text, mask)
        alone = model(audio[1:2, :2], text[1:2, :2], mask[1:2, :2])  # document 1 has 2 segments
    torch.testing.assert_close(alone.joint_embedding, batched.joint_embedding[1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.logits["diagnosis"], batched.logits["diagnosis"][1:2], atol=1e-5, rtol=1e-4)


def test_gradient_reaches_every_parameter_through_the_full_objective():
    torch.manual_seed(0)
    model = HilbertModel(tiny_config()).train()
    objective = HilbertLoss(LossConfig())
    audio, text, mask, labels = batch(n=6)
    total, parts = objective(model(audio, text, mask), labels)
    total.backward()
    named = [*model.named_parameters(), *objective.named_parameters()]
    missing = [
        name for name, p in named if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert missing == []
    assert {"task", "contrastive", "cka", "balance", "load_balance"} <= set(parts)


@pytest.mark.parametrize(
    "model_overrides, loss_overrides",
    [
        ({}, {"alignment": "pairwise"}),
        ({"head": "linear"}, {}),
        ({"modality": "audio"}, {}),
        ({"modality": "text"}, {}),
        ({"n_cross_layers": 0, "moe_balance": "cv2"}, {"balance_estimator": "cka_gap", "unbiased_cka": False}),
        ({"streams": "shared"}, {}),
        ({"n_self_layers": 0, "n_cross_layers": 1}, {}),
        ({"modality": "audio", "streams": "shared"}, {}),
        ({}, {"lambda_contrastive": 0.0}),
    ],
    ids=["pairwise", "linear-head", "audio-only", "text-only", "no-cross-layers", "shared-streams", "no-self-layers",
         "audio-only-shared", "no-contrastive"],
)
def test_ablations_run_forward_and_backward(model_overrides, loss_overrides):
    torch.manual_seed(0)
    config = tiny_config(**model_overrides)
    model = HilbertModel(config).train()
    audio, text, mask, labels = batch()
    inputs = {
        "audio": audio if config.modality != "text" else None,
        "text": text if config.modality != "audio" else None,
    }
    out = model(inputs["audio"], inputs["text"], mask)
    total, parts = HilbertLoss(LossConfig(**loss_overrides))(out, labels)
    total.backward()
    assert torch.isfinite(total)
    assert out.joint_embedding.shape == (4, 8)
    if config.modality == "audio":
        assert out.text_embedding is None and out.audio_embedding.shape == (4, 8)
        assert out.joint_pooling.shape == (4, 3, 1, 6)
        assert "contrastive" not in parts
    if config.modality == "text":
        assert out.audio_embedding is None and out.text_embedding.shape == (4, 8)
    if config.head == "linear":
        assert out.gate_probs is None and out.load_balance_loss.item() == 0.0


def test_embed_gives_the_forward_embeddings():
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    with torch.no_grad():
        embeddings, out = model.embed(audio, text, mask), model(audio, text, mask)
    for name in ("audio_embedding", "text_embedding", "joint_embedding", "joint_pooling"):
        torch.testing.assert_close(getattr(embeddings, name), getattr(out, name))


def test_long_documents_run_without_a_segment_limit():
    model = HilbertModel(tiny_config(n_cross_layers=1)).eval()
    audio, text = torch.randn(2, 400, AUDIO_DIM), torch.randn(2, 400, TEXT_DIM)
    mask = torch.ones(2, 400, dtype=torch.bool)
    mask[1, 250:] = False
    with torch.no_grad():
        out = model(audio, text, mask)
    assert torch.isfinite(out.joint_embedding).all()


def test_model_and_objective_run_under_bfloat16_autocast():
    model = HilbertModel(tiny_config()).train()
    audio, text, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(audio, text, mask)
        total, _ = HilbertLoss(LossConfig())(out, labels)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_bad_inputs_are_rejected_with_a_message_that_says_what_to_fix():
    model = HilbertModel(tiny_config()).eval()
    audio, text, mask, _ = batch()
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"batch positions \[2\] have no segments"):
        model(audio, text, empty)
    with pytest.raises(ValueError, match="text features have shape"):
        model(audio, text[..., :5], mask)
    with pytest.raises(ValueError, match="needs text features"):
        model(audio, None, mask)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 15}, "d_model=15 must be divisible by n_heads"),
        ({"head": "tree"}, "HilbertModelConfig.head"),
        ({"modality": "video"}, "HilbertModelConfig.modality"),
        ({"tasks": {}}, "HilbertModelConfig.tasks"),
        ({"tasks": {"diagnosis": 1}}, r"HilbertModelConfig.tasks\['diagnosis'\]"),
        ({"n_experts": 0}, "HilbertModelConfig.n_experts"),
        ({"dropout": 1.5}, "HilbertModelConfig.dropout"),
        ({"streams": "mixed"}, "HilbertModelConfig.streams"),
        ({"n_self_layers": -1}, "HilbertModelConfig.n_self_layers"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)
