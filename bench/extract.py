"""Ingest + extraction throughput: `extract_shard` against trafilatura in a plain loop.

    .venv/bin/python bench/extract.py [--repeat 3] [--rounds 2]

The baseline is what a user writes by hand: fastwarc to read the records, decode the
payload, call trafilatura with the same options, keep the text. It is the floor of our
overhead (process isolation, per-page deadlines, rejection accounting, Parquet output).
Input: every bundled WARC concatenated `--repeat` times (gzip members concatenate).
Each run is a fresh process, timed from start to exit, as a user would run either.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.config import ExtractConfig  # noqa: E402
from tasks.decode import DecodeError  # noqa: E402
from tasks.extract import extract_html, extract_shard, payload_to_html  # noqa: E402
from tasks.warc import iter_records  # noqa: E402


def build_corpus(path: Path, repeat: int) -> None:
    files = [ROOT / "sample" / "pages.warc.gz"] + sorted((ROOT / "sample" / "warc").glob("*.warc.gz"))
    with open(path, "wb") as out:
        for _ in range(repeat):
            for f in files:
                out.write(f.read_bytes())


def plain_loop(path: Path, cfg: ExtractConfig) -> int:
    opts = cfg.model_dump()
    n = 0
    for rec in iter_records(path):
        try:
            html, _ = payload_to_html(rec, cfg)
        except DecodeError:
            continue
        if extract_html(html, rec.url, opts):
            n += 1
    return n


def run_variant(variant: str, corpus: Path, out: Path) -> int:
    if variant == "plain":
        return plain_loop(corpus, ExtractConfig())
    workers = int(variant.removeprefix("refinery-"))
    return extract_shard(corpus, out, "bench", ExtractConfig(workers=workers)).docs


def timed_subprocess(variant: str, corpus: Path, out: Path) -> tuple[float, int]:
    """Wall time of a fresh process, imports and worker start-up included: what a user pays."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--variant", variant, "--corpus", str(corpus), "--out", str(out)],
                       check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, int(p.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs per variant; the best is kept")
    ap.add_argument("--variant")
    ap.add_argument("--corpus")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.variant:  # child process: one measurement
        print(run_variant(args.variant, Path(args.corpus), Path(args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.warc.gz"
        build_corpus(corpus, args.repeat)
        pages = sum(1 for r in iter_records(corpus) if not r.error)
        variants = [("trafilatura plain loop", "plain", 1), ("refinery extract_shard, 1 worker", "refinery-1", 1),
                    ("refinery extract_shard, 2 workers", "refinery-2", 2)]
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all variants alike
            for _, v, _ in variants:
                s, docs = timed_subprocess(v, corpus, Path(tmp) / v)
                best[v] = min(best.get(v, (s, docs)), (s, docs))
    print(f"corpus: {pages} page records (bundled WARCs x{args.repeat}), cores: {os.cpu_count()}, "
          f"best of {args.rounds} fresh-process runs each")
    print(f"{'run':36} {'docs':>5} {'seconds':>8} {'pages/s':>8} {'pages/s/worker':>14} {'vs plain':>9}")
    base = pages / best["plain"][0]
    for name, v, w in variants:
        s, docs = best[v]
        print(f"{name:36} {docs:5d} {s:8.2f} {pages / s:8.2f} {pages / s / w:14.2f} {pages / s / base:9.2f}")
    print(f"2 workers / 1 worker: {best['refinery-1'][0] / best['refinery-2'][0]:.2f}x")


if __name__ == "__main__":
    main()
