"""Decontamination: drop crawl documents that share a word n-gram with an evaluation set.

The GPT-3 paper (Brown et al. 2020, Appendix C) and DataTrove's n-gram decontamination remove
training documents that share any 13-gram with a benchmark. Here:

- Text is normalised the way the rest of curation counts words: lowercased, then the `\\w+`
  matches (`core.text.WORD`). Case, punctuation and whitespace never matter;
  "don't" is the two words "don" and "t" on both sides.
- Each word gets a stable 64-bit hash (blake2b, digest_size=8: the same in every process,
  unlike Python's `hash()`); an n-gram's hash is a polynomial of its words' hashes mod 2**64,
  computed for all positions of a document at once with numpy (n vector operations).
- The evaluation sets (`core.eval_data.load_eval_set`: .txt, .jsonl, .parquet, folders,
  shard folders) become one sorted, deduplicated uint64 array, built once per process for each
  (paths, their files' sizes and mtimes, n). A document's n-gram hashes are looked up with
  `np.searchsorted` (O(m log N); `np.isin` would sort the whole index again for every document).
- Evaluation texts shorter than n words contribute nothing (they are counted as `skipped_short`):
  a 3-word answer matched anywhere in the crawl would remove pages for sharing a common phrase.

A hash collision could remove a clean document (chance ~ m * N / 2**64 per document: nil in
practice); it can never keep a contaminated one.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.config import DecontaminateConfig
from core.text import WORD  # the `\w+` words of count_words: one definition of a word
from tasks.steps import KEEP, Verdict

_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the n-gram polynomial (2**64 / golden ratio)
DETAIL_CHARS = 160


@lru_cache(maxsize=1 << 18)   # a web vocabulary's frequent words (~50 MB at most); 3-4x faster than blake2b each time
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def words_of(text: str) -> list[str]:
    """The normalised words: lowercased `\\w+` matches."""
    return WORD.findall(text.lower())


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """uint64 hashes of every n-gram of `words` in order (empty when there are fewer than n)."""
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.fromiter(map(_word_hash, words), dtype=np.uint64, count=len(words))
    acc = h[:m].copy()
    for j in range(1, n):   # acc = sum_j h[i+j] * P**(n-1-j), wrapping mod 2**64
        acc *= _P
        acc += h[j:j + m]
    return acc


@dataclass(frozen=True)
class NgramIndex:
    n: int
    hashes: np.ndarray           # sorted, unique uint64 n-gram hashes of every evaluation text
    sources: np.ndarray          # for each hash, the index into `names` of the first set that has it
    names: tuple[str, ...]       # the evaluation sets, as given
    texts: int                   # evaluation texts read
    skipped_short: int           # of them, shorter than n words: not indexed

    def contaminated(self, text: str) -> tuple[bool, str]:
        """(True, detail) when `text` shares an n-gram with an evaluation text; detail quotes the
        first shared n-gram (normalised, truncated) and names its evaluation set."""
        if not len(self.hashes):
            return False, ""
        words = words_of(text)
        grams = ngram_hashes(words, self.n)
        if not len(grams):
            return False, ""
        pos = np.searchsorted(self.hashes, grams)
        np.minimum(pos, len(self.hashes) - 1, out=pos)
        hit = self.hashes[pos] == grams
        if not hit.any():
            return False, ""
        i = int(hit.argmax())
        gram = " ".join(words[i:i + self.n])
        if len(gram) > DETAIL_CHARS:
            gram = gram[:DETAIL_CHARS - 3] + "..."
        return True, f'"{gram}" (word {i}) in {self.names[int(self.sources[pos[i]])]}'


def build_index(paths: list[str] | tuple[str, ...], n: int) -> NgramIndex:
    """Read every evaluation set and hash its n-grams (uncached: see `load_index`)."""
    from core.eval_data import load_eval_set

    parts, srcs, texts, short = [], [], 0, 0
    for k, p in enumerate(paths):
        for t in load_eval_set(p).texts:
            texts += 1
            g = ngram_hashes(words_of(t), n)
            if not len(g):
                short += 1
                continue
            parts.append(g)
            srcs.append(np.full(len(g), k, dtype=np.uint16))
    allh = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    alls = np.concatenate(srcs) if srcs else np.zeros(0, dtype=np.uint16)
    hashes, first = np.unique(allh, return_index=True)
    return NgramIndex(n, hashes, alls[first], tuple(str(p) for p in paths), texts, short)


def _stamp(path: str) -> tuple:
    """What says an evaluation set changed: (file, size, mtime) of every file of it."""
    p = Path(path).expanduser()
    files = [p] if not p.is_dir() else sorted(f for f in p.rglob("*") if f.is_file())
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


_lock = threading.Lock()


@lru_cache(maxsize=4)
def _cached(paths: tuple[str, ...], stamps: tuple, n: int) -> NgramIndex:
    return build_index(paths, n)


def load_index(paths: list[str] | tuple[str, ...], n: int = 13) -> NgramIndex:
    """The index of these evaluation sets, built once per process (per paths, file sizes and mtimes,
    and n) and shared by the shard tasks that run in it."""
    key = tuple(str(p) for p in paths)
    with _lock:   # concurrent shard threads wait for one build instead of each doing it
        return _cached(key, tuple(_stamp(p) for p in key), n)


def decontaminate_step(docs, cfg: DecontaminateConfig):
    """The filter step (tasks.curate.FILTER_STEPS; only with `paths`): drops each document, as the earlier
    steps left its text (C4-edited), that shares an n-gram with the evaluation sets."""
    index = load_index(cfg.paths, cfg.ngram)   # once per process
    reason = f"eval {cfg.ngram}-gram"
    for d in docs:
        hit, detail = index.contaminated(d["text"])
        yield Verdict(False, reason, detail) if hit else KEEP
