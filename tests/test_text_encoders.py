"""The ``hf:`` text encoders on every architecture family they accept, and sentence-transformers
folders: tiny randomly initialised models with their real tokenizer classes, saved to tmp folders,
whose vectors must equal what the model itself computes on the same tokens."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hilbert.features.encoders import EncoderSpecError, build_text_encoder, encoder_fingerprint  # noqa: E402

HIDDEN = 32
TINY_TRANSFORMER = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "s", "ed", ".", ",", *"abcdefghijklmnopqrstuvwxyz"]
TEXTS = ["the cat sat on the mat.", "", "dogs ran", "a dog sat on the cat , the mat ran", "unknown wörds"]


def unigram_vocabulary(specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-style vocabulary (T5, XLM-R, DeBERTa-v2): whole words, then word pieces."""
    return [(token, 0.0) for token in specials] + [("\u2581" + w, -1.0) for w in WORDS] + [(w, -2.0) for w in WORDS]


def byte_level_vocabulary(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges (RoBERTa, DeBERTa): one token per character."""
    pieces = [*specials, *"abcdefghijklmnopqrstuvwxyz.,", *("\u0120" + c for c in "abcdefghijklmnopqrstuvwxyz")]
    return {piece: index for index, piece in enumerate(pieces)}


def save_tiny_text_model(folder: Path, family: str, seed: int = 0) -> Path:
    """A randomly initialised 2-layer model of ``family`` and its tokenizer, saved to ``folder``.
    The T5 family is saved whole (``ForConditionalGeneration``, decoder included), as on the Hub."""
    import transformers as hf

    torch.manual_seed(seed)
    if family in ("t5", "mt5", "umt5"):
        tokenizer = hf.T5Tokenizer(vocab=unigram_vocabulary(["<pad>", "</s>", "<unk>"]), extra_ids=0)
        config_class, model_class = {"t5": (hf.T5Config, hf.T5ForConditionalGeneration),
                                     "mt5": (hf.MT5Config, hf.MT5ForConditionalGeneration),
                                     "umt5": (hf.UMT5Config, hf.UMT5ForConditionalGeneration)}[family]
        # Fewer encoder than decoder layers: layer counts must come from the encoder's num_layers.
        config = config_class(vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=2,
                              num_decoder_layers=3, num_heads=2, relative_attention_num_buckets=8,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = model_class(config)
    elif family in ("roberta", "xlm-roberta"):
        if family == "roberta":
            tokenizer = hf.RobertaTokenizer(vocab=byte_level_vocabulary(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]),
                                            merges=[])
        else:
            tokenizer = hf.XLMRobertaTokenizer(vocab=unigram_vocabulary(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
        config_class = hf.RobertaConfig if family == "roberta" else hf.XLMRobertaConfig
        # Positions start after padding_idx (1): 66 slots leave 64 usable positions.
        model = hf.AutoModel.from_config(config_class(vocab_size=len(tokenizer), max_position_embeddings=66,
                                                      pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                      type_vocab_size=1, **TINY_TRANSFORMER))
    elif family == "deberta":
        tokenizer = hf.DebertaTokenizer(vocab=byte_level_vocabulary(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
                                        merges=[])
        model = hf.DebertaModel(hf.DebertaConfig(vocab_size=len(tokenizer), max_position_embeddings=64,
                                                 pad_token_id=0, **TINY_TRANSFORMER))
    else:  # DeBERTa-v3 style: relative attention with position buckets, no absolute positions
        tokenizer = hf.DebertaV2Tokenizer(vocab=unigram_vocabulary(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        model = hf.DebertaV2Model(hf.DebertaV2Config(
            vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0, relative_attention=True,
            position_biased_input=False, position_buckets=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
            share_att_key=True, **TINY_TRANSFORMER))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed"]
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocabulary), max_position_embeddings=64, **TINY_TRANSFORMER)).save_pretrained(
        folder)
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_tiny_sentence_transformer(folder: Path, transformer: Path, *, pooling: object = "mean",
                                   normalize: bool = True, max_seq_length: int = 16, subfolder: str = "",
                                   extra_modules: tuple[dict, ...] = ()) -> Path:
    """A sentence-transformers folder around the checkpoint ``transformer``, written as
    ``SentenceTransformer.save`` does (legacy ``pooling_mode_*`` booleans unless ``pooling`` is a
    dict of Pooling config keys)."""
    shutil.copytree(transformer, folder / subfolder, dirs_exist_ok=True)
    modules = [{"idx": 0, "name": "0", "path": subfolder, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    modules.extend(extra_modules)
    (folder / "modules.json").write_text(json.dumps(modules))
    pooling_config = pooling if isinstance(pooling, dict) else {
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    (folder / subfolder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return folder


FAMILIES = ["t5", "mt5", "umt5", "roberta", "xlm-roberta", "deberta", "deberta-v2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-checkpoints")
    folders = {family: save_tiny_text_model(root / family, family) for family in FAMILIES}
    folders["bert"] = save_tiny_bert(root / "bert")
    return folders


def own_states(folder: Path, text: str) -> torch.Tensor:
    """``[tokens, dim]``: the model's own last hidden state on ``text`` alone (no padding), from
    transformers' classes only; for T5, the encoder of the whole encoder-decoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")
    if AutoConfig.from_pretrained(folder).model_type in ("t5", "mt5", "umt5"):
        model = AutoModelForSeq2SeqLM.from_pretrained(folder).get_encoder().eval()
        tokens.pop("token_type_ids", None)
    else:
        model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(**tokens).last_hidden_state[0]


# ---------------------------------------------------------------- each architecture family

@pytest.mark.parametrize("family", FAMILIES)
def test_text_vectors_are_the_mean_of_the_models_own_last_hidden_state(folders, family):
    encoder = build_text_encoder(f"hf:{folders[family]}?batch_size=3", device="cpu")
    vectors = encoder.encode(TEXTS)  # padded batches of different lengths
    assert vectors.shape == (len(TEXTS), HIDDEN) and encoder.dim == HIDDEN
    for text, vector in zip(TEXTS, vectors):
        np.testing.assert_allclose(vector, own_states(folders[family], text).mean(dim=0).numpy(), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_fingerprint_names_the_model_type_and_equals_the_built_encoders(folders, family):
    spec = f"hf:{folders[family]}?layer=avg"
    fingerprint = encoder_fingerprint("text", spec)
    assert fingerprint == build_text_encoder(spec, device="cpu").fingerprint()
    assert fingerprint["model_type"] == family and fingerprint["dim"] == HIDDEN


@pytest.mark.parametrize("family", ["t5", "mt5", "umt5"])
def test_t5_family_loads_only_the_encoder_of_a_whole_checkpoint(folders, family):
    import transformers as hf

    encoder = build_text_encoder(f"hf:{folders[family]}", device="cpu")
    assert type(encoder.model).__name__ == {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[family] + "EncoderModel"
    names = [name for name, _ in encoder.model.named_parameters()]
    assert names and not any(name.startswith(("decoder", "lm_head")) for name in names)
    whole = hf.AutoModelForSeq2SeqLM.from_pretrained(folders[family])
    assert any(name.startswith("decoder") for name, _ in whole.named_parameters())
    # Every encoder weight came from the checkpoint: none was missing and left randomly initialised.
    _, loading = type(encoder.model).from_pretrained(folders[family], output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"]
    for name, parameter in whole.get_encoder().named_parameters():
        torch.testing.assert_close(encoder.model.get_encoder().get_parameter(name), parameter)


def test_t5_layers_come_from_its_encoder_layer_count(folders):
    # 2 encoder layers and 3 decoder layers: 3 hidden states (embeddings + 2 layers).
    with pytest.raises(EncoderSpecError, match="layer=3 is out of range; this model has 3 hidden states"):
        build_text_encoder(f"hf:{folders['t5']}?layer=3", device="cpu")
    by_layer = [build_text_encoder(f"hf:{folders['t5']}?layer={layer}", device="cpu").encode(TEXTS)
                for layer in (0, 1, 2)]
    average = build_text_encoder(f"hf:{folders['t5']}?layer=avg", device="cpu").encode(TEXTS)
    np.testing.assert_allclose(average, np.mean(by_layer, axis=0), atol=1e-5)
    # The last hidden state is after T5's final layer norm, like last_hidden_state.
    np.testing.assert_allclose(by_layer[2], build_text_encoder(f"hf:{folders['t5']}", device="cpu").encode(TEXTS),
                               atol=1e-6)


def test_t5_max_length_is_its_tokenizers_limit_or_512(folders, tmp_path):
    from transformers import AutoTokenizer

    assert build_text_encoder(f"hf:{folders['t5']}", device="cpu").max_length == 512  # no limit recorded
    limited = shutil.copytree(folders["t5"], tmp_path / "t5-limited")
    AutoTokenizer.from_pretrained(limited, model_max_length=8).save_pretrained(limited)
    encoder = build_text_encoder(f"hf:{limited}", device="cpu")
    assert encoder.max_length == 8
    # 7 words + </s> per window: "the cat sat on the mat ." twice is 14 words, two windows of 8.
    text = "the cat sat on the mat . the cat sat on the mat ."
    halves = own_states(limited, "the cat sat on the mat ."), own_states(limited, "the cat sat on the mat .")
    np.testing.assert_allclose(encoder.encode([text])[0], torch.cat(halves).mean(dim=0).numpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_windows_fit_its_position_table(folders, family):
    encoder = build_text_encoder(f"hf:{folders[family]}", device="cpu")
    assert encoder.max_length == 64  # 66 positions, less padding_idx + 1
    long = " ".join(["the cat sat on the mat"] * 30)  # hundreds of tokens
    vector = encoder.encode([long])[0]
    assert np.isfinite(vector).all() and not np.allclose(vector, encoder.encode([long[:40]])[0])


def test_missing_text_model_is_a_spec_error_that_names_it():
    with pytest.raises(EncoderSpecError, match="cannot load a model config from 'nobody/no-such-model'"):
        build_text_encoder("hf:nobody/no-such-model", device="cpu")


# ---------------------------------------------------------------- sentence-transformers folders

def test_sentence_transformer_folder_follows_its_pooling_normalisation_and_length(folders, tmp_path):
    folder = save_tiny_sentence_transformer(tmp_path / "st", folders["bert"], max_seq_length=16)
    encoder = build_text_encoder(f"hf:{folder}", device="cpu")
    assert encoder.max_length == 16  # sentence_bert_config.json's, below the model's 64
    vectors = encoder.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    for text, vector in zip(TEXTS, vectors):
        mean = own_states(folders["bert"], text).mean(dim=0).numpy()
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)


def test_sentence_transformer_vectors_equal_the_sentence_transformers_library(folders, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = save_tiny_sentence_transformer(tmp_path / "st", folders["bert"], max_seq_length=16)
    expected = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(build_text_encoder(f"hf:{folder}", device="cpu").encode(TEXTS), expected, atol=1e-5)


def test_sentence_transformer_cls_pooling_takes_the_first_token(folders, tmp_path):
    folder = save_tiny_sentence_transformer(tmp_path / "st-cls", folders["bert"], pooling="cls", normalize=False)
    vectors = build_text_encoder(f"hf:{folder}?batch_size=2", device="cpu").encode(TEXTS)
    for text, vector in zip(TEXTS, vectors):
        np.testing.assert_allclose(vector, own_states(folders["bert"], text)[0].numpy(), atol=1e-5)


def test_sentence_transformer_new_style_pooling_mode_is_read(folders, tmp_path):
    folder = save_tiny_sentence_transformer(tmp_path / "st-new", folders["bert"], normalize=False,
                                            pooling={"embedding_dimension": HIDDEN, "pooling_mode": "cls"})
    assert encoder_fingerprint("text", f"hf:{folder}")["pooling"] == "cls"


def test_long_text_with_cls_pooling_is_the_token_weighted_mean_of_its_windows_first_tokens(folders, tmp_path):
    folder = save_tiny_sentence_transformer(tmp_path / "st-cls", folders["bert"], pooling="cls", normalize=False,
                                            max_seq_length=8)
    # 6 words + [CLS] + [SEP] fill a window of 8; the 2 words left make a window of 4.
    first, second = "the cat sat on the mat", "dog ran"
    expected = (8 * own_states(folders["bert"], first)[0] + 4 * own_states(folders["bert"], second)[0]) / 12
    vector = build_text_encoder(f"hf:{folder}", device="cpu").encode([f"{first} {second}"])[0]
    np.testing.assert_allclose(vector, expected.numpy(), atol=1e-5)


def test_long_text_in_a_normalising_folder_is_normalised_once_after_the_window_mean(folders, tmp_path):
    folder = save_tiny_sentence_transformer(tmp_path / "st", folders["bert"], max_seq_length=8)
    first, second = "the cat sat on the mat", "dog ran"
    states = torch.cat([own_states(folders["bert"], first), own_states(folders["bert"], second)])
    mean = states.mean(dim=0).numpy()
    vector = build_text_encoder(f"hf:{folder}", device="cpu").encode([f"{first} {second}"])[0]
    np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)


def test_sentence_transformer_with_its_transformer_in_a_subfolder(folders, tmp_path):
    root = save_tiny_sentence_transformer(tmp_path / "st-root", folders["bert"])
    nested = save_tiny_sentence_transformer(tmp_path / "st-nested", folders["bert"], subfolder="0_Transformer")
    assert not (nested / "config.json").exists()
    np.testing.assert_allclose(build_text_encoder(f"hf:{nested}", device="cpu").encode(TEXTS),
                               build_text_encoder(f"hf:{root}", device="cpu").encode(TEXTS), atol=1e-6)
    nested_fingerprint, root_fingerprint = (encoder_fingerprint("text", f"hf:{folder}") for folder in (nested, root))
    assert {key for key in root_fingerprint if nested_fingerprint[key] != root_fingerprint[key]} <= {"weights"}


def test_pooling_and_normalisation_enter_the_fingerprint(folders, tmp_path):
    def fingerprint(name: str, **recipe) -> dict:
        folder = save_tiny_sentence_transformer(tmp_path / name, folders["bert"], **recipe)
        return encoder_fingerprint("text", f"hf:{folder}")

    mean, cls = fingerprint("mean", normalize=False), fingerprint("cls", pooling="cls", normalize=False)
    # The folders differ only in 1_Pooling/config.json, so only the recipe tells them apart.
    assert mean["weights"] == cls["weights"]
    assert {key for key in mean if mean[key] != cls[key]} == {"pooling"}
    assert (mean["pooling"], cls["pooling"], mean["normalize"]) == ("mean", "cls", False)
    assert fingerprint("normalised")["normalize"] is True
    assert encoder_fingerprint("text", f"hf:{folders['bert']}")["pooling"] == "mean"  # a plain checkpoint
    assert mean["max_length"] == 16 and encoder_fingerprint("text", f"hf:{folders['bert']}")["max_length"] == 64


@pytest.mark.parametrize("pooling, named", [("max", "max"), ({"pooling_mode": ["mean", "cls"]}, "mean \\+ cls"),
                                            ({"pooling_mode": "lasttoken"}, "lasttoken")])
def test_unsupported_pooling_is_refused_with_what_is_supported(folders, tmp_path, pooling, named):
    folder = save_tiny_sentence_transformer(tmp_path / "st", folders["bert"], pooling=pooling)
    with pytest.raises(EncoderSpecError, match=rf"asks for pooling {named}; hf: supports one of mean, cls"):
        build_text_encoder(f"hf:{folder}", device="cpu")


def test_sentence_transformer_module_hf_cannot_apply_is_refused(folders, tmp_path):
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    folder = save_tiny_sentence_transformer(tmp_path / "st", folders["bert"], extra_modules=(dense,))
    with pytest.raises(EncoderSpecError, match="lists a 'sentence_transformers.models.Dense' module"):
        encoder_fingerprint("text", f"hf:{folder}")


def test_a_checkpoint_lacking_weights_its_hidden_states_need_is_refused_naming_them(tmp_path):
    """transformers fills missing weights with random numbers and only warns; the vectors would
    then be noise. A BERT saved from its masked-LM model (no pooler, which no hidden state goes
    through) loads; the same checkpoint without one attention weight is refused."""
    import transformers as hf
    from safetensors.torch import load_file, save_file

    folder = save_tiny_bert(tmp_path / "bert")
    hf.BertForMaskedLM(hf.BertConfig.from_pretrained(folder)).save_pretrained(folder)  # a pretraining head, no pooler
    assert build_text_encoder(f"hf:{folder}", device="cpu").encode(["the cat"]).shape == (1, HIDDEN)
    weights = load_file(str(folder / "model.safetensors"))
    dropped = next(key for key in weights if key.endswith("layer.1.attention.self.query.weight"))
    save_file({key: value for key, value in weights.items() if key != dropped}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(EncoderSpecError, match=r"lacks 1 and has 0 mis-shaped weight\(s\).*layer\.1\.attention\.self"
                                               r"\.query\.weight.*random features"):
        build_text_encoder(f"hf:{folder}", device="cpu")


def test_precision_bfloat16_agrees_with_float32_and_keeps_the_cache_key(folders):
    exact = build_text_encoder(f"hf:{folders['roberta']}", device="cpu")
    assert exact.precision == "auto"
    coarse = build_text_encoder(f"hf:{folders['roberta']}?precision=bfloat16", device="cpu")
    assert coarse.fingerprint() == exact.fingerprint()  # float kinds share features across devices
    expected, got = exact.encode(TEXTS), coarse.encode(TEXTS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert not np.array_equal(got, expected)  # the autocast did run in bfloat16
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("spec, named", [("roberta?precision=float16", "needs a CUDA device"),
                                         ("roberta?precision=half", "expected one of auto, float32"),
                                         ("t5?precision=float16", "overflows T5")])
def test_a_precision_the_device_or_model_cannot_run_is_a_spec_error(folders, spec, named):
    family, options = spec.split("?")
    device = "cuda" if family == "t5" else "cpu"  # T5 is refused before anything runs on the device
    with pytest.raises(EncoderSpecError, match=named) as refused:
        build_text_encoder(f"hf:{folders[family]}?{options}", device=device)
    assert str(folders[family]) in str(refused.value)
