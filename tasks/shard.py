"""Sharding steps as plain functions: split, train the tokenizer, tokenize a shard, manifest.

The split is by document hash: a document is in `val` iff blake2b(seed, doc id) <= cut, so it
never moves between runs or machines and a document is never in both splits. The cut is
`val_fraction` of the hash range, raised just enough that `min_val_docs` documents land in
val on a small corpus; it is computed once over all ids (a cheap pass over one column).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from core.config import ShardConfig
from core.shard_format import token_type, tokenizer_fingerprint, write_shard

HASH_RANGE = 1 << 64
ENCODE_BATCH = 512  # documents per encode_batch call: big enough for rayon, small enough for RAM


def doc_hash(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "little")


def split_cut(doc_paths: list[str], cfg: ShardConfig) -> int:
    hashes = np.sort(np.fromiter((doc_hash(i, cfg.seed) for p in doc_paths
                                  for i in pq.read_table(p, columns=["id"])["id"].to_pylist()), dtype=np.uint64))
    cut = int(cfg.val_fraction * HASH_RANGE) - 1
    k = min(cfg.min_val_docs, len(hashes) - 1)  # never the whole corpus
    if k > 0 and int(np.searchsorted(hashes, np.uint64(max(cut, 0)), side="right")) < k:
        cut = int(hashes[k - 1])
    return cut


def iter_texts(doc_paths: list[str], cfg: ShardConfig, cut: int, split: str) -> Iterator[str]:
    """Texts of one split, streamed by row group (the corpus never sits in memory whole)."""
    for p in doc_paths:
        f = pq.ParquetFile(p)
        for g in range(f.num_row_groups):
            t = f.read_row_group(g, columns=["id", "text"])
            for i, text in zip(t["id"].to_pylist(), t["text"].to_pylist()):
                if (doc_hash(i, cfg.seed) <= cut) == (split == "val") and text:
                    yield text


def build_tokenizer(doc_paths: list[str], cfg: ShardConfig, cut: int, out_dir: Path) -> dict:
    """Train (or copy the user's) tokenizer into out_dir/tokenizer, atomically; report on it."""
    from tasks import tokenizer as tk

    final = out_dir / "tokenizer"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-tok-") as tmp:
        staged = Path(tmp) / "tokenizer"
        if cfg.tokenizer_path:
            hf = tk.load_user_tokenizer(cfg.tokenizer_path)
            hf.save_pretrained(str(staged))
            trained, name = False, Path(cfg.tokenizer_path).name
        else:
            tok = tk.train_bpe(iter_texts(doc_paths, cfg, cut, "train"), cfg.vocab_size, cfg.min_frequency,
                               cfg.sentinels)
            tk.save_hf(tok, staged, cfg.sentinels)
            trained, name = True, "the refinery BPE trained on the curated text"
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    if trained:   # read back with `tokenizers` alone: transformers (and torch) stay out of the run
        tok = tk.load_trained(final)
        ids, sentinels = tk.native_special_ids(tok)
        vocab = tok.get_vocab_size(with_added_tokens=True)
    else:
        tok = tk.load_user_tokenizer(final)
        ids, sentinels = tk.special_ids(tok)
        vocab = len(tok)
    return {"dir": "tokenizer", "trained": trained, "vocab_size": vocab, "special_ids": ids,
            "sentinel_ids": sentinels, "name": name, "fingerprint": tokenizer_fingerprint(tok)}


def tokenizer_report(doc_paths: list[str], cfg: ShardConfig, cut: int, out_dir: Path, max_texts: int = 2000) -> dict:
    """Compression on held-out (val) kept text against a general tokenizer, and the domain
    words ours keeps whole where the general one splits them."""
    from tasks import tokenizer as tk

    folder = out_dir / "tokenizer"
    ours = tk.load_trained(folder) if (folder / "tokenizer.json").is_file() else \
        tk.load_user_tokenizer(folder).backend_tokenizer
    if cfg.compare_tokenizer:
        general, general_name = tk.load_user_tokenizer(cfg.compare_tokenizer).backend_tokenizer, cfg.compare_tokenizer
    else:
        general = tk.general_tokenizer(ours.get_vocab_size(), cfg.sentinels)
        general_name = f"BPE of the same size on bundled general English ({tk.GENERAL_TEXT.name}/)"
    held_out = []
    for t in iter_texts(doc_paths, cfg, cut, "val"):
        held_out.append(t)
        if len(held_out) >= max_texts:
            break
    train_sample = []
    for t in iter_texts(doc_paths, cfg, cut, "train"):
        train_sample.append(t)
        if len(train_sample) >= max_texts:
            break
    return {"held_out": {"ours": tk.compression(ours, held_out), "general": tk.compression(general, held_out)},
            "general_tokenizer": general_name,
            "domain_words": tk.domain_words(ours, general, train_sample + held_out)}


def tokenize_shard(docs_path: str, shard: str, out_dir: Path, cfg: ShardConfig, cut: int, vocab_size: int) -> dict:
    """Tokenize one curated docs file into train/<shard>.parquet and val/<shard>.parquet."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer" / "tokenizer.json"))
    np_type = token_type(vocab_size).to_pandas_dtype()
    parts = {"train": ([], []), "val": ([], [])}
    empty = 0
    f = pq.ParquetFile(docs_path)
    for g in range(f.num_row_groups):
        t = f.read_row_group(g, columns=["id", "text"])
        ids, texts = t["id"].to_pylist(), t["text"].to_pylist()
        for s in range(0, len(ids), ENCODE_BATCH):
            batch_ids, batch = ids[s:s + ENCODE_BATCH], [x or "" for x in texts[s:s + ENCODE_BATCH]]
            for doc_id, enc in zip(batch_ids, tok.encode_batch_fast(batch, add_special_tokens=False)):
                if not enc.ids:
                    empty += 1  # nothing to learn from; counted, not written
                    continue
                split = "val" if doc_hash(doc_id, cfg.seed) <= cut else "train"
                parts[split][0].append(doc_id)
                parts[split][1].append(np.array(enc.ids, dtype=np_type))
    files = {split: write_shard(d, x, vocab_size, out_dir / split / f"{shard}.parquet", out_dir,
                                cfg.row_group_tokens) for split, (d, x) in parts.items()}
    return {"shard": shard, "files": files, "empty_docs": empty,
            "outputs": [str(out_dir / e["path"]) for e in files.values()]}
