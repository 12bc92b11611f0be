"""``layer=all`` and the learned weighting over layers: every hidden state's pooled vector per
segment from tiny ``hf:`` models, refused where an encoder has no layers, and the model's
softmax-weighted sum over them (the SUPERB / s3prl ``Featurizer``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hilbert.config import to_dict  # noqa: E402
from hilbert.features.batches import LabelMaps, layered_inputs  # noqa: E402
from hilbert.features.cache import FeatureCache, FeatureSet  # noqa: E402
from hilbert.features.encoders import (  # noqa: E402
    EncoderSpecError,
    build_audio_encoder,
    build_text_encoder,
    encoder_fingerprint,
)
from hilbert.model import HilbertModel, HilbertModelConfig  # noqa: E402
from hilbert.model.attention import SegmentProjection  # noqa: E402
from hilbert.model.layer_weighting import LayerWeighting  # noqa: E402
from hilbert.sweep.diagnostics import trial_figures  # noqa: E402
from hilbert.train.checkpoint import CheckpointInfo, load_model, save_checkpoint  # noqa: E402
from hilbert.train.config import TrainConfig  # noqa: E402
from hilbert.train.loop import WorkerContext, parameter_groups, train_folds  # noqa: E402
from hilbert.train.out_of_fold import out_of_fold_outputs  # noqa: E402
from hilbert.train.run import CrossValidationResult  # noqa: E402
from conftest import document, write_manifest, write_tone  # noqa: E402
from hilbert.data.manifest import load_manifest  # noqa: E402
from hilbert.features.extract import extract_features  # noqa: E402
from hilbert.features.timing import AUDIO_COLUMNS, TEXT_COLUMNS  # noqa: E402
from test_encoders import HIDDEN, noise, save_tiny_bert, save_tiny_speech_model, save_tiny_whisper, tone  # noqa: E402
from test_text_encoders import TEXTS, save_tiny_sentence_transformer, save_tiny_text_model  # noqa: E402
from test_training import Recorder, simple_folds  # noqa: E402

HIDDEN_STATES = 3  # the tiny models' 2 layers and their embeddings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered-checkpoints")
    folders = {"wav2vec2": save_tiny_speech_model(root / "wav2vec2", "wav2vec2"),
               "whisper": save_tiny_whisper(root / "whisper"),
               "bert": save_tiny_bert(root / "bert"),
               "t5": save_tiny_text_model(root / "t5", "t5")}
    folders["sentence"] = save_tiny_sentence_transformer(root / "sentence", folders["bert"], normalize=True)
    return folders


def per_layer(build, spec: str, inputs) -> np.ndarray:
    """``[segments, layers, dim]`` from ``layer=<i>`` for every i."""
    return np.stack([build(f"{spec}?layer={i}", device="cpu").encode(inputs) for i in range(HIDDEN_STATES)], axis=1)


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("name", ["wav2vec2", "whisper"])
def test_speech_layer_all_holds_every_layers_pooled_vector(checkpoints, name):
    segments = [tone(220, 0.6), noise(0.8), tone(300, 0.05)]
    encoder = build_audio_encoder(f"hf:{checkpoints[name]}?layer=all", device="cpu")
    vectors = encoder.encode(segments)
    assert encoder.layers == HIDDEN_STATES and encoder.dim == HIDDEN_STATES * HIDDEN
    assert vectors.shape == (3, HIDDEN_STATES * HIDDEN) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors.reshape(3, HIDDEN_STATES, HIDDEN),
                               per_layer(build_audio_encoder, f"hf:{checkpoints[name]}", segments), atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "t5", "sentence"])
def test_text_layer_all_holds_every_layers_pooled_vector(checkpoints, name):
    encoder = build_text_encoder(f"hf:{checkpoints[name]}?layer=all", device="cpu")
    vectors = encoder.encode(TEXTS)
    assert encoder.layers == HIDDEN_STATES and vectors.shape == (len(TEXTS), HIDDEN_STATES * HIDDEN)
    layered = vectors.reshape(len(TEXTS), HIDDEN_STATES, HIDDEN)
    np.testing.assert_allclose(layered, per_layer(build_text_encoder, f"hf:{checkpoints[name]}", TEXTS), atol=1e-5)
    if name == "sentence":  # a normalising folder normalises each layer on its own
        np.testing.assert_allclose(np.linalg.norm(layered, axis=2), 1.0, atol=1e-5)


def test_layer_all_enters_the_fingerprint_and_other_layers_keep_theirs(checkpoints):
    spec = f"hf:{checkpoints['bert']}"
    every = encoder_fingerprint("text", f"{spec}?layer=all")
    assert every["layer"] == "all" and every["layers"] == HIDDEN_STATES
    assert every != encoder_fingerprint("text", f"{spec}?layer=avg")
    assert "layers" not in encoder_fingerprint("text", spec)
    assert "layers" not in encoder_fingerprint("text", f"{spec}?layer=1")
    audio = encoder_fingerprint("audio", f"hf:{checkpoints['wav2vec2']}?layer=all")
    assert audio["layers"] == HIDDEN_STATES
    # what training derives the model's layer fields from
    feature_set = FeatureSet("m", "sha", "a", "t", audio, encoder_fingerprint("text", spec), HIDDEN_STATES * HIDDEN,
                             HIDDEN)
    assert layered_inputs(feature_set) == {"audio_layers": HIDDEN_STATES, "audio_layer_dim": HIDDEN}


@pytest.mark.parametrize("modality, spec, says", [
    ("audio", "logmel?layer=all", "kind 'logmel' has no layers"),
    ("text", "hashngram?layer=all", "kind 'hashngram' has no layers"),
])
def test_layer_all_is_refused_by_encoders_without_layers(modality, spec, says):
    with pytest.raises(EncoderSpecError, match=says):
        encoder_fingerprint(modality, spec)


def test_layer_all_is_refused_by_ct2_which_returns_only_the_last_output(tmp_path):
    pytest.importorskip("ctranslate2")
    with pytest.raises(EncoderSpecError, match="ct2: cannot give layer=all: CTranslate2.*only the encoder's final"):
        encoder_fingerprint("audio", f"ct2:{tmp_path}?layer=all")


# ---------------------------------------------------------------- the learned weighting


LAYERS, LAYER_DIM, TIMING = 4, 6, 2  # audio: 4 layers of 6 then 2 timing columns; text: 3 layers of 5
AUDIO_DIM, TEXT_DIM = LAYERS * LAYER_DIM + TIMING, 3 * 5


def layered_config(**overrides) -> HilbertModelConfig:
    base = dict(audio_dim=AUDIO_DIM, text_dim=TEXT_DIM, tasks={"diagnosis": 2}, d_model=16, d_embed=8, n_heads=2,
                n_cross_layers=1, pooling_heads=2, dropout=0.0, n_experts=2, expert_hidden=8,
                audio_layers=LAYERS, audio_layer_dim=LAYER_DIM, text_layers=3, text_layer_dim=5)
    return HilbertModelConfig(**{**base, **overrides})


def layered_batch(n=3, segments=5):
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(segments)[None, :] < torch.tensor([segments, 2, 4])[:n, None]
    return (torch.randn(n, segments, AUDIO_DIM, generator=generator),
            torch.randn(n, segments, TEXT_DIM, generator=generator), mask)


def test_layer_weights_start_as_the_plain_average_and_sum_to_one():
    weighting = LayerWeighting(LAYERS)
    states = torch.randn(2, 7, LAYERS, LAYER_DIM)
    torch.testing.assert_close(weighting(states), states.mean(dim=2))
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([3.0, -1.0, 0.5, 0.0]))
    weights = weighting.weights()
    assert (weights > 0).all() and float(weights.sum().detach()) == pytest.approx(1.0)
    torch.testing.assert_close(weighting(states), torch.einsum("bsld,l->bsd", states, weights))


def test_untrained_layered_projection_reads_the_average_of_its_standardised_layers_and_timing_unweighted():
    torch.manual_seed(0)
    layered = SegmentProjection(AUDIO_DIM, 16, 0.0, LAYERS, LAYER_DIM)
    plain = SegmentProjection(LAYER_DIM + TIMING, 16, 0.0)
    plain.load_state_dict({k: v for k, v in layered.state_dict().items() if not k.startswith("feature_")
                           and not k.startswith("layer_weighting")}, strict=False)
    mean, std = torch.randn(AUDIO_DIM), torch.rand(AUDIO_DIM) + 0.5
    layered.set_feature_statistics(mean, std)
    features = torch.randn(3, 5, AUDIO_DIM)
    standardised = (features - mean) / std
    averaged = torch.cat([standardised[..., :LAYERS * LAYER_DIM].unflatten(-1, (LAYERS, LAYER_DIM)).mean(dim=-2),
                          standardised[..., LAYERS * LAYER_DIM:]], dim=-1)  # timing columns pass through
    torch.testing.assert_close(layered(features), plain(averaged), atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_layer_weights_of_both_modalities():
    model = HilbertModel(layered_config())
    audio, text, mask = layered_batch()
    model(audio, text, mask).logits["diagnosis"].sum().backward()
    weights = model.layer_weights()
    assert set(weights) == {"audio", "text"} and weights["audio"].shape == (LAYERS,) and weights["text"].shape == (3,)
    for modality in ("audio", "text"):
        gradient = model.projections[modality].layer_weighting.logits.grad
        assert gradient is not None and gradient.abs().sum() > 0
        assert float(weights[modality].sum()) == pytest.approx(1.0)


def test_one_layer_models_have_no_layer_weights_and_their_old_checkpoints_load_unchanged(tmp_path):
    config = layered_config(audio_dim=LAYER_DIM, text_dim=5, audio_layers=1, audio_layer_dim=None, text_layers=1,
                            text_layer_dim=None)
    model = HilbertModel(config).eval()
    assert model.layer_weights() == {} and not any("layer_weighting" in name for name in model.state_dict())
    folder = save_checkpoint(tmp_path / "old", model, CheckpointInfo(config, LabelMaps({"diagnosis": ("a", "b")})))
    saved = json.loads((folder / "checkpoint.json").read_text())
    for added in ("audio_layers", "audio_layer_dim", "text_layers", "text_layer_dim"):
        del saved["model"][added]  # a config written before layer=all existed
    (folder / "checkpoint.json").write_text(json.dumps(saved))
    loaded, info = load_model(folder)  # strict load_state_dict: the weights fit
    assert info.model.audio_layers == 1 and info.model.text_layer_dim is None
    audio, text, mask = torch.randn(2, 3, LAYER_DIM), torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(loaded(audio, text, mask).logits["diagnosis"],
                                   model(audio, text, mask).logits["diagnosis"], atol=0, rtol=0)


def test_layered_checkpoint_round_trips_its_layer_weights(tmp_path):
    model = HilbertModel(layered_config()).eval()
    with torch.no_grad():
        model.projections["audio"].layer_weighting.logits.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
    folder = save_checkpoint(tmp_path / "layered", model,
                             CheckpointInfo(model.config, LabelMaps({"diagnosis": ("a", "b")})))
    loaded, info = load_model(folder)
    assert (info.model.audio_layers, info.model.audio_layer_dim) == (LAYERS, LAYER_DIM)
    torch.testing.assert_close(loaded.layer_weights()["audio"], model.layer_weights()["audio"], atol=0, rtol=0)


@pytest.mark.parametrize("overrides, says", [
    ({"audio_layers": 0}, "audio_layers must be a positive integer"),
    ({"audio_layer_dim": None}, "audio_layer_dim=None must be a positive integer"),
    ({"text_layer_dim": 6}, r"3 x 6 vs 15"),
])
def test_layer_config_errors_name_the_field(overrides, says):
    with pytest.raises(ValueError, match=says):
        layered_config(**overrides)


# ---------------------------------------------------------------- training on layered features


CORPUS_LAYERS, CORPUS_LAYER_DIM, CORPUS_TEXT_DIM, INFORMATIVE = 3, 4, 5, 2


def layered_plan(tmp_path, documents: int = 32, epochs: int = 20) -> dict:
    """A cached corpus of layer=all audio features (3 layers of 4) where only layer 2 carries the
    label 'loud'; the text is one noise vector per segment."""
    rng = np.random.default_rng(0)
    cache = FeatureCache(tmp_path / "cache")
    loud = rng.integers(0, 2, documents)
    entries, labels = {}, {}
    for i in range(documents):
        segments = int(rng.integers(3, 7))
        audio = rng.normal(size=(segments, CORPUS_LAYERS, CORPUS_LAYER_DIM)).astype(np.float32)
        audio[:, INFORMATIVE, 0] += 2.0 * loud[i]
        doc_id = f"d{i:03d}"
        cache.put("audio", f"a{i:063d}", audio.reshape(segments, -1), doc_id=doc_id, encoder="synthetic")
        cache.put("text", f"t{i:063d}", rng.normal(size=(segments, CORPUS_TEXT_DIM)).astype(np.float32),
                  doc_id=doc_id, encoder="synthetic")
        entries[doc_id] = {"audio": f"a{i:063d}", "text": f"t{i:063d}", "segments": segments}
        labels[doc_id] = {"loud": int(loud[i])}
    audio_fingerprint = {"encoder": "synthetic", "layer": "all", "layers": CORPUS_LAYERS, "dim": CORPUS_LAYER_DIM}
    feature_set = FeatureSet("synthetic", "sha", "synthetic?layer=all", "synthetic", audio_fingerprint, {},
                             CORPUS_LAYERS * CORPUS_LAYER_DIM, CORPUS_TEXT_DIM, entries)
    config = TrainConfig(model={"d_model": 16, "d_embed": 16, "n_heads": 2, "pooling_heads": 2, "n_experts": 2,
                                "expert_hidden": 16, "n_cross_layers": 1, "dropout": 0.0})
    config.optimization.epochs = epochs
    config.optimization.batch_size = 4
    config.optimization.learning_rate = 3e-2
    config.optimization.early_stopping = False
    config.loss.lambda_contrastive = config.loss.lambda_cka = config.loss.lambda_balance = 0.0  # the task alone
    return {"config": to_dict(config), "variant": "hilbert", "cache_dir": str(cache.root),
            "feature_set": to_dict(feature_set), "label_maps": {"loud": ["quiet", "loud"]}, "labels": labels,
            "folds": simple_folds(list(entries), 2)}


def test_training_on_layered_features_moves_the_layer_weights_and_draws_them(tmp_path):
    recorder = Recorder(tmp_path / "reports")
    plan = layered_plan(tmp_path)
    train_folds(plan, WorkerContext(report=recorder))
    names = [f"layer_weight/audio/{layer}" for layer in range(CORPUS_LAYERS)]
    assert not any(name.startswith("layer_weight/text") for name in recorder.metrics[-1])  # one text layer
    last = np.array([recorder.metrics[-1][name] for name in names])
    assert last.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.abs(last - 1 / CORPUS_LAYERS).max() > 1e-3  # they moved from the plain average
    assert last.argmax() == INFORMATIVE  # towards the layer that carries the label
    models = tmp_path / "models"
    for fold in (0, 1):  # the fold models, as collect_fold_models lays them out
        shutil.copytree(recorder.checkpoints[-1] / f"fold_{fold}", models / f"fold_{fold}")
    outputs = out_of_fold_outputs(models, plan)
    assert outputs.layer_weights["audio"].shape == (2, CORPUS_LAYERS) and "text" not in outputs.layer_weights
    np.testing.assert_allclose(outputs.layer_weights["audio"].mean(axis=0), last, atol=1e-6)
    figure = trial_figures(outputs)["layer_weights"]
    assert [ax.get_title() for ax in figure.axes] == ["audio layer weights (2 fold models)"]


def test_layer_weight_learning_rate_gives_the_logits_their_own_group_and_moves_them_further(tmp_path):
    """The logits' own rate: the optimizer holds every parameter once, the logits in a group of
    their own (that rate, no decay); in the same short run they move further from the plain
    average than at the model's rate, towards the layer that carries the label."""
    config = TrainConfig()
    config.optimization.layer_weight_learning_rate = 0.5
    model = HilbertModel(HilbertModelConfig(audio_dim=CORPUS_LAYERS * CORPUS_LAYER_DIM, text_dim=CORPUS_TEXT_DIM,
                                            tasks={"loud": 2}, d_model=16, d_embed=16, n_heads=2,
                                            audio_layers=CORPUS_LAYERS, audio_layer_dim=CORPUS_LAYER_DIM))
    loss = torch.nn.Linear(2, 2)  # any module with parameters of its own
    groups = parameter_groups(model, loss, config.optimization)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in [*model.parameters(), *loss.parameters()])
    assert groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in groups[1]["params"]] == [(CORPUS_LAYERS,)]
    config.optimization.layer_weight_learning_rate = None
    assert len(parameter_groups(model, loss, config.optimization)) == 1

    moved = {}
    for rate in (None, 0.5):
        plan = layered_plan(tmp_path / str(rate), epochs=4)
        plan["config"]["optimization"].update(learning_rate=3e-3, layer_weight_learning_rate=rate)
        recorder = Recorder(tmp_path / str(rate) / "reports")
        train_folds(plan, WorkerContext(report=recorder))
        weights = np.array([recorder.metrics[-1][f"layer_weight/audio/{layer}"] for layer in range(CORPUS_LAYERS)])
        moved[rate] = np.abs(weights - 1 / CORPUS_LAYERS).max()
        if rate:
            assert weights.argmax() == INFORMATIVE
    assert moved[0.5] > 3 * moved[None]


