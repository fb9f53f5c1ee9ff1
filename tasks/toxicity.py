"""Toxicity: a fastText classifier of sentences, a document rule on the share of toxic text, a
calibrated sentence threshold, and the LDNOOBW word-list ratio that never counts identity terms.

Training (`train_toxicity`): labelled posts (Davidson et al.: hate/offensive = toxic, neither = clean)
plus clean prose of many topics (`ToxicityConfig.clean_data`: the bundled reference books, speeches and
encyclopedia text, and the background corpus of legal, medical, finance, science and general documents),
one clean example per sentence, plus clean sentences naming every identity term of the bias groups, as many
as it takes for a term's toxic share in training to fall to the overall one (Dixon et al. 2018). A seeded
part of the clean prose (`holdout`) is kept out of training: the sentence threshold is the
(1 - target_fpr) quantile of its sentence scores, never below `min_sentence_score` (the calibration can
only raise it), and is written next to the model (`calibration_path`) with the held-out error rates.

Judging (`judge`): every sentence of every document is scored in one predict call. A document is dropped
when the sentences above the threshold hold more than `max_share` of its words and are at least
`min_toxic_sentences` ("toxic share"); or when its word-list ratio is above `max_wordlist_ratio` with at
least `min_wordlist_terms` matches and at least one toxic sentence ("word list"). One bad sentence, or a
few clinical or legal words, never drop a long clean page. bench/toxicity.py measures all of it.
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import os
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.config import ToxicityConfig
from core.text import WORD, count_words
from tasks import fasttext_model as ft
from tasks.bias_terms import group_regexes

log = logging.getLogger(__name__)

TOXIC, CLEAN = "toxic", "clean"
# Not in ToxicityConfig (yet). dim 16 / 100k buckets: a ~10 MB model, as accurate as dim 64 on Davidson.
_MODEL_PARAMS = dict(lr=0.3, dim=16, word_ngrams=2, bucket=100_000)
CHUNK_WORDS = 200  # clean_data is cut into chunks of about this size (tasks.quality.load_reference)
_HOLDOUT_BLOCK = 8  # ... and held out in runs of this many consecutive chunks (not neighbours of trained ones)
_TWEET_NOISE = re.compile(r"\bRT\b|@\w+:?|https?://\S+")  # retweet marks, mentions, links: not web text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
COLUMNS = ("toxicity_score", "toxicity_mean", "toxicity_share", "toxicity_sentences",
           "wordlist_ratio", "wordlist_terms")
REASON_SHARE, REASON_WORDLIST = "toxic share", "word list"

# Neutral sentences for identity-term augmentation; {w} is an identity word or phrase, as an adjective
# or a noun (bag-of-n-grams models care about the words around it, not the grammar).
IDENTITY_TEMPLATES = (
    "I am {w}.", "We are {w}.", "They are {w} and proud of it.", "My best friend is {w}.",
    "{W} people live in every city.", "The survey asked {w} respondents about housing.",
    "{W} groups met at the library on Monday.", "She has written about {w} communities for years.",
    "The school welcomes {w} students.", "Being {w} is part of who I am.",
    "The museum opened an exhibit on {w} artists.", "{W} voters turned out in large numbers.",
    "He grew up in a {w} neighbourhood.", "Many {w} families moved here after the war.",
    "The report describes the history of {w} workers in the region.", "Our team includes {w} engineers.",
    "{W}.", "{W} people.", "A {w} person.", "{W} friends.",
)


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


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if WORD.search(s)]


def calibration_path(model_path) -> Path:
    """The calibration sidecar of a model: toxicity.bin -> toxicity.calibration.json."""
    return Path(model_path).with_suffix(".calibration.json")


def load_clean(paths: list[str]) -> list[str]:
    """clean_data as ~CHUNK_WORDS-word chunks, in file order (.txt / .jsonl / .parquet, or folders)."""
    from tasks.quality import load_reference

    return load_reference(list(paths), CHUNK_WORDS)


def split_holdout(chunks: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): round(share x blocks) seeded runs of _HOLDOUT_BLOCK consecutive chunks are held
    out (one at least when there are two runs or more: a single run is all training)."""
    blocks = (len(chunks) + _HOLDOUT_BLOCK - 1) // _HOLDOUT_BLOCK
    n_held = max(1, round(share * blocks)) if blocks > 1 else 0
    held_blocks = np.zeros(blocks, dtype=bool)
    held_blocks[np.random.default_rng(seed).choice(blocks, n_held, replace=False)] = True
    held = np.repeat(held_blocks, _HOLDOUT_BLOCK)[:len(chunks)]
    return [c for c, h in zip(chunks, held) if not h], [c for c, h in zip(chunks, held) if h]


