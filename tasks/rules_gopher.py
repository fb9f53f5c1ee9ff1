"""Gopher's heuristics (Rae et al. 2021, Appendix A, Table A1): repetition and quality.

Two families live here because they share a tokenizer; each has its own `check_*`.
Where the paper is vague we follow DataTrove 0.10 (gopher_repetition_filter.py,
gopher_quality_filter.py), which is what FineWeb ran, with these deliberate differences:

- Words are `\\w+` runs joined by `-`, `'` or `’` (don't, well-known), found by one precompiled
  regex instead of NLTK's word_tokenize (slow, and a download). Punctuation is not a word: not
  in the word count (as in DataTrove) nor in the '#'/ellipsis-per-word denominator (DataTrove
  divides those by all NLTK tokens, punctuation included).
- The alphabetic-words ratio is over whitespace-separated tokens, the paper's "words": a token
  like `|`, `»` or `2023` lacks a letter and counts against the page, while `world.` does not.
  DataTrove divides by all NLTK tokens, punctuation included, so a comma-rich sentence of
  short words can fail there; this is the paper's intent without that artefact.
- Stop words are matched case-insensitively ("The" counts); DataTrove is case-sensitive.
- Bullet and ellipsis line ratios are over non-empty lines, with more bullet glyphs than
  DataTrove's `•`/`-`; otherwise blank lines between list items would dilute the ratio.
- Lines for the duplicate-line rules are stripped and non-empty (DataTrove: split on `\\n+`).
- A top n-gram counts only if it occurs at least twice: an n-gram seen once is not repetition,
  and otherwise every page of a dozen words is blamed on `top_2gram` (DataTrove does so).
- n-gram characters are the words' characters (no separators, as DataTrove's "".join); the
  duplicated n-gram fraction uses DataTrove's greedy scan, which jumps n words past each
  repeat so that every character is counted once.
"""
from __future__ import annotations

import re
from collections import Counter
from itertools import accumulate, compress
from operator import sub

WORD = re.compile(r"\w+(?:[-'’]\w+)*")  # not core.text.WORD: Gopher counts don't, well-known as one word
# a whitespace token without a letter (digits, symbols); anchored at token starts: linear time
_NO_ALPHA_TOKEN = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_STOP_WORD = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
_PARAGRAPH = re.compile(r"\n\s*\n")
BULLETS = tuple("•‣◦⁃▪▫●○■□►▶➢➤→-*–—·")
ELLIPSES = ("...", "…")

QUALITY_CODES = ["word_count", "mean_word_length", "symbol_word_ratio", "bullet_lines_ratio",
                 "ellipsis_lines_ratio", "alpha_words_ratio", "stop_words"]


def repetition_codes(cfg) -> list[str]:
    return (["dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac"]
            + [f"top_{n}gram" for n in sorted(cfg.top_ngram_char_frac)]
            + [f"dup_{n}gram" for n in sorted(cfg.dup_ngram_char_frac)])


_last = ("", [])  # (text, words): both Gopher families tokenize the same text, once


def words_of(text: str) -> list[str]:
    global _last
    last_text, words = _last  # one tuple read and one write: safe across threads
    if last_text is not text:
        words = WORD.findall(text)
        _last = (text, words)
    return words


def dups(items: list[str]) -> tuple[int, int]:
    """(count, chars) of the items that repeat an earlier one; set arithmetic keeps it in C."""
    uniq = set(items)
    return len(items) - len(uniq), sum(map(len, items)) - sum(map(len, uniq))


def _ngrams(words: list[str], n: int):
    return zip(*(words[i:] for i in range(n)))


def _dup_ngram_chars(grams: list[tuple], starts, cum: list[int], n: int) -> tuple[int, list[int]]:
    """DataTrove's scan, which counts every character once: walk the n-grams in order; one seen
    before adds its characters and jumps n words ahead, any other is remembered. An n-gram that
    occurs once never adds anything, so the walk visits only the repeated ones: a Python loop
    over every word would cost more than the counting in C. Returns (characters, the starts of
    the repeated n-grams)."""
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0, []
    repeated = {g for g, c in counts.items() if c > 1}
    keep = list(map(repeated.__contains__, grams))
    starts, grams = list(compress(starts, keep)), list(compress(grams, keep))
    seen, dup, nxt = set(), 0, 0
    for i, g in zip(starts, grams):
        if i < nxt:
            continue  # jumped over
        if g in seen:
            dup += cum[i + n] - cum[i]
            nxt = i + n
        else:
            seen.add(g)
    return dup, starts


