"""Selection by Moore-Lewis cross-entropy difference (Moore & Lewis 2010): an in-domain language
model of the reference and a general one of the crawl; a document scores its mean per-word
log p_ref - log p_general. Both are word-bigram models with interpolated Kneser-Ney smoothing over
hashed word ids (kenlm's pip package can query but not train models, so this is our own)."""
from __future__ import annotations

import time
import zlib

import numpy as np

from core.text import WORD
from tasks.select_io import load_model, save_model

METHOD = "moore-lewis"
VOCAB = 1 << 18       # hashed word ids
DISCOUNT = 0.75
MAX_TOKENS = 2000
BOS = VOCAB           # sentence-start id, outside the hashed range


def _ids(text: str) -> np.ndarray:
    return np.asarray([BOS] + [zlib.crc32(w.encode()) % VOCAB for w in WORD.findall(text.lower())[:MAX_TOKENS]],
                      dtype=np.int64)


def _bigram_keys(ids: np.ndarray) -> np.ndarray:
    return ids[:-1] * (VOCAB + 1) + ids[1:]


def _lm(texts: list[str]) -> dict[str, np.ndarray]:
    keys = np.concatenate([_bigram_keys(_ids(t)) for t in texts] or [np.zeros(0, np.int64)])
    uniq, cnt = np.unique(keys, return_counts=True)
    prev, nxt = uniq // (VOCAB + 1), uniq % (VOCAB + 1)
    ctx = np.bincount(prev, weights=cnt, minlength=VOCAB + 1)        # c(v .)
    ctx_types = np.bincount(prev, minlength=VOCAB + 1)               # N1+(v .)
    cont = np.bincount(nxt, minlength=VOCAB + 1)                     # N1+(. w)
    return {"keys": uniq, "counts": cnt.astype(np.int32), "ctx": ctx.astype(np.float32),
            "ctx_types": ctx_types.astype(np.int32), "cont": cont.astype(np.int32)}


def _logprob(lm: dict, ids: np.ndarray) -> np.ndarray:
    """ln p(w_i | w_{i-1}) for each bigram of ids, interpolated Kneser-Ney (add-one continuation floor)."""
    keys = _bigram_keys(ids)
    prev, nxt = ids[:-1], ids[1:]
    pos = np.searchsorted(lm["keys"], keys)
    pos = np.minimum(pos, len(lm["keys"]) - 1) if len(lm["keys"]) else pos
    found = (lm["keys"][pos] == keys) if len(lm["keys"]) else np.zeros(len(keys), bool)
    c_vw = np.where(found, lm["counts"][pos] if len(lm["keys"]) else 0, 0).astype(np.float64)
    c_v = lm["ctx"][prev].astype(np.float64)
    p_cont = (lm["cont"][nxt] + 1.0) / (float(lm["n_types"]) + VOCAB)
    lam = np.where(c_v > 0, DISCOUNT * lm["ctx_types"][prev] / np.maximum(c_v, 1), 1.0)
    p = np.where(c_v > 0, np.maximum(c_vw - DISCOUNT, 0) / np.maximum(c_v, 1), 0.0) + lam * p_cont
    return np.log(p)


def train(positives: list[str], negatives: list[str], out_path, *, seed: int = 0, **_) -> dict:
    t0 = time.perf_counter()
    if not positives or not negatives:
        raise ValueError("moore-lewis selection needs reference and general texts")
    arrays = {}
    for name, texts in (("ref", positives), ("gen", negatives)):
        lm = _lm(texts)
        lm["n_types"] = np.int64(len(lm["keys"]))
        arrays.update({f"{name}_{k}": v for k, v in lm.items()})
    nbytes = save_model(out_path, METHOD, **arrays)
    return {"method": METHOD, "n_pos": len(positives), "n_neg": len(negatives), "model_bytes": nbytes,
            "train_seconds": round(time.perf_counter() - t0, 3)}


def score(model_path, texts: list[str]) -> np.ndarray:
    """Mean per-word cross-entropy difference H_general - H_ref, in nats (higher: more reference-like)."""
    m = load_model(model_path, METHOD)
    ref = {k[4:]: v for k, v in m.items() if k.startswith("ref_")}
    gen = {k[4:]: v for k, v in m.items() if k.startswith("gen_")}
    out = np.zeros(len(texts))
    for i, t in enumerate(texts):
        ids = _ids(t)
        if len(ids) > 1:
            out[i] = float((_logprob(ref, ids) - _logprob(gen, ids)).mean())
    return out
