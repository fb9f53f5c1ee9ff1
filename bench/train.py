"""Training throughput: our Lightning path against a plain PyTorch loop, same model, same batch, CPU.

    .venv/bin/python bench/train.py [--preset small] [--seq-len 256] [--batch-size 8] [--steps 40] [--rounds 2]
    bench/gpu.sh     # on a GPU: 125m, bf16-mixed, seq 1024, torch.compile, with MFU

Input: synthetic shards (bench/loader.py's corpus: Zipf ids over GPT-2's 50,257-id vocabulary,
lognormal document lengths) and the same tokens as nanoGPT's train.bin.
  refinery   `models.train.run`: ShardDataModule -> LMModule -> Lightning Trainer (32-true, AdamW,
             warmup + cosine, clipping, metrics.jsonl + CSV + TensorBoard logging, a checkpoint at the end)
  plain      the loop a user writes: nanoGPT's get_batch from the memmap, model(input_ids).logits,
             cross-entropy, backward, clip, AdamW step, LambdaLR step; no logging, no checkpoint
Both build the model from the same transformers config and seed. Tokens per second are measured
over the steps after `--skip` (start-up and the first steps excluded on both sides); best of
`--rounds` interleaved rounds.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loader import EOS, MASK, PAD, VOCAB, make_corpus  # noqa: E402

from models.architectures import build_model, flops_per_token, make_config, n_params  # noqa: E402
from models.module import warmup_cosine  # noqa: E402


def run_refinery(root: Path, out: Path, a) -> tuple[float, int]:
    from models.train import run

    run({"data_dir": str(root), "out_dir": str(out),
         "train": {"arch": "decoder", "preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size,
                   "max_steps": a.steps, "warmup_steps": 5, "lr": 1e-3, "val_every": 10 ** 6, "val_batches": 1,
                   "checkpoint_every": 10 ** 6, "export": False, "accelerator": a.accelerator,
                   "precision": a.precision, "compile": a.compile}})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    a0, a1 = rows[a.skip - 1], rows[-1]
    return a1["elapsed_s"] - a0["elapsed_s"], a1["tokens"] - a0["tokens"]


def run_plain(bin_path: Path, a) -> tuple[float, int]:
    torch.manual_seed(0)
    dev = "cuda" if a.accelerator == "gpu" else "cpu"
    model = build_model(make_config("decoder", a.preset, VOCAB, a.seq_len, {"eos": EOS, "pad": PAD, "mask": MASK}))
    model.to(dev).train()
    if a.precision == "bf16-true":
        model.to(torch.bfloat16)
    fwd = torch.compile(model) if a.compile else model
    autocast = a.precision in ("bf16-mixed", "16-mixed")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 5, a.steps, 0.1))
    B, T = a.batch_size, a.seq_len
    data = np.memmap(bin_path, dtype=np.uint16, mode="r")
    t0 = tokens = 0
    for step in range(1, a.steps + 1):
        if step == a.skip + 1:
            t0, tokens = time.perf_counter(), 0
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        if dev == "cuda":  # nanoGPT: pinned memory, non-blocking copies
            x, y = x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            logits = fwd(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        root.mkdir()
        bin_path, _ = make_corpus(root, 2 * a.steps * a.batch_size * (a.seq_len + 1) + 100_000, 2)
        best = {}
        for r in range(a.rounds):
            for name, fn in (("refinery", lambda: run_refinery(root, Path(tmp) / f"run{r}", a)),
                             ("plain", lambda: run_plain(bin_path, a))):
                sec, tok = fn()
                rate = tok / sec
                best[name] = max(best.get(name, 0.0), rate)
                print(f"round {r + 1} {name:9} {tok:9d} tokens {sec:7.2f} s {rate:9.0f} tok/s", flush=True)
    config = make_config("decoder", a.preset, VOCAB, a.seq_len, {"eos": EOS, "pad": PAD, "mask": MASK})
    n = n_params(build_model(config))
    where = torch.cuda.get_device_name(0) if a.accelerator == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    print(f"decoder {a.preset} ({n / 1e6:.1f}M params, vocab {VOCAB}), B={a.batch_size} T={a.seq_len}, "
          f"{a.precision}{', compiled' if a.compile else ''}, {where}, steps {a.skip + 1}-{a.steps}, best of {a.rounds}")
    peak = None
    if a.accelerator == "gpu":
        from models.planner import peak_flops
        peak = peak_flops(torch.cuda.get_device_name(0), a.precision)
    fpt = flops_per_token(config, n, a.seq_len)
    for label, key in (("plain PyTorch loop  ", "plain"), ("refinery (Lightning)", "refinery")):
        mfu = f"  MFU {best[key] * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        print(f"{label} {best[key]:9.0f} tok/s{mfu}")
    print(f"ratio (ours / plain loop): {best['refinery'] / best['plain']:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
