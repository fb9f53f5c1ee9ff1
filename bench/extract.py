"""Ingest + extraction throughput: `extract_shard` against trafilatura in a plain loop.

    .venv/bin/python bench/extract.py [--repeat 2]

The baseline is what a user writes by hand: fastwarc to read the records, decode the
payload, call trafilatura with the same options, keep the text. It is the floor of our
overhead (process isolation, per-page deadlines, rejection accounting, Parquet output).
Input: every bundled WARC concatenated `--repeat` times (gzip members concatenate).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.config import ExtractConfig  # noqa: E402
from tasks.decode import DecodeError  # noqa: E402
from tasks.extract import extract_html, extract_shard, payload_to_html  # noqa: E402
from tasks.warc import iter_records  # noqa: E402
from tasks.workers import close_all  # noqa: E402


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


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.warc.gz"
        build_corpus(corpus, args.repeat)
        pages = sum(1 for r in iter_records(corpus) if not r.error)
        cfg = ExtractConfig()
        plain_loop(corpus, cfg)  # warm the page cache and trafilatura's lazy imports
        base_s, base_docs = timed(lambda: plain_loop(corpus, cfg))
        rows = [("trafilatura plain loop", 1, base_s, base_docs)]
        for workers in (1, 2):
            c = ExtractConfig(workers=workers)
            s, docs = timed(lambda: extract_shard(corpus, Path(tmp) / f"w{workers}", "bench", c).docs)
            close_all()  # each measurement pays its own worker start-up
            rows.append((f"refinery extract_shard, {workers} worker(s)", workers, s, docs))
    print(f"corpus: {pages} page records ({corpus.name} x{args.repeat}), cores: {os.cpu_count()}")
    print(f"{'run':42} {'docs':>5} {'seconds':>8} {'pages/s':>8} {'pages/s/core':>12} {'vs plain':>9}")
    one = None
    for name, w, s, docs in rows:
        pps = pages / s
        one = pps if w == 1 and name.startswith("refinery") else one
        print(f"{name:42} {docs:5d} {s:8.2f} {pps:8.2f} {pps / w:12.2f} {pps / (pages / base_s):9.2f}")
    print(f"2 workers / 1 worker speed-up: {(pages / rows[2][2]) / one:.2f}x")


if __name__ == "__main__":
    main()
