"""Selection by a fastText classifier (DCLM / FineWeb-Edu style): reference chunks against negatives,
P(reference) from a document's first MAX_WORDS words."""
from __future__ import annotations

import numpy as np

from tasks import fasttext_model as ft

METHOD = "fasttext"
TRAINS_OUT_OF_PROCESS = True   # each model in its own single-threaded process (tasks.fasttext_model)
HIGH, LOW = "hq", "lq"
# documents are scored (and negatives trained) on their first this-many words: fastText averages
# word vectors, so this bounds cost without changing what it sees much
MAX_WORDS = 1000


def train(positives: list[str], negatives: list[str], out_path, *, seed: int = 0, lr: float = 0.3,
          epoch: int = 10, dim: int = 16, word_ngrams: int = 2, bucket: int = 200_000, **_) -> dict:
    pairs = [(HIGH, t) for t in positives] + [(LOW, t) for t in negatives]
    info = ft.train_supervised(pairs, out_path, lr=lr, epoch=epoch, dim=dim, word_ngrams=word_ngrams,
                               bucket=bucket, seed=seed, max_words=MAX_WORDS)
    return {"method": METHOD, "n_pos": len(positives), "n_neg": len(negatives), **info}


def score(model_path, texts: list[str]) -> np.ndarray:
    """P(high quality) in [0, 1] per text."""
    return ft.prob_of(ft.load(model_path), texts, HIGH, max_words=MAX_WORDS)
