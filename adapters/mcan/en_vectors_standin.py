"""A stand-in for spaCy 2's ``en_vectors_web_lg`` (the GloVe vectors MCAN loads), for tests and generated data.

MCAN's ``core/data/data_utils.py`` does ``import en_vectors_web_lg`` and ``en_vectors_web_lg.load()``,
then takes ``nlp(word).vector`` (300 floats) for every question word.  That package needs spaCy 2.x
and a 600 MB download; the Docker image installs the real one.  Where it is absent, the runner
registers this module under that name for the duration of a run (``compat.word_vectors``): every
text gets a deterministic pseudo-random 300-d vector (seeded by a hash of the text; a text of several
words gets the mean of its words', as spaCy's ``Doc.vector`` is).  These are **not GloVe vectors**:
runs that use them say so, and ``deqfusion reproduce mcan`` refuses them on real data unless asked.
"""
from __future__ import annotations

import hashlib

import numpy as np

WIDTH = 300
IS_STANDIN = True


class _Doc:
    __slots__ = ("text", "vector")

    def __init__(self, text: str, vector: np.ndarray):
        self.text = text
        self.vector = vector


def word_vector(word: str, width: int = WIDTH) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    return (0.4 * np.random.RandomState(seed % (2 ** 32)).randn(width)).astype(np.float32)


class Vectors:
    """``nlp(text).vector`` as spaCy gives it, from hashed vectors."""

    is_standin = True

    def __call__(self, text: str) -> _Doc:
        words = text.split()
        if not words:
            return _Doc(text, np.zeros(WIDTH, np.float32))
        return _Doc(text, np.mean([word_vector(w) for w in words], axis=0).astype(np.float32))


def load(**_overrides) -> Vectors:
    """What ``en_vectors_web_lg.load()`` returns, for MCAN's use of it."""
    return Vectors()