def test_results_json_records_layer_weights_only_for_layered_runs():
    result = CrossValidationResult(tasks=["loud"], folds=2)
    assert "layer_weights" not in result.to_json()  # what every run without layer=all writes, as before
    result.layer_weights["hilbert"] = {"audio": [[0.2, 0.3, 0.5], [0.25, 0.25, 0.5]]}
    assert json.loads(json.dumps(result.to_json()))["layer_weights"] == result.layer_weights


def test_extracted_layer_all_features_with_timing_train_end_to_end(checkpoints, tmp_path):
    """Extraction of a corpus with layer=all on both sides, then in-process training with the
    segment timing columns appended after each modality's layers."""
    records = []
    for i in range(12):
        write_tone(tmp_path / "audio" / f"d{i}.wav", seconds=1.6, frequency=150 + 40 * i)
        records.append(document(f"d{i:02d}", f"audio/d{i}.wav", [(0.0, 0.7, "the cat sat"), (0.9, 1.5, "dogs ran")],
                                labels={"loud": "ab"[i % 2]}))
    manifest = load_manifest(write_manifest(tmp_path, records))
    audio_spec, text_spec = f"hf:{checkpoints['wav2vec2']}?layer=all", f"hf:{checkpoints['bert']}?layer=all"
    feature_set = extract_features(manifest, audio_spec, text_spec, tmp_path / "cache", progress=False,
                                   in_process=True).feature_set
    assert (feature_set.audio_dim, feature_set.text_dim) == (HIDDEN_STATES * HIDDEN, HIDDEN_STATES * HIDDEN)
    assert feature_set.timing is not None
    config = TrainConfig(model={"d_model": 16, "d_embed": 16, "n_heads": 2, "pooling_heads": 1, "n_experts": 2,
                                "expert_hidden": 16, "n_cross_layers": 1, "dropout": 0.0})
    config.optimization.epochs, config.optimization.batch_size, config.optimization.early_stopping = 2, 4, False
    plan = {"config": to_dict(config), "variant": "hilbert", "cache_dir": str(tmp_path / "cache"),
            "feature_set": to_dict(feature_set), "label_maps": {"loud": ["a", "b"]},
            "labels": {doc.doc_id: {"loud": "ab".index(doc.labels["loud"])} for doc in manifest},
            "folds": simple_folds([doc.doc_id for doc in manifest], 2)}
    recorder = Recorder(tmp_path / "reports")
    train_folds(plan, WorkerContext(report=recorder))
    model, _ = load_model(recorder.checkpoints[-1] / "fold_0")
    layered = dict(audio_layers=HIDDEN_STATES, audio_layer_dim=HIDDEN, text_layers=HIDDEN_STATES, text_layer_dim=HIDDEN)
    assert {name: getattr(model.config, name) for name in layered} == layered
    assert model.config.audio_dim == HIDDEN_STATES * HIDDEN + len(AUDIO_COLUMNS)  # timing after the layers
    assert model.config.text_dim == HIDDEN_STATES * HIDDEN + len(TEXT_COLUMNS)
    assert model.projections["audio"].linear.in_features == HIDDEN + len(AUDIO_COLUMNS)
    for modality in ("audio", "text"):
        weights = [recorder.metrics[-1][f"layer_weight/{modality}/{layer}"] for layer in range(HIDDEN_STATES)]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
