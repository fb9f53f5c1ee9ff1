"""Selection by DSIR importance weights (Xie et al. 2023, "Data Selection for Language Models via
Importance Resampling"): bag-of-hashed-n-gram models of the reference and of the raw crawl; a
document's weight is log p_ref(x) - log p_raw(x). As in the paper, unigrams and bigrams hashed into
a fixed number of buckets, add-one smoothed. Unlike the paper the weight is averaged per n-gram, not
summed, so a long page is not ranked first for being long (we rank, the paper resamples)."""
from __future__ import annotations

import time

import numpy as np

from tasks.select_io import load_model, save_model
from tasks.select_tfidf import features

METHOD = "dsir"
BUCKETS = 1 << 16   # the paper uses 10k; more buckets collide less at a few hundred kB


def _counts(texts: list[str]) -> np.ndarray:
    c = np.zeros(BUCKETS)
    for t in texts:
        np.add.at(c, np.asarray(features(t, BUCKETS), dtype=np.int64), 1.0)
    return c


def train(positives: list[str], negatives: list[str], out_path, *, seed: int = 0, alpha: float = 1.0,
          **_) -> dict:
    """positives: the reference; negatives: the raw distribution (the crawl sample, or a background)."""
    t0 = time.perf_counter()
    if not positives or not negatives:
        raise ValueError("dsir selection needs reference and raw texts")
    cp, cn = _counts(positives), _counts(negatives)
    log_ratio = (np.log((cp + alpha) / (cp.sum() + alpha * BUCKETS))
                 - np.log((cn + alpha) / (cn.sum() + alpha * BUCKETS)))
    nbytes = save_model(out_path, METHOD, log_ratio=log_ratio.astype(np.float32))
    return {"method": METHOD, "n_pos": len(positives), "n_neg": len(negatives), "model_bytes": nbytes,
            "train_seconds": round(time.perf_counter() - t0, 3)}


def score(model_path, texts: list[str]) -> np.ndarray:
    """Mean log importance weight per hashed n-gram (0 for a text with no words)."""
    w = load_model(model_path, METHOD)["log_ratio"].astype(np.float64)
    out = np.zeros(len(texts))
    for i, t in enumerate(texts):
        if f := features(t, BUCKETS):
            out[i] = w[np.asarray(f, dtype=np.int64)].mean()
    return out
