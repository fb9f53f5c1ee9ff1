"""Extraction on real pages: quality against trafilatura itself, hard timeouts, rejections."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import trafilatura

from core.config import ExtractConfig
from tasks.extract import extract_shard, payload_to_html
from tasks.warc import iter_records
from tasks.workers import ItemFailed, TimeoutPool, borrow_pool, close_all, prestart

SAMPLE = Path(__file__).resolve().parent.parent / "sample"


def _gold_score(texts: dict[str, str], gold: dict) -> tuple[int, int]:
    hits = total = 0
    for url, g in gold.items():
        text = texts.get(url, "")
        for s in g["with"]:
            hits += s in text
            total += 1
        for s in g["without"]:
            hits += s not in text
            total += 1
    return hits, total


def test_gold_snippets_at_least_as_good_as_trafilatura_direct(tmp_path):
    gold = {g["url"]: g for g in json.loads((SAMPLE / "gold_snippets.json").read_text()).values()}
    res = extract_shard(SAMPLE / "pages.warc.gz", tmp_path, "pages", ExtractConfig())
    docs = pq.read_table(res.docs_path).to_pylist()
    ours = {d["url"]: d["text"] for d in docs}
    # the baseline: trafilatura's own defaults on the same raw HTML
    direct = {}
    for rec in iter_records(SAMPLE / "pages.warc.gz"):
        if rec.url in gold:
            direct[rec.url] = trafilatura.extract(rec.payload, url=rec.url) or ""
    gold = {u: g for u, g in gold.items() if u in direct}
    assert len(gold) == 40
    ours_hits, total = _gold_score(ours, gold)
    direct_hits, _ = _gold_score(direct, gold)
    print(f"gold snippets: ours {ours_hits}/{total}, trafilatura direct {direct_hits}/{total}")
    assert ours_hits >= direct_hits
    assert ours_hits / total > 0.8


def test_documents_have_the_promised_schema_and_ids_are_stable(tmp_path):
    a = extract_shard(SAMPLE / "warc" / "dolma-sample-0001.warc.gz", tmp_path / "a", "s", ExtractConfig())
    b = extract_shard(SAMPLE / "warc" / "dolma-sample-0001.warc.gz", tmp_path / "b", "s", ExtractConfig(workers=2))
    ta, tb = pq.read_table(a.docs_path), pq.read_table(b.docs_path)
    for col in ["id", "url", "domain", "fetch_time", "title", "text", "n_chars", "n_words", "source"]:
        assert col in ta.column_names
    assert ta.equals(tb)  # same rows in the same order whatever the worker count
    assert Path(a.docs_path).read_bytes() == Path(b.docs_path).read_bytes()
    rows = ta.to_pylist()
    # id is a content hash of (url, text): equal exactly when the document is the same
    assert len({r["id"] for r in rows}) == len({(r["url"], r["text"]) for r in rows})
    assert len(rows) == a.docs > 10
    r = rows[0]
    assert r["n_chars"] == len(r["text"]) and r["n_words"] > 0 and r["source"].startswith("dolma-sample-0001")
    assert r["domain"] and "www." not in r["domain"] and r["fetch_time"] is not None
    # non-HTML records (wget's log resources) are rejected with a reason, not dropped
    rej = pq.read_table(a.rejected_path).to_pylist()
    assert a.pages == a.docs + a.rejected and {x["reason"] for x in rej} == {"not html"}


def test_timeout_kills_a_hung_page_and_the_rest_go_on():
    pool = TimeoutPool("tests.hang:work", None, workers=2, timeout_s=1.0)
    t0 = time.monotonic()
    items = [(i, (x,)) for i, x in enumerate(["a", "hang", "b", "crash", "c", "raise", "d"])]
    out = dict(pool.imap_unordered(items))
    elapsed = time.monotonic() - t0
    pool.close()
    assert [out[i] for i in (0, 2, 4, 6)] == ["A", "B", "C", "D"]
    assert isinstance(out[1], ItemFailed) and out[1].reason == "timeout"
    assert isinstance(out[3], ItemFailed) and out[3].reason == "worker error"
    assert isinstance(out[5], ItemFailed) and "ValueError" in out[5].detail
    assert elapsed < 10


def test_a_prestarted_pool_is_the_one_the_first_shard_borrows():
    """`refinery run` starts the extraction workers beside Prefect's API start-up: the first shard
    must get those very processes, not start two more."""
    close_all()
    prestart("tests.hang:work", {"k": 1}, 2, 5.0)
    with borrow_pool("tests.hang:work", {"k": 1}, 2, 5.0) as pool:
        started = {w.proc.pid for w in pool.idle}
        procs = [w.proc for w in pool.idle]
        assert len(started) == 2
        assert dict(pool.imap_unordered([(i, (x,)) for i, x in enumerate("abc")])) == {0: "A", 1: "B", 2: "C"}
        assert {w.proc.pid for w in pool.idle} == started and pool.restarts == 0
    with borrow_pool("tests.hang:work", {"k": 2}, 2, 5.0) as other:   # other options: another pool
        assert not other.idle
    close_all()   # what the extract stage does when it ends: the workers exit
    assert all(p.poll() is not None for p in procs)


_ORPHAN = """
import os, signal, sys, threading, time
from tasks.workers import TimeoutPool
pool = TimeoutPool("tests.hang:work", None, workers=1, timeout_s=600)
threading.Thread(target=lambda: list(pool.imap_unordered([(0, ("hang",))])), daemon=True).start()
time.sleep(3)                                   # the worker is inside the hung page now
kids = [k for t in os.listdir("/proc/self/task") for k in open(f"/proc/self/task/{t}/children").read().split()]
print(*kids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_busy_on_a_page_dies_with_its_killed_parent():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == -9, p.stderr[-2000:]
    pids = p.stdout.split()
    assert pids, "no worker was running"
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{x}").exists() for x in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{x}").exists() for x in pids), "the worker outlived the killed run"