def _identity_matches(groups_file, texts: list[str]) -> list[set[str]]:
    """The identity terms (as written, lowercased: 'muslims', 'native american') found in each text.
    The terms are lowercase (load_groups), so the texts are lowercased rather than matched with re.I:
    3x faster (1.1 s -> 0.34 s on the ~59,000 training texts of a toxicity model), the same matches
    on them (a character whose lowercase is two, like U+0130, is the only way the two can differ)."""
    rx = re.compile("|".join(f"(?:{r.pattern})" for r in group_regexes(str(groups_file)).values()))
    return [set(rx.findall(t.lower())) for t in texts]


def identity_forms(groups_file, texts: list[str], forms_per_term: int = 3,
                   matches: list[set[str]] | None = None) -> list[str]:
    """Every identity term of groups_file: a plain term as written, a wildcard term ('muslim*') as its
    most frequent completions found in `texts` ('muslim', 'muslims'; none if it never occurs)."""
    from tasks.bias_terms import load_groups, term_pattern

    found = Counter(w for m in (matches if matches is not None else _identity_matches(groups_file, texts)) for w in m)
    words = []
    for terms in load_groups(str(groups_file)).values():
        for term in terms:
            if not term.endswith("*"):
                words.append(term)
                continue
            rx = re.compile(term_pattern(term) + r"$")
            words += sorted((w for w in found if rx.match(w)), key=lambda w: (-found[w], w))[:forms_per_term]
    return list(dict.fromkeys(words))


