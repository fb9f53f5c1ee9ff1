"""Domain selection with static embeddings: rank crawl documents by how much they look like a small
reference (tens of documents of one domain).

A document's vector is the mean of its tokens' static vectors (the first `max_tokens` WordPiece tokens),
L2-normalised; the vectors are the model2vec-style distillation of all-MiniLM-L6-v2 shipped in
sample/curation/embeddings/ (sample/build_embeddings.py). On them, an L2-regularised logistic regression
with balanced class weights separates the reference (cut into ~chunk_words chunks) from the negatives, which
are normally the unlabeled crawl itself (it contains some of the domain). Positive-unlabeled rounds: the
crawl documents the model ranks in the top `pu_drop` are taken out of the negatives and the model is fit
again (`pu_rounds` times), so the domain's own documents in the crawl stop pulling the boundary.

Measured on the selection benchmark (5 domains, a crawl with ~10% of its words in the domain, crawl as the
negatives, 2 PU rounds): mean ROC-AUC 0.986 / 0.987 / 0.991 with R = 10 / 30 / 100 reference documents; the
weakest domain is science (0.96-0.98: PLOS biology reads like the PubMed abstracts of the medical set).
Scoring ~0.25 ms per 500-word document on one core once the word cache is warm (~0.45 ms cold).

At run time only numpy and tokenizers are needed. The model file (.npz) holds the coefficients and the
sha256 of the token vectors it was fit on; score() loads the vectors from the package folder (or
`embeddings_dir`) and refuses vectors with another hash.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from tasks.select_io import load_model, save_model

METHOD = "embedding"
EMBEDDINGS_DIR = Path(__file__).resolve().parent.parent / "sample" / "curation" / "embeddings"
DEFAULTS = dict(l2=1e-3, chunk_words=200, pu_rounds=2, pu_drop=0.2, max_tokens=1024, max_negatives=20_000)
_CACHE_WORDS = 500_000  # word -> token ids; cleared when full
_CHARS_PER_TOKEN = 8  # text cut before tokenizing: English WordPiece averages 4-5 characters a token
# not core.text.WORD: the WordPiece pre-tokenizer's split (runs between whitespace and ASCII punctuation,
# each punctuation mark one token), so cached per-word ids equal tokenizing the whole text
_WORD = re.compile(r"[^\s!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class _Embedder:
    """The shipped tokenizer and token vectors. Words (runs between whitespace and ASCII punctuation, where
    BERT's pre-tokenizer splits too) are tokenized once by the WordPiece tokenizer and cached: the same ids
    as tokenizing the whole text, 3-5x faster than the Rust tokenizer on whole 3 kB documents."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        raw = (folder / "vectors.npz").read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        with np.load(folder / "vectors.npz", allow_pickle=False) as z:
            self.vectors = (z["q"].astype(np.float32) * z["scale"].astype(np.float32)[:, None])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if self.tokenizer.get_vocab_size() != len(self.vectors):
            raise ValueError(f"{folder}: tokenizer has {self.tokenizer.get_vocab_size()} tokens, "
                             f"vectors.npz {len(self.vectors)} rows")
        self._cache: dict[str, list[int]] = {}

    def token_ids(self, text: str, max_tokens: int) -> list[int]:
        text = text[:max_tokens * _CHARS_PER_TOKEN]
        try:
            return self._cached_ids(text, max_tokens)
        except KeyError:  # another thread cleared the cache under us: tokenize the text as a whole
            return self.tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens]

    def _cached_ids(self, text: str, max_tokens: int) -> list[int]:
        words = _WORD.findall(text.lower())
        cache = self._cache
        try:
            ids = list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            miss = list({w for w in words if w not in cache})
            if len(cache) + len(miss) > _CACHE_WORDS:
                cache.clear()
            for w, enc in zip(miss, self.tokenizer.encode_batch(miss, add_special_tokens=False)):
                cache[w] = enc.ids
            ids = list(chain.from_iterable(map(cache.__getitem__, words)))
        return ids[:max_tokens]

    def embed(self, texts: list[str], max_tokens: int) -> np.ndarray:
        """(len(texts), dims) float64: the sum of each text's token vectors, L2-normalised (zero without tokens)."""
        out = np.zeros((len(texts), self.vectors.shape[1]), dtype=np.float64)
        vectors = self.vectors
        for i, text in enumerate(texts):
            ids = self.token_ids(text, max_tokens)
            if ids:
                out[i] = vectors[np.asarray(ids, dtype=np.intp)].sum(axis=0)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norm, out=out, where=norm > 0)
        return out


@lru_cache(maxsize=4)
def _embedder(folder: str, _mtime_ns: int, _size: int) -> _Embedder:
    return _Embedder(Path(folder))


def load_embedder(embeddings_dir=None) -> _Embedder:
    """The tokenizer and vectors of `embeddings_dir` (default: the shipped ones), loaded once per file version."""
    folder = Path(embeddings_dir or EMBEDDINGS_DIR).resolve()
    st = (folder / "vectors.npz").stat()
    return _embedder(str(folder), st.st_mtime_ns, st.st_size)


def _chunk(texts: list[str], chunk_words: int) -> list[str]:
    """Each text cut at sentence ends into pieces of >= chunk_words words (a short tail joins the last
    piece); a text under 1.5 chunk_words stays whole."""
    if not chunk_words:
        return list(texts)
    out = []
    for text in texts:
        if len(text.split()) < 1.5 * chunk_words:
            out.append(text)
            continue
        pieces, cur, n = [], [], 0
        for sentence in _SENTENCE.split(text):
            cur.append(sentence)
            n += len(sentence.split())
            if n >= chunk_words:
                pieces.append(" ".join(cur))
                cur, n = [], 0
        if cur:
            if pieces and n < chunk_words // 2:
                pieces[-1] += " " + " ".join(cur)
            else:
                pieces.append(" ".join(cur))
        out += pieces
    return out