def test_pathological_page_is_rejected_with_its_reason(tmp_path):
    # 100,000 nested elements: the shard must finish, and say why the page gave no text
    deep = ("<html><body>" + "<div><span>" * 100_000 + "text" + "</span></div>" * 100_000 + "</body></html>")
    page = tmp_path / "pages"
    page.mkdir()
    (page / "deep.html").write_text(deep)
    (page / "ok.html").write_text("<html><body><article><p>" + "A normal paragraph of real text. " * 30
                                  + "</p></article></body></html>")
    res = extract_shard(page, tmp_path / "out", "deep", ExtractConfig(timeout_s=10))
    rej = pq.read_table(res.rejected_path).to_pylist()
    assert res.docs == 1 and res.pages == 2
    # libxml2 gives up at depth 256 (quickly): counted as such, not as a page without text
    assert rej[0]["url"].endswith("deep.html") and rej[0]["reason"] == "too deeply nested"
    assert "depth" in rej[0]["detail"]


def test_payload_rejections_have_reasons():
    from tasks.warc import Record
    from tasks.decode import DecodeError
    import gzip
    import pytest

    cfg = ExtractConfig(max_html_bytes=1_000_000)
    cases = {
        "http status": Record(0, "response", "http://x/", None, 404, {"content-type": "text/html"}, b"<p>x</p>"),
        "not html": Record(0, "response", "http://x/", None, 200, {"content-type": "image/png"}, b"\x89PNG"),
        "decoded too large": Record(0, "response", "http://x/", None, 200,
                                    {"content-type": "text/html", "content-encoding": "gzip"},
                                    gzip.compress(b"a" * 5_000_000)),
    }
    html = {"content-type": "text/html"}
    # payloads labelled text/html that are not: named by their magic, NUL-free PDFs included
    binary = {"pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" * 40,
              "png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "binary data": b"<html>\0\0\0"}
    for reason, rec in cases.items():
        with pytest.raises(DecodeError) as e:
            payload_to_html(rec, cfg)
        assert e.value.reason == reason
    for kind, body in binary.items():
        with pytest.raises(DecodeError) as e:
            payload_to_html(Record(0, "response", "http://x/", None, 200, html, body), cfg)
        assert (e.value.reason, e.value.detail) == ("binary payload", f"{kind} labelled text/html")


def test_whole_file_gzip_warc_loses_no_page(tmp_path):
    # fastwarc reports one offset for several records of a whole-file gzip: none may overwrite another
    def rec(i: int) -> bytes:
        http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html><body><article><p>"
                + f"Page number {i} tells its own story about the harbour and the town. ".encode() * 10
                + b"</p></article></body></html>")
        return (b"WARC/1.1\r\nWARC-Type: response\r\nWARC-Target-URI: http://x/%d\r\n"
                b"Content-Type: application/http; msgtype=response\r\nContent-Length: %d\r\n\r\n" % (i, len(http))
                + http + b"\r\n\r\n")
    import gzip

    p = tmp_path / "whole.warc.gz"
    p.write_bytes(gzip.compress(b"".join(rec(i) for i in range(5))))
    res = extract_shard(p, tmp_path / "out", "whole", ExtractConfig())
    docs = pq.read_table(res.docs_path).to_pylist()
    assert res.pages == res.docs == 5 and [d["url"] for d in docs] == [f"http://x/{i}" for i in range(5)]


def test_fast_metadata_keeps_text_and_title_and_agrees_on_dates(tmp_path):
    """`extract.metadata`: fast (default) reads title and date without trafilatura's whole metadata
    pass. On the bundled real pages the text and the title must be what the full pass gives, and a
    date the fast path finds must almost always be the full pass's date (the full pass finds more,
    most of them copyright years read as January 1st)."""
    runs = {m: pq.read_table(extract_shard(SAMPLE / "pages.warc.gz", tmp_path / m, "p",
                                           ExtractConfig(metadata=m)).docs_path).to_pylist()
            for m in ("fast", "full", "none")}
    fast, full, off = runs["fast"], runs["full"], runs["none"]
    assert len(fast) == len(full) == len(off) > 40
    assert [d["text"] for d in fast] == [d["text"] for d in full] == [d["text"] for d in off]
    assert [d["title"] for d in fast] == [d["title"] for d in full]
    assert sum(bool(d["title"]) for d in fast) > 0.9 * len(fast)
    assert all(d["title"] == "" and d["date"] == "" for d in off)
    found = [(a["date"], b["date"]) for a, b in zip(fast, full) if a["date"]]
    assert len(found) > 0.5 * len(fast)
    assert sum(a == b for a, b in found) >= 0.9 * len(found)
