"""Hostile input through the real pipeline: every bad file or record ends in a completed run,
counted under its own reason, with memory bounded.

One corpus is generated per run (nothing big is committed): each hostile case is its own
input file, most followed by a good page that must still come out. A local server feeds the
crawler hostile HTTP (a gzip bomb, lying Content-Length headers) and its WARC joins the corpus.
`refinery extract` then runs as a user runs it (a subprocess, the real Prefect flow on the
session's API) while the test samples the RSS of its whole process tree (flow process and
extraction workers); each process's own peak is its VmHWM.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pyarrow.parquet as pq

from tests.crawl_servers import CrawlServer, lying_length, page

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
MEMORY_BOUND = 1 * GiB   # whole tree, sampled: ~400 MiB measured (flow process ~270 MiB + one worker)
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- building the corpus ---------------------------------------------------------------------

def article(tag: str) -> bytes:
    body = " ".join(f"The {tag} committee met on day {i} and agreed that the annual budget needs a "
                    f"careful review before the council votes on it next week." for i in range(8))
    return (f"<html><head><title>{tag} report</title></head><body><nav><a href='/'>Home</a></nav>"
            f"<article><h1>{tag} report</h1><p>{body}</p></article></body></html>").encode()


def record(url: str, body: bytes, ctype: str = "text/html; charset=utf-8", extra: str = "",
           lie: int = 0) -> bytes:
    """A WARC/1.1 response record; `lie` is added to the true Content-Length."""
    http = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n{extra}\r\n".encode() + body
    head = (f"WARC/1.1\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2024-05-01T00:00:00Z\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http) + lie}\r\n\r\n")
    return head.encode() + http + b"\r\n\r\n"


def write_warc(path: Path, records: list[bytes], gz: bool = True) -> None:
    path.write_bytes(b"".join(gzip.compress(r, 1, mtime=0) for r in records) if gz else b"".join(records))


@functools.lru_cache(maxsize=1)
def gzip_bomb(mib: int) -> bytes:
    """`mib` MiB of zeros as one gzip stream of ~1/1000 the size, built without inflating it:
    after a full flush a deflate block depends on nothing before it, so it can be repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(2**20)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + block * mib + c.flush()
            + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF))


def long_line_member(url: str, size: int) -> bytes:
    """One gzip member holding a response whose HTML is one `size`-byte line, compressed in
    pieces so the test never holds the whole page."""
    pre, post = b"<html><body><p>", b"</p></body></html>"
    chunk = b"an endless line of words without a break " * 1000
    n, rest = divmod(size - len(pre) - len(post), len(chunk))
    http_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    head = (f"WARC/1.1\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2024-05-01T00:00:00Z\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http_head) + size}\r\n\r\n")
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [c.compress(head.encode() + http_head + pre)]
    out += [c.compress(chunk) for _ in range(n)]
    out += [c.compress(chunk[:rest] + post + b"\r\n\r\n"), c.flush()]
    return b"".join(out)


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0\xff\0\0")) + chunk(b"IEND", b""))


PDF = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
       b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
       b"3 0 obj\n<< /Length 60 >>\nstream\nBT /F1 12 Tf 72 712 Td (The committee met and agreed) Tj ET\n"
       b"endstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n")  # no NUL byte: only its magic gives it away

LATIN = "Größe, café, naïve – “quoted” words about the weather in the old city centre. " * 20
JAPANESE = "日本語のテキストです。東京の天気は晴れです。委員会は予算について議論しました。" * 20