def _fit_logistic(X: np.ndarray, y: np.ndarray, l2: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """min over (w, b): mean over both classes of their mean log-loss (balanced) + l2/2 |w|^2.
    Newton steps with backtracking; the intercept is not penalised."""
    n, d = X.shape
    n_pos = y.sum()
    sw = np.where(y == 1, 0.5 / n_pos, 0.5 / (n - n_pos))  # weights sum to 1, each class to 1/2
    Xb = np.hstack([X, np.ones((n, 1))])
    reg = np.r_[np.full(d, l2), 0.0]

    def objective(w):
        z = Xb @ w
        return float(sw @ (np.logaddexp(0.0, z) - y * z) + 0.5 * (reg * w) @ w)

    w = np.zeros(d + 1)
    f = objective(w)
    for _ in range(iters):
        z = Xb @ w
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow
        grad = Xb.T @ (sw * (p - y)) + reg * w
        hess = (Xb * (sw * p * (1 - p))[:, None]).T @ Xb + np.diag(reg) + 1e-12 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            f_new = objective(w - t * step)
            if f_new <= f - 1e-4 * t * (grad @ step):
                break
            t *= 0.5
        w = w - t * step
        done = f - f_new < 1e-12
        f = f_new
        if done:
            break
    return w[:-1], float(w[-1])


def train(positives: list[str], negatives: list[str], out_path, *, seed: int = 0,
          embeddings_dir=None, **params) -> dict:
    """Fit positives (reference documents) against negatives (normally the unlabeled crawl); write the
    model to out_path (.npz, atomically) and return what was done. params: those of DEFAULTS; others
    (the other methods' knobs, which tasks/quality.py passes to every method) are ignored."""
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    positives = [t for t in positives if t and t.strip()]
    negatives = [t for t in negatives if t and t.strip()]
    if not positives or not negatives:
        raise ValueError(f"need positive and negative texts (got {len(positives)} and {len(negatives)} non-empty)")
    t0 = time.perf_counter()
    emb = load_embedder(embeddings_dir)
    pos = _chunk(positives, p["chunk_words"])
    n_neg_given = len(negatives)
    if len(negatives) > p["max_negatives"]:
        keep = np.sort(np.random.default_rng(seed).choice(len(negatives), p["max_negatives"], replace=False))
        negatives = [negatives[i] for i in keep]
    Xp = emb.embed(pos, p["max_tokens"])
    Xn = emb.embed(negatives, p["max_tokens"])
    Xp, Xn = Xp[np.linalg.norm(Xp, axis=1) > 0], Xn[np.linalg.norm(Xn, axis=1) > 0]
    if not len(Xp) or not len(Xn):
        raise ValueError("no positive or no negative text has a known token")
    t_embed = time.perf_counter() - t0

    def fit(neg):
        X = np.vstack([Xp, neg])
        y = np.r_[np.ones(len(Xp)), np.zeros(len(neg))]
        return _fit_logistic(X, y, p["l2"])

    w, b = fit(Xn)
    n_dropped = 0
    for _ in range(p["pu_rounds"]):
        s = Xn @ w + b
        keep = s < np.quantile(s, 1.0 - p["pu_drop"])
        if keep.sum() < 1:
            break
        n_dropped = int((~keep).sum())
        w, b = fit(Xn[keep])
    seconds = time.perf_counter() - t0
    info = {"method": METHOD, "params": p, "seed": seed,
            "n_positive_docs": len(positives), "n_positive_chunks": len(Xp), "n_negatives_given": n_neg_given,
            "n_negatives": len(Xn), "n_dropped_pu": n_dropped, "dims": int(len(w)),
            "embeddings_sha256": emb.sha256, "embed_seconds": round(t_embed, 3), "train_seconds": round(seconds, 3)}
    info["model_bytes"] = save_model(out_path, METHOD, coef=w, intercept=np.float64(b), info=np.array(json.dumps(info)))
    return info


def load(model_path) -> dict:
    z = load_model(model_path, METHOD)
    return {"coef": z["coef"].astype(np.float64), "intercept": float(z["intercept"]), "info": json.loads(str(z["info"]))}


def score(model_path, texts: list[str], *, embeddings_dir=None) -> np.ndarray:
    """Per text, the classifier's log-odds (balanced classes) of being like the positives: float64,
    higher = more like them. A text with no token scores below any text that has one."""
    model = load(model_path)
    emb = load_embedder(embeddings_dir)
    if emb.sha256 != model["info"]["embeddings_sha256"]:
        raise ValueError(f"{model_path} was fit on token vectors sha256 {model['info']['embeddings_sha256'][:12]}..., "
                         f"{Path(embeddings_dir or EMBEDDINGS_DIR)} has {emb.sha256[:12]}...: retrain it")
    w, b = model["coef"], model["intercept"]
    if not len(texts):
        return np.zeros(0, dtype=np.float64)
    X = emb.embed([t or "" for t in texts], model["info"]["params"]["max_tokens"])
    s = (X * w).sum(axis=1) + b  # row by row: a text's score does not depend on its batch
    empty = ~np.any(X, axis=1)
    s[empty] = b - np.linalg.norm(w) - 1.0  # unit rows: X @ w >= -|w|
    return s
