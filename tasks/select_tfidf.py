"""Selection by logistic regression over hashed TF-IDF word uni- and bigrams (the default method).

Why this beats fastText on a small reference (bench/selection.py): IDF is taken from the crawl, so words
every crawl page uses weigh little and the terms that set the reference apart weigh most; the model
is a plain L2-regularised linear one over 2^18 sparse features, fitted to convergence with L-BFGS,
with no 16-dimensional bottleneck and no learning-rate schedule to go wrong on a few hundred lines.
Classes are weighted to balance, so thirty reference documents count as much as a thousand crawl pages.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from core.text import WORD
from tasks.select_io import load_model, save_model

METHOD = "tfidf"
BUCKETS = 1 << 18
MAX_TOKENS = 2000   # a document is featurised on its first this-many words: bounds the cost per page


def features(text: str, buckets: int = BUCKETS, max_tokens: int = MAX_TOKENS) -> list[int]:
    """Hashed lowercased words and word bigrams; crc32, so the same ids in every process."""
    w = WORD.findall(text.lower())[:max_tokens]
    return ([zlib.crc32(x.encode()) % buckets for x in w]
            + [zlib.crc32(f"{a} {b}".encode()) % buckets for a, b in zip(w, w[1:])])


def counts(texts: list[str], buckets: int = BUCKETS) -> sp.csr_matrix:
    """Feature counts, one row per text. Built from per-text int32 arrays, not Python lists: at 20,000
    crawl pages the lists alone took more memory than the finished matrix."""
    cols, indptr = [], np.zeros(len(texts) + 1, dtype=np.int64)
    for i, t in enumerate(texts):
        f = np.asarray(features(t, buckets), dtype=np.int32)
        cols.append(f)
        indptr[i + 1] = indptr[i] + len(f)
    idx = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int32)
    x = sp.csr_matrix((np.ones(len(idx), dtype=np.float32), idx, indptr), shape=(len(texts), buckets))
    x.sum_duplicates()
    return x


def tfidf(x: sp.csr_matrix, idf: np.ndarray) -> sp.csr_matrix:
    """Sublinear term frequency times IDF, each row L2-normalised (long and short documents compare)."""
    x = x.astype(np.float32, copy=True)
    x.data = 1.0 + np.log(x.data)
    x.data *= idf.astype(np.float32)[x.indices]
    norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    norm[norm == 0] = 1.0
    x.data /= np.repeat(norm, np.diff(x.indptr)).astype(np.float32)
    return x


def idf_of(x: sp.csr_matrix) -> np.ndarray:
    df = np.asarray((x > 0).sum(axis=0)).ravel()
    return np.log((x.shape[0] + 1) / (df + 1)) + 1.0


def fit_logistic(x: sp.csr_matrix, y: np.ndarray, c: float, max_iter: int = 300) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression with balanced class weights; deterministic (L-BFGS from zero)."""
    y = np.asarray(y, dtype=np.float64)
    x = x.astype(np.float64)   # once: scipy would upcast a float32 matrix at every product (same result)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    sw = np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))

    def loss_grad(wb):
        w, b = wb[:-1], wb[-1]
        z = x @ w + b
        # log(1 + e^z) - y z, computed without overflow
        loss = float((sw * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 / c * (w @ w))
        g = sw * (0.5 * (1.0 + np.tanh(0.5 * z)) - y)  # sigmoid(z) - y
        return loss, np.r_[x.T @ g + w / c, g.sum()]

    # one BLAS thread: a multi-threaded dot product sums in another order, and the same data gave another
    # model in a Dask worker (which runs BLAS single-threaded) than in the main process
    with threadpool_limits(limits=1, user_api="blas"):
        r = minimize(loss_grad, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter})
    return r.x[:-1], float(r.x[-1])


def train(positives: list[str], negatives: list[str], out_path, *, seed: int = 0, c: float = 1.0,
          **_) -> dict:
    """Fit on positives vs negatives and save. IDF comes from the negatives (the crawl sample): the
    corpus the scores must rank."""
    if not positives or not negatives:
        raise ValueError("tfidf selection needs positive and negative texts")
    return train_counts(counts(positives), counts(negatives), out_path, c=c)


def train_counts(pos: sp.csr_matrix, neg: sp.csr_matrix, out_path, *, c: float = 1.0, **_) -> dict:
    """`train` from feature counts (`counts`): tasks.quality featurises once for all its models."""
    t0 = time.perf_counter()
    if not pos.shape[0] or not neg.shape[0]:
        raise ValueError("tfidf selection needs positive and negative texts")
    idf = idf_of(neg)
    x = sp.vstack([tfidf(pos, idf), tfidf(neg, idf)]).tocsr()
    y = np.r_[np.ones(pos.shape[0]), np.zeros(neg.shape[0])]
    w, b = fit_logistic(x, y, c)
    nbytes = save_model(out_path, METHOD, idf=idf.astype(np.float32), w=w.astype(np.float32),
                        b=np.float64(b), c=np.float64(c))
    return {"method": METHOD, "n_pos": pos.shape[0], "n_neg": neg.shape[0], "model_bytes": nbytes,
            "train_seconds": round(time.perf_counter() - t0, 3)}


def score(model_path, texts: list[str]) -> np.ndarray:
    """P(reference-like) under balanced priors, in (0, 1)."""
    m = load_model(model_path, METHOD)
    if not texts:
        return np.zeros(0)
    x = tfidf(counts(texts), m["idf"].astype(np.float64))
    z = x @ m["w"].astype(np.float64) + float(m["b"])
    return 0.5 * (1.0 + np.tanh(0.5 * z))
