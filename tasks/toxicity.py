"""Toxicity: a fastText classifier scored per sentence (a document's max and mean), and the
LDNOOBW word-list ratio that never counts identity terms (tasks/bias_groups.yaml)."""
from __future__ import annotations

import csv
import html
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from flows.config import ToxicityConfig
from tasks import fasttext_model as ft
from tasks.bias_terms import group_regexes

TOXIC, CLEAN = "toxic", "clean"
# Not in ToxicityConfig (yet). dim 16 / 100k buckets: a ~9 MB model, as accurate as dim 64 on Davidson.
_MODEL_PARAMS = dict(lr=0.3, dim=16, word_ngrams=2, bucket=100_000)
_TWEET_NOISE = re.compile(r"\bRT\b|@\w+:?|https?://\S+")  # retweet marks, mentions, links: not web text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")


def load_labeled(path, text_column: str, label_column: str,
                 toxic_labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels (1 = the label is one of toxic_labels) from a CSV or JSONL file."""
    p = Path(path)
    with p.open(encoding="utf-8", newline="") as f:
        if p.suffix == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    toxic = {str(x) for x in toxic_labels}
    texts = [_TWEET_NOISE.sub(" ", html.unescape(str(r[text_column]))) for r in rows]
    labels = np.array([str(r[label_column]) in toxic for r in rows], dtype=np.int8)
    return texts, labels


def train_toxicity(texts: list[str], labels, cfg: ToxicityConfig, out_path,
                   clean_texts: list[str] | None = None) -> dict:
    """Train P(toxic). clean_texts (e.g. the quality reference chunks) are added, one example per
    sentence, as clean: tweets alone teach that 'her', 'she' and unknown words are toxic (~16% of
    held-out book/encyclopedia/speech chunks were dropped at the default thresholds; 0.4% with them)."""
    labels = np.asarray(labels)
    pairs = [(TOXIC if y else CLEAN, t) for t, y in zip(texts, labels)]
    extra = [s for t in clean_texts or () for s in split_sentences(t)]
    pairs += [(CLEAN, s) for s in extra]
    info = ft.train_supervised(pairs, out_path, epoch=cfg.epoch, seed=cfg.seed, **_MODEL_PARAMS)
    return {"n_toxic": int(labels.sum()), "n_clean": int(len(labels) - labels.sum()),
            "n_clean_sentences": len(extra), **info}


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if _WORD.search(s)]


def score_toxicity(model_path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (max, mean) of P(toxic) over its sentences/lines; 0 for a text with none.
    All sentences of all texts go through one predict call."""
    sentences, owner = [], []
    for i, text in enumerate(texts):
        parts = split_sentences(text)
        sentences += parts
        owner += [i] * len(parts)
    p = ft.prob_of(ft.load(model_path), sentences, TOXIC)
    owner = np.asarray(owner, dtype=np.int64)
    n = len(texts)
    top = np.zeros(n)
    np.maximum.at(top, owner, p)
    counts = np.bincount(owner, minlength=n)
    mean = np.divide(np.bincount(owner, weights=p, minlength=n), counts,
                     out=np.zeros(n), where=counts > 0)
    return top, mean


@lru_cache(maxsize=8)
def _wordlist(wordlist_path: str, groups_file: str) -> tuple[frozenset, dict[str, list[tuple]]]:
    """(single-token terms, first token -> longer terms as token tuples, longest first). Entries that
    contain an identity term ('gay sex', 'big black', 'girl on') are left out: their other words
    still count where they are list terms on their own ('sex')."""
    identity = list(group_regexes(groups_file).values())
    single, multi = set(), {}
    for line in Path(wordlist_path).read_text(encoding="utf-8").splitlines():
        toks = tuple(ft.tokens(line))
        if not toks or any(rx.search(line) for rx in identity):
            continue
        if len(toks) == 1:
            single.add(toks[0])
        else:
            multi.setdefault(toks[0], []).append(toks)
    for phrases in multi.values():
        phrases.sort(key=len, reverse=True)
    return frozenset(single), multi


def _count_terms(toks: list[str], single: frozenset, multi: dict) -> int:
    n, i = 0, 0
    while i < len(toks):
        step = 1
        for phrase in multi.get(toks[i], ()):
            if tuple(toks[i:i + len(phrase)]) == phrase:
                step = len(phrase)
                break
        if step > 1 or toks[i] in single:
            n += 1
        i += step
    return n


def wordlist_ratio(texts: list[str], wordlist_path, groups_file) -> np.ndarray:
    """Matched word-list terms (a phrase counts once) per word (`\\w+`), one value per text."""
    single, multi = _wordlist(str(wordlist_path), str(groups_file))
    out = np.zeros(len(texts))
    for i, text in enumerate(texts):
        if n_words := len(_WORD.findall(text)):
            out[i] = _count_terms(ft.tokens(text), single, multi) / n_words
    return out
