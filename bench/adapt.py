"""Domain adaptation, measured: LoRA on SmolLM2-135M with a domain's documents, bits per byte on
unseen documents of the domain and on general prose, before and after.

    .venv/bin/python bench/adapt.py --domain legal      # ~15 min on 2 CPU cores
    .venv/bin/python bench/adapt.py --domain medical

Data: ../shared/data/domains/DOMAIN/docs.jsonl (cleaned, deduplicated real documents: see its
README) split by a hash of the id: `--test-docs` unseen documents for the test set, the rest for
fine-tuning. General prose: documents of ../shared/data/domains/general, never trained on.
What runs is the project's own path, nothing bench-only:

    base tokenizer -> shard flow (--tokenizer BASE) -> finetune flow (LoRA) -> its eval stage

The eval stage scores the base and the merged model on both test sets (bits per byte); this script
reads eval.json / eval-base.json and prints the change against the targets (domain at least 15%
lower, general at most 3% higher). Results: bench/out/adapt-DOMAIN.json (OUT.json for --out OUT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

SHARED = ROOT.parent / "shared" / "data" / "domains"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]  # not splitlines: U+2028 sits inside strings


def split(docs: list[dict], n_test: int) -> tuple[list[dict], list[dict]]:
    """Test: the n_test documents with the smallest crc32(id) (a fixed, content-blind choice)."""
    order = sorted(docs, key=lambda d: zlib.crc32(d["id"].encode()))
    return order[n_test:], order[:n_test]


def write_jsonl(docs: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="legal", help="a folder of ../shared/data/domains")
    ap.add_argument("--base", default=str(ROOT / ".cache" / "models" / "smollm2-135m"),
                    help="the base model (default: SmolLM2-135M, fetched by the test suite into .cache/models)")
    ap.add_argument("--out", default=None, help="default: bench/out/adapt-DOMAIN")
    ap.add_argument("--test-docs", type=int, default=24, help="unseen domain documents (and general ones) scored")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024, help="eval window")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    out = Path(a.out or ROOT / "bench" / "out" / f"adapt-{a.domain}")
    out.mkdir(parents=True, exist_ok=True)

    from core.config import RefineryConfig
    from flows.shard import shard_flow
    from flows.train import finetune_flow
    from models.finetune import prepare_tokenizer
    from tests.smollm import fetch_smollm2, write_docs

    if not Path(a.base).exists() and a.base == str(ROOT / ".cache" / "models" / "smollm2-135m"):
        fetch_smollm2()
    train, test = split(read_jsonl(SHARED / a.domain / "docs.jsonl"), a.test_docs)
    _, general = split(read_jsonl(SHARED / "general" / "docs.jsonl"), a.test_docs)
    test_path = write_jsonl(test, out / "data" / f"{a.domain}-unseen.jsonl")
    general_path = write_jsonl(general, out / "data" / "general-prose.jsonl")
    t0 = time.time()
    tok = prepare_tokenizer(a.base, out / "base-tokenizer")
    write_docs([d["text"] for d in train], out / "curated", a.domain)
    cfg = RefineryConfig.model_validate({
        "shard": {"tokenizer_path": str(tok), "val_fraction": 0.01, "min_val_docs": 4, "row_group_tokens": 50_000},
        "train": {"seq_len": a.seq_len, "batch_size": a.batch_size, "max_steps": a.steps, "lr": a.lr,
                  "warmup_steps": max(1, a.steps // 20), "val_every": max(1, a.steps // 4), "val_batches": 4,
                  "checkpoint_every": a.steps, "accelerator": "cpu"},
        "finetune": {"lora_r": a.rank, "lora_alpha": a.alpha},
        "eval": {"data": [str(test_path), str(general_path)], "context": a.context, "batch_size": 4,
                 "max_documents": a.test_docs}})
    shard_flow(str(out / "curated"), str(out / "shards"), cfg)
    t_shard = time.time() - t0
    result = finetune_flow(a.base, str(out / "shards"), str(out / "run"), "lora", cfg)
    wall = time.time() - t0
    tuned = json.loads((out / "run" / "eval.json").read_text())["datasets"]
    base = json.loads((out / "run" / "eval-base.json").read_text())["datasets"]
    rows = {}
    for name, target in ((test_path.stem, -15.0), (general_path.stem, 3.0)):
        b, t = base[name]["bits_per_byte"], tuned[name]["bits_per_byte"]
        change = 100 * (t / b - 1)
        met = change <= target
        rows[name] = {"base_bpb": round(b, 4), "tuned_bpb": round(t, 4), "change_pct": round(change, 2),
                      "target_pct": target, "met": met, "documents": tuned[name]["documents"],
                      "bytes": tuned[name]["bytes"]}
    curve = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    report = {"domain": a.domain, "base": a.base, "train_docs": len(train), "test_docs": len(test),
              "train_tokens": result.tokens_seen, "steps": result.steps,
              "settings": {k: getattr(a, k) for k in ("steps", "seq_len", "batch_size", "lr", "rank", "alpha",
                                                      "context")},
              "val_loss_curve": [(r["step"], round(r["val_loss"], 4)) for r in curve],
              "train_wall_s": result.wall_s, "shard_s": round(t_shard, 1), "total_wall_s": round(wall, 1),
              "results": rows}
    (out.parent / f"{out.name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    for name, r in rows.items():
        print(f"{name:>22}: {r['base_bpb']:.4f} -> {r['tuned_bpb']:.4f} bits/byte ({r['change_pct']:+.2f}%, "
              f"target {r['target_pct']:+.0f}%: {'met' if r['met'] else 'MISSED'})")


if __name__ == "__main__":
    main()