def build_corpus(d: Path) -> dict[str, dict]:
    """Write every case; returns file name -> what extraction must report for it."""
    d.mkdir()
    u = "http://hostile.example/"
    write_warc(d / "good.warc.gz", [record(f"{u}good/{i}", article(f"good{i}")) for i in range(3)])
    cut = b"".join(gzip.compress(record(f"{u}cut/{i}", article(f"cut{i}")), 1, mtime=0) for i in range(3))
    (d / "truncated.warc.gz").write_bytes(cut[: len(cut) - 200])        # in the last member
    (d / "truncated-head.warc.gz").write_bytes(cut[:12])                 # in the gzip header
    noise = random.Random(7).randbytes(64 * 1024)
    assert noise[:2] != b"\x1f\x8b"
    (d / "random.warc.gz").write_bytes(noise)
    (d / "empty.warc.gz").write_bytes(b"")
    (d / "huge-line.warc.gz").write_bytes(long_line_member(f"{u}huge", 50_000_000)
                                          + gzip.compress(record(f"{u}after/huge", article("afterhuge")), 1))

    def with_good(name: str, *bad: bytes, gz: bool = True) -> None:
        write_warc(d / name, [*bad, record(f"{u}after/{name}", article("after" + name.split(".")[0]))], gz)

    with_good("bomb.warc.gz", record(f"{u}bomb", gzip_bomb(1024), extra="Content-Encoding: gzip\r\n"))
    deep = b"<html><body>" + b"<div>" * 100_000 + b"<p>buried text</p>" + b"</div>" * 100_000 + b"</body></html>"
    with_good("deep.warc.gz", record(f"{u}deep", deep))
    utf8 = article("unicode").replace(b"agreed", "café naïve – agreed".encode())
    broken = utf8.replace(b"day 3", b"day \xff\xfe 3").replace(b"day 5", b"day \xe2\x80 5")   # stray, cut
    with_good("invalid-utf8.warc.gz", record(f"{u}invalid-utf8", broken))
    latin = f"<html><body><article><p>{LATIN}</p></article></body></html>".encode("cp1252")
    sjis = f"<html><body><article><p>{JAPANESE}</p></article></body></html>".encode("shift_jis")
    with_good("mislabeled.warc.gz", record(f"{u}cp1252", latin), record(f"{u}sjis", sjis))
    with_good("binary.warc.gz", record(f"{u}doc.pdf", PDF), record(f"{u}image.png", png()))
    for lie, name in ((400, "long"), (-30, "short")):
        for gz in (True, False):
            liar = record(f"{u}cl-{name}", article("liar"), lie=lie)
            with_good(f"cl-{name}.warc" + (".gz" if gz else ""), liar, gz=gz)

    one = {"docs": 1, "repaired": {}}
    want = {"good.warc.gz": {"docs": 3, "rejected": {}, "repaired": {}},
            "truncated.warc.gz": {"docs": 2, "rejected": {"truncated record": 1}, "repaired": {}},
            "truncated-head.warc.gz": {"docs": 0, "rejected": {"truncated gzip": 1}, "repaired": {}},
            "random.warc.gz": {"docs": 0, "rejected": {"not a warc file": 1}, "repaired": {}},
            "empty.warc.gz": {"docs": 0, "rejected": {"empty file": 1}, "repaired": {}},
            "huge-line.warc.gz": {**one, "rejected": {"too large": 1}},
            "bomb.warc.gz": {**one, "rejected": {"decoded too large": 1}},
            "deep.warc.gz": {**one, "rejected": {"too deeply nested": 1}},
            "invalid-utf8.warc.gz": {"docs": 2, "rejected": {}, "repaired": {"invalid utf-8 replaced": 1}},
            "mislabeled.warc.gz": {"docs": 3, "rejected": {}, "repaired": {"charset label wrong": 2}},
            "binary.warc.gz": {**one, "rejected": {"binary payload": 2}}}
    for name in ("cl-long.warc", "cl-short.warc", "cl-long.warc.gz", "cl-short.warc.gz"):
        want[name] = {**one, "rejected": {"content-length mismatch": 1}}
    return want


# -- running a command with its memory watched ---------------------------------------------------

def _tree_rss(root: int) -> tuple[int, int]:
    """(resident bytes of `root` and all its descendants, shared pages counted in each: an upper
    bound; the largest VmHWM among them: each process's own peak since its exec)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    total, hwm, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        todo += children.get(pid, [])
    return total, hwm


def run_watched(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 120) -> tuple[int, int, int]:
    """Run `cmd`; returns (exit code, peak sampled RSS of its process tree, the largest single
    process's own peak, VmHWM). Not wait4's ru_maxrss: Linux carries the pre-exec high-water mark
    over execve, so a child forked from a big pytest process reports pytest's size (3.6 GiB in CI)."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peak, hwm, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, top = _tree_rss(p.pid)
            peak[0], hwm[0] = max(peak[0], total), max(hwm[0], top)
            done.wait(0.05)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    killer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    killer.start()
    try:
        _, status, _ = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
        done.set()
        watcher.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, peak[0], hwm[0]


_CRAWL = """
import asyncio, sys
from pathlib import Path
from core.config import CrawlConfig
from tasks.fetch import crawl
print(asyncio.run(crawl(sys.argv[1].split(), Path(sys.argv[2]), CrawlConfig.model_validate_json(sys.argv[3]))))
"""


def crawl_hostile_server(out: Path, log: Path) -> tuple[dict, int]:
    """Crawl a server that sends a gzip bomb and lying Content-Lengths; returns (crawl log by
    path, peak RSS of the crawling process)."""
    from core.config import CrawlConfig

    ok = article("crawled")
    routes = {"/bomb": page(gzip_bomb(1024), headers={"Content-Encoding": "gzip"}),
              "/cl-long": lying_length(100_000, ok[:200]),                  # promises more, then hangs up
              "/cl-short": lying_length(len(ok), ok + b"<p>spill</p>" * 500),  # sends more than promised
              "/ok": page(ok)}
    cfg = CrawlConfig(allow_private_hosts=True, respect_robots=False, per_host_delay_s=0, follow_links=True,
                      max_retries=1, backoff_base_s=0.05, backoff_max_s=0.1, timeout_s=5)
    with CrawlServer(routes) as srv:
        seeds = " ".join(srv.url(p) for p in routes)
        rc, _, peak = run_watched([sys.executable, "-c", _CRAWL, seeds, str(out), cfg.model_dump_json()], log,
                                  timeout=60)
    assert rc == 0, log.read_text()[-3000:]
    rows = pq.read_table(out / "crawl_log.parquet").to_pylist()
    return {r["url"].rsplit("/", 1)[1]: r for r in rows}, peak


# -- the test ----------------------------------------------------------------------------------

def _flow_run(out: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = [r for r in c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["extract"])))
                if r.parameters.get("out_dir") == str(out)]
        assert len(runs) == 1, runs
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
    return runs[0], tasks