def identity_sentences(groups_file, texts: list[str], labels) -> list[str]:
    """Clean examples naming every identity form, as many as it takes (Dixon et al. 2018) for the toxic
    share of the training examples that contain the form to fall to the toxic share of all training
    examples (texts, labels: every example, 1 = toxic). At least one of each IDENTITY_TEMPLATES; beyond
    that, half templates and half the clean examples of `texts` that contain the form, repeated (a template
    alone teaches its context words, not the identity word, to be clean). Davidson uses 'queer', 'white',
    'girl' mostly in toxic posts: a few templates are not enough."""
    labels = np.asarray(labels, dtype=bool)
    prior = max(float(labels.mean()), 1e-3) if len(labels) else 0.5
    matches = _identity_matches(groups_file, texts)
    forms = identity_forms(groups_file, texts, matches=matches)
    n_tox, n_clean, clean_with = Counter(), Counter(), {}
    for i, (found, y) in enumerate(zip(matches, labels)):
        (n_tox if y else n_clean).update(found)
        if not y:
            for w in found:
                clean_with.setdefault(w, []).append(i)
    out, n_tpl_min = [], len(IDENTITY_TEMPLATES)
    for form in forms:
        need = max(n_tpl_min, int(np.ceil(n_tox[form] * (1 - prior) / prior - n_clean[form])))
        n_tpl = need if need == n_tpl_min else max(n_tpl_min, need // 2)
        cap = form[:1].upper() + form[1:]
        out += [IDENTITY_TEMPLATES[i % n_tpl_min].format(w=form, W=cap) for i in range(n_tpl)]
        real = clean_with.get(form, [])
        out += [texts[real[i % len(real)]] for i in range(need - n_tpl)] if real else []
    return out


def train_toxicity(texts: list[str], labels, cfg: ToxicityConfig, out_path,
                   clean_texts: list[str] | None = None, groups_file=None) -> dict:
    """Train P(toxic) on the labelled texts, the clean prose (clean_texts, else cfg.clean_data, one
    example per sentence, less a held-out part) and, with cfg.identity_augmentation and a groups_file,
    neutral identity sentences; then calibrate the sentence threshold on the held-out clean prose and
    write it to calibration_path(out_path).

    Tweets alone teach that unfamiliar prose is toxic (~16% of clean held-out chunks dropped by the old
    any-sentence rule); clean prose of one domain (a legal reference) teaches that any other topic is."""
    labels = np.asarray(labels)
    chunks = load_clean(cfg.clean_data) if clean_texts is None else list(clean_texts)
    train_chunks, held_chunks = split_holdout(chunks, cfg.holdout, cfg.seed)
    clean_sents = [s for t in train_chunks for s in split_sentences(t)]
    pairs = [(TOXIC if y else CLEAN, t) for t, y in zip(texts, labels)] + [(CLEAN, s) for s in clean_sents]
    identity = identity_sentences(groups_file, [t for _, t in pairs], [lab == TOXIC for lab, _ in pairs]) \
        if cfg.identity_augmentation and groups_file else []
    pairs += [(CLEAN, s) for s in identity]
    out = Path(out_path)
    info = ft.train_supervised(pairs, out, epoch=cfg.epoch, seed=cfg.seed, **_MODEL_PARAMS)
    calibration = calibrate(out, held_chunks, cfg)
    return {"n_toxic": int(labels.sum()), "n_clean": int(len(labels) - labels.sum()),
            "n_clean_sentences": len(clean_sents), "n_identity_sentences": len(identity),
            "n_heldout_chunks": len(held_chunks), **info,
            "sentence_threshold": calibration["sentence_threshold"],
            "heldout_sentence_fpr": calibration["heldout_sentence_fpr"],
            "heldout_doc_fpr": calibration["heldout_doc_fpr"],
            "calibration_path": str(calibration_path(out))}


def calibrate(model_path, held_chunks: list[str], cfg: ToxicityConfig) -> dict:
    """Sentence threshold = the (1 - target_fpr) quantile of held-out clean sentence scores, at least
    min_sentence_score; written (atomically) next to the model with the measured held-out rates."""
    sents = [s for t in held_chunks for s in split_sentences(t)]
    p = ft.prob_of(ft.load(model_path), sents, TOXIC)
    q = float(np.quantile(p, 1 - cfg.target_fpr, method="higher")) if len(p) else 0.0
    threshold = min(max(cfg.min_sentence_score, q), 0.999)
    doc_fpr = 0.0  # the share rule over the held-out chunks as documents (word list not counted)
    if held_chunks:
        doc = _document_stats(held_chunks, model_path, threshold)
        doc_fpr = float(np.mean((doc["share"] > cfg.max_share) & (doc["flagged"] >= cfg.min_toxic_sentences)))
    result = {"version": 1, "sentence_threshold": threshold, "quantile": q, "target_fpr": cfg.target_fpr,
              "min_sentence_score": cfg.min_sentence_score, "heldout_sentences": len(sents),
              "heldout_sentence_fpr": float(np.mean(p > threshold)) if len(p) else 0.0,
              "heldout_chunks": len(held_chunks), "heldout_doc_fpr": doc_fpr,
              "doc_rule": {"max_share": cfg.max_share, "min_toxic_sentences": cfg.min_toxic_sentences},
              "model_sha256": _sha256(str(Path(model_path).resolve()), *_stat(model_path))}
    side = calibration_path(model_path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, side)
    return result


def _stat(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _sha256(path: str, _mtime_ns: int, _size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sentence_threshold(model_path, cfg: ToxicityConfig) -> tuple[float, str]:
    """(threshold, where it came from): "calibration", the sidecar's when it belongs to this model file;
    "floor", cfg.min_sentence_score when the sidecar's is not above it; "config", cfg.min_sentence_score
    when there is no (usable) sidecar."""
    side = calibration_path(model_path)
    if not side.is_file():
        return cfg.min_sentence_score, "config"
    try:
        cal = json.loads(side.read_text(encoding="utf-8"))
        threshold = float(cal["sentence_threshold"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning("toxicity: unreadable calibration %s (%s): using min_sentence_score", side, e)
        return cfg.min_sentence_score, "config"
    if cal.get("model_sha256") != _sha256(str(Path(model_path).resolve()), *_stat(model_path)):
        log.warning("toxicity: %s was made for another model file: using min_sentence_score", side)
        return cfg.min_sentence_score, "config"
    if threshold <= cfg.min_sentence_score:
        return cfg.min_sentence_score, "floor"
    return threshold, "calibration"


def _document_stats(texts: list[str], model_path, threshold: float) -> dict[str, np.ndarray]:
    """Per document: max and mean sentence P(toxic), the share of words in sentences above threshold,
    the number of those sentences. All sentences of all texts go through one predict call."""
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
    mean = np.divide(np.bincount(owner, weights=p, minlength=n), counts, out=np.zeros(n), where=counts > 0)
    words = np.array([count_words(s) for s in sentences], dtype=np.float64)
    hit = p > threshold
    total = np.bincount(owner, weights=words, minlength=n)
    share = np.divide(np.bincount(owner, weights=words * hit, minlength=n), total,
                      out=np.zeros(n), where=total > 0)
    flagged = np.bincount(owner, weights=hit.astype(np.float64), minlength=n)
    return {"max": top, "mean": mean, "share": share, "flagged": flagged}


def score_toxicity(model_path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (max, mean) of P(toxic) over its sentences/lines; 0 for a text with none.
    All sentences of all texts go through one predict call. (`refinery score`; curation uses judge.)"""
    s = _document_stats(texts, model_path, 1.0)
    return s["max"], s["mean"]


def judge(model_path, texts: list[str], cfg: ToxicityConfig,
          groups_file: str) -> tuple[dict[str, np.ndarray], list[str | None], list[str]]:
    """Score and decide every document: (float64 columns named as in COLUMNS, the drop reason per
    document (REASON_SHARE, REASON_WORDLIST or None), a short detail string per document).

    toxicity_score: the highest sentence P(toxic); toxicity_mean: the mean over sentences;
    toxicity_share: the share of words in sentences above the sentence threshold; toxicity_sentences:
    how many such sentences; wordlist_ratio: word-list matches per word; wordlist_terms: matches."""
    threshold, source = sentence_threshold(model_path, cfg)
    s = _document_stats(texts, model_path, threshold)
    ratio, terms = wordlist_counts(texts, cfg.wordlist, groups_file)
    cols = {"toxicity_score": s["max"], "toxicity_mean": s["mean"], "toxicity_share": s["share"],
            "toxicity_sentences": s["flagged"], "wordlist_ratio": ratio, "wordlist_terms": terms}
    by_share = (s["share"] > cfg.max_share) & (s["flagged"] >= cfg.min_toxic_sentences)
    by_list = (ratio > cfg.max_wordlist_ratio) & (terms >= cfg.min_wordlist_terms) & (s["flagged"] >= 1)
    reasons = [REASON_SHARE if a else REASON_WORDLIST if b else None for a, b in zip(by_share, by_list)]
    details = [f"share {sh:.2f} ({k:.0f} sentences > {threshold:.2f} {source}) max {mx:.2f} "
               f"mean {mn:.2f} wordlist {r:.3f} ({t:.0f})"
               for sh, k, mx, mn, r, t in zip(s["share"], s["flagged"], s["max"], s["mean"], ratio, terms)]
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}, reasons, details


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


def wordlist_counts(texts: list[str], wordlist_path, groups_file) -> tuple[np.ndarray, np.ndarray]:
    """(matched word-list terms per word (`\\w+`), matched terms), one value per text; a phrase counts once."""
    single, multi = _wordlist(str(wordlist_path), str(groups_file))
    ratio, terms = np.zeros(len(texts)), np.zeros(len(texts))
    for i, text in enumerate(texts):
        if n_words := count_words(text):
            terms[i] = _count_terms(ft.tokens(text), single, multi)
            ratio[i] = terms[i] / n_words
    return ratio, terms


def wordlist_ratio(texts: list[str], wordlist_path, groups_file) -> np.ndarray:
    """Matched word-list terms (a phrase counts once) per word (`\\w+`), one value per text."""
    return wordlist_counts(texts, wordlist_path, groups_file)[0]
