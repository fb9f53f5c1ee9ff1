"""Tokenization throughput: `refinery shard`'s per-shard step against `encode_batch` in a plain loop.

    .venv/bin/python bench/shard.py [--repeat 4] [--rounds 3]

Input: every bundled reference text (WikiText-2, Gutenberg novels, inaugural addresses), split
into paragraphs-as-documents and repeated `--repeat` times, as one curated docs Parquet file.
Both sides read the same Parquet column and use the same trained tokenizer (all cores, as
`tokenizers` does by default). The baseline is the loop a user writes: read the texts, call
`Tokenizer.encode_batch` on batches of 512, keep the ids. Ours is `tasks.shard.tokenize_shard`:
the same plus the split hash per document, uint16 arrays, and two zstd Parquet shards written
atomically with row groups. Interleaved rounds, best of each.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from core.config import ShardConfig  # noqa: E402
from tasks import tokenizer as tk  # noqa: E402
from tasks.shard import ENCODE_BATCH, tokenize_shard  # noqa: E402


def build_docs(path: Path, repeat: int) -> int:
    paras = []
    for f in sorted(tk.GENERAL_TEXT.rglob("*.txt")):
        paras += [p for p in f.read_text(encoding="utf-8", errors="replace").split("\n\n") if len(p) > 200]
    texts = [p for r in range(repeat) for p in paras]
    ids = [f"{r}-{i}" for r in range(repeat) for i in range(len(paras))]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, compression="zstd")
    return sum(len(t) for t in texts)


def plain_loop(docs: Path, tok_json: Path) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_json))
    texts = pq.read_table(docs, columns=["text"])["text"].to_pylist()
    n = 0
    for s in range(0, len(texts), ENCODE_BATCH):
        for enc in tok.encode_batch(texts[s:s + ENCODE_BATCH]):
            n += len(enc.ids)
    return n


def ours(docs: Path, out: Path, vocab: int) -> int:
    r = tokenize_shard(str(docs), "bench", out, ShardConfig(val_fraction=0.01), int(0.01 * 2**64), vocab)
    return sum(f["tokens"] for f in r["files"].values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = tmp / "docs.parquet"
        chars = build_docs(docs, args.repeat)
        out = tmp / "out"
        texts = pq.read_table(docs, columns=["text"])["text"].to_pylist()
        tok = tk.train_bpe(texts[: len(texts) // args.repeat], 8192, 2, 100)
        tk.save_hf(tok, out / "tokenizer", 100)
        tok_json = out / "tokenizer" / "tokenizer.json"
        print(f"input: {len(texts)} documents, {chars / 1e6:.1f} M characters; tokenizer vocab 8192")
        best = {"plain": float("inf"), "ours": float("inf")}
        tokens = {}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            tokens["plain"] = plain_loop(docs, tok_json)
            best["plain"] = min(best["plain"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            tokens["ours"] = ours(docs, out, 8192)
            best["ours"] = min(best["ours"], time.perf_counter() - t0)
        assert tokens["plain"] == tokens["ours"], tokens
        for k, label in (("plain", "tokenizers encode_batch loop"), ("ours", "refinery tokenize_shard")):
            print(f"{label:32s} {tokens[k]:>11,} tokens {best[k]:7.2f} s {tokens[k] / best[k] / 1e6:6.2f} M tok/s "
                  f"{chars / best[k] / 1e6:6.2f} M chars/s")
        print(f"ratio (ours / plain loop): {best['plain'] / best['ours']:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