def test_hostile_corpus_completes_with_every_bad_input_counted_and_memory_bounded(prefect_api, tmp_path):
    t0 = time.monotonic()
    want = build_corpus(tmp_path / "in")
    built = time.monotonic() - t0

    # the crawler on the hostile path: the bomb is stored as the wire carried it (1 MB, never
    # inflated past the link-extraction cap), a too-long length is a network error, a too-short
    # one keeps what it promised and the spill it left on the connection costs a retry, not a page
    crawl, crawl_peak = crawl_hostile_server(tmp_path / "crawl", tmp_path / "crawl.log")
    assert crawl["bomb"]["outcome"] == "fetched" and crawl["bomb"]["bytes"] < 2 * 2**20
    assert crawl["cl-long"]["outcome"] == "network error" and "expected 100000" in crawl["cl-long"]["error"]
    assert crawl["cl-short"]["outcome"] == "fetched" and crawl["cl-short"]["bytes"] == len(article("crawled"))
    assert crawl["ok"]["outcome"] == "fetched"
    crawl_warcs = sorted((tmp_path / "crawl" / "warc").glob("*.warc.gz"))
    assert len(crawl_warcs) == 1
    want[crawl_warcs[0].name] = {"docs": 2, "rejected": {"decoded too large": 1}, "repaired": {}}

    out = tmp_path / "out"
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    t1 = time.monotonic()
    rc, tree_peak, proc_peak = run_watched(
        [sys.executable, "-m", "flows.cli", "extract", str(tmp_path / "in"), str(tmp_path / "crawl" / "warc"),
         "--out", str(out), "--no-progress"], tmp_path / "extract.log", env, timeout=150)
    extract_s = time.monotonic() - t1
    log = (tmp_path / "extract.log").read_text()
    assert rc == 0, log[-4000:]
    print(f"hostile: corpus {built:.1f}s, extract {extract_s:.1f}s; peak RSS extract tree {tree_peak / 2**20:.0f} "
          f"MiB (largest process {proc_peak / 2**20:.0f} MiB), crawl {crawl_peak / 2**20:.0f} MiB")

    # the real flow ran and completed; no shard task failed or needed a retry
    run, tasks = _flow_run(out)
    assert run.state.is_completed(), run.state
    tasks = [t for t in tasks if t.name.startswith("extract-shard")]
    assert len(tasks) == len(want) and all(t.state.is_completed() and t.run_count == 1 for t in tasks), \
        [(t.name, t.state.type, t.run_count) for t in tasks]

    # every input file is a shard, with exactly its damage counted under its reason
    summary = json.loads((out / "extract_summary.json").read_text())
    got = {Path(s["input"]).name: {"docs": s["docs"], "rejected": s["rejected_by_reason"],
                                   "repaired": s["repaired_by_reason"]} for s in summary["shards"]}
    assert got == want
    total: dict[str, int] = {}
    repaired: dict[str, int] = {}
    for w in want.values():
        for k, v in w["rejected"].items():
            total[k] = total.get(k, 0) + v
        for k, v in w["repaired"].items():
            repaired[k] = repaired.get(k, 0) + v
    assert summary["rejected_by_reason"] == dict(sorted(total.items()))
    assert summary["repaired_by_reason"] == dict(sorted(repaired.items())) and repaired

    # every rejection is a row naming its source; the good pages after each bad one came out
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert len(rejected) == sum(total.values()) and all(r["reason"] and r["source"] for r in rejected)
    by_url = {r["url"]: r for r in rejected if r["url"]}
    assert by_url["http://hostile.example/bomb"]["detail"].startswith("inflates past")
    assert by_url["http://hostile.example/huge"]["n_bytes"] >= 50_000_000
    assert {by_url[f"http://hostile.example/{x}"]["detail"] for x in ("doc.pdf", "image.png")} == \
        {"pdf labelled text/html", "png labelled text/html"}
    docs = {d["url"]: d for d in pq.read_table(out / "docs").to_pylist()}
    assert len(docs) == sum(w["docs"] for w in want.values())
    after = {u for u in docs if "/after/" in u}
    assert len(after) == 10 and "http://hostile.example/good/2" in docs and "http://hostile.example/cut/1" in docs

    # pages with bad bytes or lying labels decoded to the right text
    assert "café naïve – agreed" in docs["http://hostile.example/invalid-utf8"]["text"]
    assert "\ufffd" in docs["http://hostile.example/invalid-utf8"]["text"]
    assert docs["http://hostile.example/cp1252"]["charset"] == "cp1252" and "Größe, café, naïve" in \
        docs["http://hostile.example/cp1252"]["text"]
    assert "東京の天気は晴れです" in docs["http://hostile.example/sjis"]["text"]

    # memory: the stated bound for the whole tree, and for the crawl
    assert tree_peak < MEMORY_BOUND and proc_peak < MEMORY_BOUND and crawl_peak < MEMORY_BOUND