def check_repetition(text: str, cfg) -> tuple[str, str | None, str]:
    if not cfg.enabled:
        return text, None, ""
    n_chars = len(text)
    if not n_chars:
        return text, None, ""
    fail = lambda rule, v, t: (text, f"gopher_repetition:{rule}", f"{rule} {v:.3f} > {t}")  # noqa: E731

    paras = _PARAGRAPH.split(text.strip())
    d, c = dups(paras)
    if d / len(paras) > cfg.dup_para_frac:
        return fail("dup_para_frac", d / len(paras), cfg.dup_para_frac)
    if c / n_chars > cfg.dup_para_char_frac:
        return fail("dup_para_char_frac", c / n_chars, cfg.dup_para_char_frac)

    lines = [s for s in (ln.strip() for ln in text.split("\n")) if s]
    d, c = dups(lines)
    if lines and d / len(lines) > cfg.dup_line_frac:
        return fail("dup_line_frac", d / len(lines), cfg.dup_line_frac)
    if c / n_chars > cfg.dup_line_char_frac:
        return fail("dup_line_char_frac", c / n_chars, cfg.dup_line_char_frac)

    words = words_of(text)
    cum = [0, *accumulate(map(len, words))]  # cum[j] - cum[i]: characters of words i..j-1
    top = len(words)  # no n-gram occurs more often than the top shorter one
    unique_from = len(words) + 1  # an n at which no n-gram repeats, so none longer does either
    for n, thr in sorted(cfg.top_ngram_char_frac.items()):
        if len(words) < n or n >= unique_from:
            break
        # skip counting when even the longest n-gram, as frequent as that bound, is under thr
        if top < len(words) and top * max(map(sub, cum[n:], cum)) / n_chars <= thr:
            continue
        (gram, top), = Counter(_ngrams(words, n)).most_common(1)
        if top < 2:
            unique_from = n
            break
        frac = sum(map(len, gram)) * top / n_chars
        if frac > thr:
            return fail(f"top_{n}gram", frac, thr)

    starts = None
    for n, thr in sorted(cfg.dup_ngram_char_frac.items()):
        if len(words) < n or n >= unique_from:
            break
        if starts is None:
            starts, grams = range(len(words) - n + 1), list(_ngrams(words, n))
        else:  # a longer n-gram can only repeat where a shorter one did: look there only
            starts = [i for i in starts if i + n <= len(words)]
            grams = [tuple(words[i:i + n]) for i in starts]
        dup, starts = _dup_ngram_chars(grams, starts, cum, n)
        if not dup:
            break  # no repeated n-gram, so no longer one either: clean prose stops at n = 5
        frac = dup / n_chars
        if frac > thr:
            return fail(f"dup_{n}gram", frac, thr)
    return text, None, ""


def check_quality(text: str, cfg) -> tuple[str, str | None, str]:
    if not cfg.enabled:
        return text, None, ""
    fail = lambda rule, detail: (text, f"gopher_quality:{rule}", detail)  # noqa: E731

    words = words_of(text)
    n = len(words)
    if n < cfg.min_words or n > cfg.max_words:
        return fail("word_count", f"{n} words, not in [{cfg.min_words}, {cfg.max_words}]")
    if not n:  # min_words == 0 and nothing to measure
        return text, None, ""

    mean = sum(map(len, words)) / n
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return fail("mean_word_length",
                    f"mean word length {mean:.2f} not in [{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]")

    # the paper: ratio > 0.1 "for either the hash symbol or the ellipsis", each on its own
    for sym, count in (("#", text.count("#")), ("ellipsis", text.count("...") + text.count("…"))):
        if count / n > cfg.max_symbol_word_ratio:
            return fail("symbol_word_ratio", f"{sym} per word {count / n:.3f} > {cfg.max_symbol_word_ratio}")

    lines = [s for s in (ln.strip() for ln in text.split("\n")) if s]
    bullets = sum(1 for s in lines if s.startswith(BULLETS))
    if bullets / len(lines) > cfg.max_bullet_lines_ratio:
        return fail("bullet_lines_ratio", f"bullet lines {bullets / len(lines):.3f} > {cfg.max_bullet_lines_ratio}")
    ellipsis = sum(1 for s in lines if s.endswith(ELLIPSES))
    if ellipsis / len(lines) > cfg.max_ellipsis_lines_ratio:
        return fail("ellipsis_lines_ratio",
                    f"ellipsis lines {ellipsis / len(lines):.3f} > {cfg.max_ellipsis_lines_ratio}")

    tokens = len(text.split())
    alpha = (tokens - len(_NO_ALPHA_TOKEN.findall(text))) / tokens
    if alpha < cfg.min_alpha_words_ratio:
        return fail("alpha_words_ratio", f"alphabetic words {alpha:.3f} < {cfg.min_alpha_words_ratio}")

    stops = 0
    for _ in _STOP_WORD.finditer(text):  # stop counting once there are enough
        stops += 1
        if stops >= cfg.min_stop_words:
            break
    if stops < cfg.min_stop_words:
        return fail("stop_words", f"{stops} stop words < {cfg.min_stop_words}")
    return text, None, ""
