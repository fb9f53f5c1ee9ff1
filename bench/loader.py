"""Causal-LM batch throughput: `ShardDataModule` against nanoGPT's memmap loader, same tokens.

    .venv/bin/python bench/loader.py [--tokens 64000000] [--batch-size 16] [--seq-len 1024] [--rounds 3]

Input: synthetic documents, written once into a temp dir two ways: (1) as refinery shards with
`write_shard` (zstd Parquet, row groups of 2^20 tokens, 8 files, uint16 ids) plus a manifest,
(2) as nanoGPT's train.bin, a flat uint16 array of the same documents each followed by EOS.
Token ids are Zipf-distributed (a=1.2) over a 50257-id vocabulary, document lengths lognormal
(median ~450, mean ~600 tokens), the shape of web text tokenized with a GPT-2-size BPE.

Loaders, one process each (num_workers=0), (B, T) int64 input and label tensors:
  refinery       ShardDataModule(objective="causal").train_dataloader(): one full epoch, which
                 reads and decompresses every row group, shuffles documents inside each, packs.
  nanoGPT        `get_batch` from nanoGPT's train.py: a fresh np.memmap per call, B random offsets,
                 per-row slice + astype + torch.stack; as many batches as refinery's epoch.
  memmap-seq     the floor of any loader: one contiguous slice of the memmap per batch, cut into
                 windows with numpy (no per-row Python); sequential over the file.
Each measurement is the best of `--rounds`, interleaved; files are in the page cache for all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import ShardDataModule  # noqa: E402
from core.io import file_sha256  # noqa: E402
from core.shard_format import FORMAT, write_shard  # noqa: E402

VOCAB, EOS, PAD, MASK = 50257, 0, 1, 2


def make_corpus(root: Path, n_tokens: int, n_files: int, seed: int = 0) -> tuple[Path, int]:
    """Shards + manifest under root, and root/train.bin; returns (bin path, documents)."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        lengths += np.maximum(1, rng.lognormal(6.1, 0.8, 10000).astype(np.int64)).tolist()
    lengths = np.array(lengths)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    flat = np.minimum(rng.zipf(1.2, int(lengths.sum())), VOCAB - 1 - 103).astype(np.uint16) + 103  # above specials
    docs = np.split(flat, np.cumsum(lengths)[:-1])
    tok = root / "tokenizer" / "tokenizer.json"  # verify() hashes it; the bench never tokenizes
    tok.parent.mkdir(parents=True)
    tok.write_text('{"synthetic": true}')
    files, per = [], -(-len(docs) // n_files)
    for i in range(n_files):
        part = docs[i * per:(i + 1) * per]
        files.append(write_shard([f"d{i}-{k}" for k in range(len(part))], part, VOCAB,
                                 root / "train" / f"{i:03d}.parquet", root, 1 << 20))
    tokenizer = {"dir": "tokenizer", "sha256": file_sha256(tok), "vocab_size": VOCAB, "dtype": "uint16",
                 "special_ids": {"eos": EOS, "pad": PAD, "mask": MASK}, "sentinel_ids": list(range(3, 103))}
    manifest = {"format": FORMAT, "tokenizer": tokenizer,
                "source": {"inputs": [], "sha256": ""}, "config": {"bench": True},
                "splits": {"train": {"docs": len(docs), "tokens": int(lengths.sum()), "files": files},
                           "val": {"docs": 0, "tokens": 0, "files": []}},
                "totals": {"docs": len(docs), "tokens": int(lengths.sum())}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    stream = np.insert(flat, np.cumsum(lengths), np.uint16(EOS))  # nanoGPT's prepare.py appends EOT per doc
    bin_path = root / "train.bin"
    stream.tofile(bin_path)
    return bin_path, len(docs)


def run_refinery(root: Path, B: int, T: int) -> tuple[float, int, int]:
    dm = ShardDataModule(root, seq_len=T, batch_size=B, verify="size")
    dm.setup()
    t0 = time.perf_counter()
    n = tokens = 0
    for batch in dm.train_dataloader():
        tokens += batch["input_ids"].numel()
        n += 1
    return time.perf_counter() - t0, n, tokens


def run_nanogpt(bin_path: Path, B: int, T: int, n_batches: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):  # nanoGPT train.py get_batch('train'), device 'cpu'
        data = np.memmap(bin_path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy((data[i:i + T]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + T]).astype(np.int64)) for i in ix])
        tokens += x.numel()
    return time.perf_counter() - t0, n_batches, tokens


def run_memmap_seq(bin_path: Path, B: int, T: int) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    n = tokens = 0
    for s in range(0, len(data) - B * T, B * T):
        chunk = np.asarray(data[s:s + B * T + 1])
        win = np.lib.stride_tricks.as_strided(chunk, (B, T + 1), (2 * T, 2))
        x, y = torch.from_numpy(win[:, :-1].astype(np.int64)), torch.from_numpy(win[:, 1:].astype(np.int64))
        tokens += x.numel()
        n += 1
    return time.perf_counter() - t0, n, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        bin_path, n_docs = make_corpus(root, args.tokens, args.files)
        shard_bytes = sum(p.stat().st_size for p in (root / "train").glob("*.parquet"))
        print(f"corpus: {n_docs} docs, {bin_path.stat().st_size // 2} tokens incl. EOS (synthetic Zipf ids, "
              f"lognormal lengths); shards {shard_bytes / 2**20:.0f} MiB zstd, train.bin "
              f"{bin_path.stat().st_size / 2**20:.0f} MiB; built in {time.perf_counter() - t0:.0f} s")
        B, T = args.batch_size, args.seq_len
        best: dict[str, tuple[float, int, int]] = {}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all loaders alike
            r = run_refinery(root, B, T)
            runs = {"refinery": r, "nanoGPT": run_nanogpt(bin_path, B, T, r[1]),
                    "memmap-seq": run_memmap_seq(bin_path, B, T)}
            for k, v in runs.items():
                best[k] = min(best.get(k, v), v)
    print(f"B={B} T={T}, num_workers=0, {os.cpu_count()} cores, best of {args.rounds}")
    print(f"{'loader':12} {'batches':>8} {'tokens':>11} {'seconds':>8} {'Mtok/s':>8} {'refinery / this':>16}")
    rate = {k: v[2] / v[0] for k, v in best.items()}
    for k, (s, n, tok) in best.items():
        print(f"{k:12} {n:8d} {tok:11d} {s:8.2f} {rate[k] / 1e6:8.1f} {rate['refinery'] / rate[k]:16.2f}")


if __name__ == "__main__":
    main()
