"""Model-based quality: a fastText classifier of clean reference prose (positives, cut into
paragraph-aligned chunks) against crawl documents (negatives), as in DCLM / FineWeb-Edu."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flows.config import QualityConfig
from tasks import fasttext_model as ft

HIGH, LOW = "hq", "lq"
# Not in QualityConfig (yet): documents are scored (and negatives trained) on their first this-many
# words; fastText averages word vectors, so this bounds cost without changing what it sees much.
MAX_WORDS = 1000
_SUFFIXES = (".txt", ".jsonl", ".parquet")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF|End of (The )?Project Gutenberg)", re.M | re.I)
_WIKITEXT_HEADING = re.compile(r"^ ?(= )+.*?( =)+ ?$", re.M)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"reference path not found: {p}")
    return out


def _clean_txt(text: str) -> str:
    """Drop Project Gutenberg header/licence; lightly detokenize WikiText."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[:m.start()]
    if " @-@ " in text or "<unk>" in text:
        text = _WIKITEXT_HEADING.sub("\n", text)  # '= = Title = =' lines: paragraph breaks
        text = text.replace("<unk>", "")
        text = re.sub(r" @(.)@ ", r"\1", text)  # 1 @,@ 000 -> 1,000 ; well @-@ known -> well-known
        text = re.sub(r" ([.,;:!?)'])", r"\1", text)
        text = re.sub(r"([(]) ", r"\1", text)
        text = re.sub(r"\n(?=\S)", "\n\n", text)  # one paragraph per line
    return text


def _docs(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [d["text"] for line in f if line.strip() and (d := json.loads(line)).get("text")]
    return [_clean_txt(path.read_text(encoding="utf-8", errors="replace"))]


def _chunks(doc: str, chunk_words: int) -> list[str]:
    """Greedy packing of paragraphs into chunks of >= chunk_words words; a paragraph much longer than
    that is split at sentence ends; a short tail joins the previous chunk."""
    units = []
    for para in re.split(r"\n\s*\n", doc):
        words = para.split()
        if len(words) > 1.5 * chunk_words:
            units += [(s, len(s.split())) for s in _SENTENCE.split(" ".join(words))]
        elif words:
            units.append((" ".join(words), len(words)))
    chunks, cur, n = [], [], 0
    for text, k in units:
        cur.append(text)
        n += k
        if n >= chunk_words:
            chunks.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        if chunks and n < chunk_words // 2:
            chunks[-1] += "\n\n" + "\n\n".join(cur)
        else:
            chunks.append("\n\n".join(cur))
    return chunks


def load_reference(paths: list[str], chunk_words: int) -> list[str]:
    """Reference (positive) text from .txt / .jsonl / .parquet files or folders, as ~chunk_words chunks."""
    return [c for f in _files(paths) for doc in _docs(f) for c in _chunks(doc, chunk_words)]


def train_quality(positives: list[str], negatives: list[str], cfg: QualityConfig, out_path) -> dict:
    pairs = [(HIGH, t) for t in positives] + [(LOW, t) for t in negatives]
    info = ft.train_supervised(pairs, out_path, lr=cfg.lr, epoch=cfg.epoch, dim=cfg.dim,
                               word_ngrams=cfg.word_ngrams, bucket=cfg.bucket, seed=cfg.seed,
                               max_words=MAX_WORDS)
    return {"n_pos": len(positives), "n_neg": len(negatives), **info}


def score_quality(model_path, texts: list[str]) -> np.ndarray:
    """P(high quality) in [0, 1] per text, from its first MAX_WORDS words."""
    return ft.prob_of(ft.load(model_path), texts, HIGH, max_words=MAX_WORDS)
