"""Shared fastText plumbing for the quality and toxicity classifiers: one text normalisation for
training and prediction, supervised training with a NaN retry, atomic saves, a cached loader."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import fasttext
import numpy as np

from core.faults import die_with_parent

fasttext.FastText.eprint = lambda *_: None  # silence the load_model API-change notice on stderr

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Lowercased words, each punctuation mark or symbol its own token."""
    return _TOKEN.findall(text.lower())


def normalize(text: str, max_words: int | None = None) -> str:
    """One line of space-separated tokens (newlines gone), the same for training and prediction."""
    toks = tokens(text)
    return " ".join(toks[:max_words] if max_words else toks)


# Training runs in a fresh process: this fastText build leaves part of the input matrix uninitialised,
# which is zeros on a fresh process's memory but leftovers from the previous model when training twice
# in one process (random NaNs, different models from the same seed). Fresh process: same bytes each time.
_TRAIN = """
import json, sys, fasttext
try:
    fasttext.train_supervised(**json.loads(sys.argv[1])).save_model(sys.argv[2])
except RuntimeError as e:
    sys.exit(3 if "NaN" in str(e) else f"fastText: {e}")
"""


def train_supervised(pairs: list[tuple[str, str]], out_path, *, lr: float, epoch: int, dim: int,
                     word_ngrams: int, bucket: int, seed: int, max_words: int | None = None,
                     thread: int = 1, retries: int = 4) -> dict:
    """Train on (label, text) pairs, save atomically to out_path. thread=1 + seed is deterministic.
    fastText sometimes diverges ("Encountered NaN"): retry with the next seed and half the lr."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"__label__{label} {t}" for label, text in pairs if (t := normalize(text, max_words))]
    order = np.random.default_rng(seed).permutation(len(lines))  # never all of one class first
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fasttext-") as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(lines[i] + "\n" for i in order), encoding="utf-8")
        for attempt in range(retries):
            args = dict(input=str(train_file), lr=lr, epoch=epoch, dim=dim, wordNgrams=word_ngrams, bucket=bucket,
                        seed=seed + attempt, thread=thread, minCount=1, loss="softmax", verbose=0)
            # dies with a killed run, so it cannot write its temporary after the rerun swept
            r = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(args), str(partial)],
                               capture_output=True, text=True, preexec_fn=die_with_parent())
            if r.returncode != 3:
                break
            lr /= 2
        if r.returncode:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"fastText training failed ({'NaN' if r.returncode == 3 else r.returncode}): "
                               f"{r.stderr.strip()[-2000:]}")
    os.replace(partial, out)
    return {"train_lines": len(lines), "lr": lr, "seed": seed + attempt, "attempts": attempt + 1,
            "model_bytes": out.stat().st_size, "train_seconds": round(time.perf_counter() - t0, 3)}


def load(path) -> fasttext.FastText._FastText:
    """Load a model once per (path, mtime, size): a retrained file is picked up, a known one is reused."""
    st = os.stat(path)
    return _load(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _load(path: str, _mtime_ns: int, _size: int):
    return fasttext.load_model(path)


def prob_of(model, texts: list[str], label: str, max_words: int | None = None) -> np.ndarray:
    """P(label) for each text, all in one predict call."""
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict([normalize(t, max_words) for t in texts], k=-1)
    key = "__label__" + label
    p = [dict(zip(ls, ps)).get(key, 0.0) for ls, ps in zip(labels, probs)]
    return np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)  # fastText's softmax can return 1.00001


def roc_auc(y_true, scores) -> float:
    """ROC-AUC as the Mann-Whitney U statistic (ties count one half)."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n_pos, n_neg = y.sum(), (~y).sum()
    if not n_pos or not n_neg:
        raise ValueError("roc_auc needs both classes")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
