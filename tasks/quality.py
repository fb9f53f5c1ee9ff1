"""Model-based quality and domain selection: a classifier of reference text (positives, cut into
paragraph-aligned chunks) against crawl documents and/or a general background (negatives).

The method is `curate.quality.method`; each is one file with `train(positives, negatives, path, ...)`
and `score(path, texts)` (tasks/select_*.py). bench/selection.py measures them side by side."""
from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.config import QualityConfig
from core.guard import files_under
from tasks import fasttext_model as ft
from tasks.select_io import method_of

METHODS = {"tfidf": "tasks.select_tfidf", "fasttext": "tasks.select_fasttext", "dsir": "tasks.select_dsir",
           "moore-lewis": "tasks.select_moore_lewis", "embedding": "tasks.select_embed"}
_SUFFIXES = (".txt", ".jsonl", ".parquet")
_NOT_TEXT = {"SOURCE.txt", "README.txt", "LICENSE.txt"}  # provenance notes beside the data, not reference text
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF|End of (The )?Project Gutenberg)", re.M | re.I)
_WIKITEXT_HEADING = re.compile(r"^ ?(= )+.*?( =)+ ?$", re.M)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _files(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += files_under(p, lambda f: f.suffix in _SUFFIXES and f.name not in _NOT_TEXT)
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


def _module(method: str):
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; one of {sorted(METHODS)}")
    return importlib.import_module(METHODS[method])


def model_filename(method: str) -> str:
    return "quality.bin" if method == "fasttext" else "quality.npz"


def _params(cfg: QualityConfig) -> dict:
    return {"seed": cfg.seed, "lr": cfg.lr, "epoch": cfg.epoch, "dim": cfg.dim, "word_ngrams": cfg.word_ngrams,
            "bucket": cfg.bucket, "c": cfg.tfidf_c}


def _held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8", "replace")) % 5 == 0


def fold_of(doc_id: str, folds: int) -> int:
    return zlib.crc32(doc_id.encode("utf-8", "replace")) % folds


def fold_path(path, k: int) -> Path:
    """quality.npz -> quality.fold0.npz: the model that never saw crawl fold k."""
    p = Path(path)
    return p.with_name(f"{p.stem}.fold{k}{p.suffix}")


def train_quality(positives: list[str], crawl: list[str], cfg: QualityConfig, out_path,
                  background: list[str] | None = None, crawl_ids: list[str] | None = None) -> dict:
    """Train `cfg.method` on positives against the negatives `cfg.negatives` names (crawl documents,
    the background corpus, or both) and save it to out_path.

    With `cfg.pu_rounds`, crawl negatives that the model scores like the reference (at or above the
    10th percentile of the positives' scores) are taken out and the model retrained: the crawl holds
    the domain too, and a model told those pages are negatives learns to rank them low.
    A fifth of each side (by a hash of the text) is first held out to measure how well the method
    separates text it did not see; the saved model is then trained on everything.
    Cross-fitting (`cfg.crossfit_folds` >= 2, with `crawl_ids`): one more model per fold of the crawl
    (by a hash of the document id), trained without that fold's documents, saved as fold_path(out, k).
    `score_crawl` scores every crawl document with the model that never saw it: a model that has
    memorised its negatives ranks a small crawl by how hard each page was to memorise (on the bundled
    sample, a long listicle above every news article)."""
    mod, params = _module(cfg.method), _params(cfg)
    background = background or []
    use_crawl = cfg.negatives in ("crawl", "crawl+background")
    use_bg = cfg.negatives in ("background", "crawl+background")
    crawl_negs, bg_negs = (crawl if use_crawl else []), (background if use_bg else [])
    ids = list(crawl_ids) if crawl_ids is not None and use_crawl else None
    if ids is not None and len(ids) != len(crawl_negs):
        raise ValueError(f"quality: {len(ids)} crawl ids for {len(crawl_negs)} crawl texts")
    if not positives:
        raise ValueError("quality: the reference holds no text")
    if not crawl_negs and not bg_negs:
        raise ValueError(f"quality: no negatives (negatives={cfg.negatives!r}: "
                         f"{len(crawl)} crawl documents, {len(background)} background texts)")
    t0 = time.perf_counter()
    out = Path(out_path)
    pool = crawl_negs + bg_negs                    # every negative; the models below train on subsets
    fit = _fitter(mod, params, positives, pool)
    all_pos = np.arange(len(positives))
    crawl_idx, bg_idx = np.arange(len(crawl_negs)), np.arange(len(crawl_negs), len(pool))
    dropped = 0
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        scratch = Path(tmp) / out.name
        for _ in range(cfg.pu_rounds if len(crawl_idx) else 0):
            fit(all_pos, np.r_[crawl_idx, bg_idx], scratch)
            cutoff = np.quantile(mod.score(scratch, positives), 0.1)
            keep = mod.score(scratch, [pool[i] for i in crawl_idx]) < cutoff
            dropped += int((~keep).sum())
            crawl_idx = crawl_idx[keep]
        neg_idx = np.r_[crawl_idx, bg_idx]
        jobs = {"holdout": lambda: _holdout_auc(mod, fit, positives, pool, neg_idx, scratch),
                "main": lambda: fit(all_pos, neg_idx, out)}
        folds = []
        if cfg.crossfit_folds > 1 and ids:
            fold = np.array([fold_of(ids[i], cfg.crossfit_folds) for i in crawl_idx], dtype=np.int64)
            for k in range(cfg.crossfit_folds):
                rest = np.r_[crawl_idx[fold != k], bg_idx]
                jobs[k] = lambda rest=rest, k=k: fit(all_pos, rest, fold_path(out, k))
                folds.append(str(fold_path(out, k)))
        # models trained out of process (fastText: single-threaded, seeded) give the same bytes side by
        # side as one after another; in-process ones stay sequential (BLAS thread limits are per process)
        workers = min(len(jobs), _cores()) if getattr(mod, "TRAINS_OUT_OF_PROCESS", False) else 1
        with ThreadPoolExecutor(max_workers=workers) as ex:
            done = {name: ex.submit(job) for name, job in jobs.items()}
            holdout, info = done["holdout"].result(), done["main"].result()
            for f in done.values():
                f.result()
    return {**info, "fit_seconds": info.get("train_seconds"), "method": cfg.method, "negatives": cfg.negatives,
            "n_pos": len(positives), "n_neg": len(neg_idx), "n_neg_crawl": len(crawl_idx),
            "n_neg_background": len(bg_idx), "pu_rounds": cfg.pu_rounds, "pu_dropped": dropped, **holdout,
            "fold_paths": folds, "train_seconds": round(time.perf_counter() - t0, 3)}


def _fitter(mod, params: dict, positives: list[str], negatives: list[str]):
    """fit(positive rows, negative rows, path): one model on subsets of the texts. A method with
    `counts` and `train_counts` (tfidf) featurises every text once, here, and each model slices rows:
    the same matrices, so the same models, as featurising each subset again (a third of the CPU)."""
    if hasattr(mod, "train_counts"):
        pos, neg = mod.counts(positives), mod.counts(negatives)
        return lambda pi, ni, path: mod.train_counts(pos[pi], neg[ni], path, **params)
    return lambda pi, ni, path: mod.train([positives[i] for i in pi], [negatives[i] for i in ni], path, **params)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _holdout_auc(mod, fit, positives: list[str], negatives: list[str], neg_idx: np.ndarray,
                 scratch: Path) -> dict:
    """ROC-AUC on a fifth of each side (by a hash of the text) of a model trained on the rest."""
    hp = np.array([_held_out(t) for t in positives], dtype=bool)
    hn = np.array([_held_out(negatives[i]) for i in neg_idx], dtype=bool)
    pos_test = [t for t, h in zip(positives, hp) if h]
    neg_test = [negatives[i] for i in neg_idx[hn]]
    if min(len(pos_test), len(neg_test)) < 3 or hp.all() or hn.all():
        return {"holdout_auc": None, "holdout_pos": len(pos_test), "holdout_neg": len(neg_test)}
    fit(np.flatnonzero(~hp), neg_idx[~hn], scratch)
    s = np.r_[mod.score(scratch, pos_test), mod.score(scratch, neg_test)]
    auc = ft.roc_auc(np.r_[np.ones(len(pos_test)), np.zeros(len(neg_test))], s)
    return {"holdout_auc": round(auc, 4), "holdout_pos": len(pos_test), "holdout_neg": len(neg_test)}


def score_quality(model_path, texts: list[str]) -> np.ndarray:
    """The model's score per text (higher: more like the reference); the method is read off the file."""
    return _module(method_of(model_path)).score(model_path, texts)


def score_crawl(model_path, texts: list[str], ids: list[str], fold_paths: list[str]) -> np.ndarray:
    """Scores of crawl documents: each by the fold model that did not train on it (by its id's fold),
    or all by model_path when there are no fold models."""
    if not fold_paths:
        return score_quality(model_path, texts)
    folds = np.array([fold_of(i, len(fold_paths)) for i in ids], dtype=np.int64)
    out = np.zeros(len(texts))
    for k, path in enumerate(fold_paths):
        idx = np.flatnonzero(folds == k)
        if len(idx):
            out[idx] = score_quality(path, [texts[i] for i in idx])
    return out
