"""``hashngram``: signed feature hashing of word and character n-grams, a weight-free text baseline.

Text is NFKC-normalised and case-folded; words are runs of Unicode word characters. Features are
word unigrams and bigrams and the character 3-, 4- and 5-grams of each space-padded word. Each
distinct feature contributes ``±(1 + log tf)`` to the bucket its hash picks (the sign comes from
the same hash, so collisions cancel on average instead of piling up), and the vector is L2
normalised. Text without any word gives the zero vector.

There is deliberately no IDF or any other corpus-fitted weighting: a segment's vector depends on
its text alone, so it can be cached by content and reproduced exactly on a new corpus; the
model's learned projection does the re-weighting. For the same reason the hash is BLAKE2b, not
Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from typing import Sequence

import numpy as np

from hilbert.features.encoders.base import TextEncoder, as_text
from hilbert.features.encoders.registry import register_text_encoder
from hilbert.features.encoders.spec import EncoderSpec, Option, integer_between, read_options, reject_name

_WORD = re.compile(r"\w+")
CHARACTER_NGRAM_SIZES = (3, 4, 5)
DEFAULT_DIM = 4096


@register_text_encoder("hashngram")
class HashedNgramEncoder(TextEncoder):
    """Hashed word 1-2-grams and character 3-5-grams, sublinear tf, L2 normalised."""

    CODE_VERSION = 1
    OPTIONS = {"dim": Option(integer_between(2, 2**24), DEFAULT_DIM)}

    def __init__(self, dim: int = DEFAULT_DIM, spec: str | None = None):
        self.dim = dim
        self.spec = spec or (f"hashngram?dim={dim}" if dim != DEFAULT_DIM else "hashngram")

    @classmethod
    def from_spec(cls, spec: EncoderSpec, device: str) -> "HashedNgramEncoder":
        reject_name(spec)
        return cls(**read_options(spec, cls.OPTIONS), spec=str(spec))

    def fingerprint(self) -> dict:
        return {"encoder": "hashngram", "code_version": self.CODE_VERSION, "dim": self.dim,
                "hash": "blake2b-64", "word_ngrams": [1, 2], "character_ngrams": list(CHARACTER_NGRAM_SIZES),
                "normalisation": "NFKC+casefold", "tf": "1+log", "norm": "l2"}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            self._add_features(vectors[row], as_text(text, row))
        return vectors

    def _add_features(self, vector: np.ndarray, text: str) -> None:
        counts = ngram_counts(text)
        if not counts:
            return
        hashes = np.fromiter(map(feature_hash, counts), dtype=np.uint64, count=len(counts))
        buckets = ((hashes >> np.uint64(1)) % np.uint64(self.dim)).astype(np.int64)
        signs = np.where(hashes & np.uint64(1), 1.0, -1.0)
        weights = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
        vector[:] = np.bincount(buckets, weights=signs * weights, minlength=self.dim)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)


def ngram_counts(text: str) -> Counter[str]:
    """Counts of the prefixed features of ``text``; the prefixes keep a word and an equal
    character n-gram (``"cat"``) from being the same feature."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    features = [f"w {word}" for word in words]
    features += [f"b {first} {second}" for first, second in zip(words, words[1:])]
    for word in words:
        padded = f" {word} "
        for size in CHARACTER_NGRAM_SIZES:
            features += [f"c {padded[i:i + size]}" for i in range(len(padded) - size + 1)]
    return Counter(features)


def feature_hash(feature: str) -> int:
    """A 64-bit hash of ``feature``, the same in every process and on every machine: its low
    bit is the sign, the rest picks the bucket."""
    return int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
