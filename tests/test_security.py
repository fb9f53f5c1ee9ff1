"""File names derived from URLs, input file names or parameters never escape the output root.

Where a name is derived, and what is checked here with hostile input (`../../etc/x`, absolute paths,
`..`, NUL, 5,000-character names, fullwidth dots and slashes, a URL with /../ segments):
  - extract: `flows.extract.shard_name` turns an input file name into the docs/ and rejected/ file
    names; checked on hostile paths, then through `tasks.extract.extract_shard` on real files so named;
  - crawl: no file name comes from a URL (WARC files are `crawl-NNNNN.warc.gz`, the log and journal
    are fixed names); checked by crawling hostile URLs and listing what was written;
  - path parameters of served runs (out_dir, inputs, ...): `core.guard.confine`, every value either
    refused or resolved under the data root;
  - the WARC writer's file-name prefix (`tasks/warc_writer.py`) must be one plain path component.
curate and shard name their outputs after the stems of files already on disk (plus a hash), so a
name there is one path component by construction; shard's `p.stem` of a file "..parquet" is "." and
its output "..parquet", still a plain file in the split folder.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from crawl_servers import CrawlServer, page
from flows.caching import input_fingerprint
from core.config import CrawlConfig, ExtractConfig
from flows.extract import shard_name
from core.guard import ENV, PathNotAllowed, confine
from tasks.extract import extract_shard
from tasks.fetch import crawl
from tasks.urls import normalize_url

SHA = "0123456789abcdef" * 4
HOSTILE = ["../../etc/x", "/etc/passwd", "..", ".", "", "a\x00b", "x" * 5000, "a/../../b.warc.gz",
           "..\\..\\windows\\x", "．．／．．／etc／x", "‥∕etc∕passwd", "\u202egnp.exe", "%2e%2e%2f%2e%2e%2fx",
           "http://h/a/../../../etc/passwd", "~/.ssh/id_rsa", "-rf", "con", " .. ", "\n..\n"]
# legal on Linux (no "/" or NUL, <= 255 bytes), and still tricky
HOSTILE_FILES = ["．．／．．／etc.html", "‥∕etc∕passwd.html", "..html", "\u202elmth.html", "x" * 250 + ".html",
                 " .html", "-rf.html", "..%2f..%2fx.html"]


def under(p: Path, root: Path) -> bool:
    p, root = p.resolve(), root.resolve()
    return p == root or root in p.parents


def files_outside(tmp: Path, root: Path) -> list[str]:
    return sorted(str(p) for p in tmp.rglob("*") if not under(p, root) and p.is_file())


@pytest.mark.parametrize("raw", HOSTILE)
def test_shard_name_is_one_safe_component(raw, tmp_path):
    name = shard_name(Path(raw), SHA)
    # one component, no leading dot (so never "." or ".." or hidden), ASCII only (no lookalike slashes)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*-[0-9a-f]{10}", name), name
    assert len(name.encode()) <= 80 and "\x00" not in name
    for sub in ("docs", "rejected"):
        target = tmp_path / "out" / sub / f"{name}.parquet"
        assert target.parent == tmp_path / "out" / sub and under(target, tmp_path / "out")


def test_extract_writes_hostile_named_inputs_under_the_output_root(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    html = "<html><body><article><p>" + "Plain text about sharding. " * 30 + "</p></article></body></html>"
    names = []
    for i, fname in enumerate(HOSTILE_FILES):
        p = src / fname
        p.write_text(html.replace("Plain", f"Plain {i}"))
        assert p.parent == src                       # each is one real file name
        names.append(shard_name(p, input_fingerprint(p)))   # as run_extract derives it
    assert len(set(names)) == len(names)             # stems may collide ("..html", " .html"); the hash keeps them apart
    cfg = ExtractConfig()
    for fname, name in zip(HOSTILE_FILES, names):
        r = extract_shard(src / fname, out, name, cfg)
        assert under(Path(r.docs_path), out) and under(Path(r.rejected_path), out)
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written and all(len(p.parts) == 2 and p.parts[0] in ("docs", "rejected") for p in written), written
    assert files_outside(tmp_path, out) == sorted(str(src / f) for f in HOSTILE_FILES)


def test_crawled_urls_never_name_a_file(tmp_path):
    """Whatever the URL, the crawl writes the same fixed set of names under out_dir."""
    out = tmp_path / "a" / "out"
    with CrawlServer() as srv:
        base = srv.url("")
        seeds = [base + "/a/../../../etc/passwd", base + "/%2e%2e/%2e%2e/etc/x", base + "/..%2F..%2Fetc%2Fy",
                 base + "/nul%00byte", base + "/" + "a" * 3000, base + "/．．／etc", base + "/?f=../../etc/z"]
        for s in seeds:
            srv.routes[urlsplit(normalize_url(s)).path] = page("<html><body><p>page</p></body></html>")
        cfg = CrawlConfig(allow_private_hosts=True, per_host_delay_s=0.0, timeout_s=5.0, max_retries=0)
        summary = asyncio.run(crawl(seeds, out, cfg))
    assert summary["fetched"] >= 5, summary
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["crawl_log.parquet", "crawl_state/journal.jsonl", "crawl_state/lock",
                       "warc/crawl-00000.warc.gz"], written
    assert files_outside(tmp_path, out) == []


def test_hostile_path_parameters_are_refused_or_stay_under_the_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv(ENV, str(root))
    monkeypatch.chdir(root)                          # relative values resolve from the serve process's cwd
    (root / "loop").symlink_to(root / "loop")        # a symlink loop: resolve() raises, must be refused
    values = [f"{root}/{h}" for h in HOSTILE] + HOSTILE + ["/", "/etc", str(tmp_path), f"{root}/loop/x",
                                                           f"{root}-sibling", f"{root}/x/../../y"]
    refused = 0
    for v in values:
        try:
            confine(writes={"out_dir": v}, reads={"inputs": [v]})
        except PathNotAllowed as e:
            refused += 1
            assert len(str(e)) < 1200, "a 5,000-character parameter is not echoed whole"
            continue
        assert under(Path(v), root), v               # allowed: it really is inside the root
    assert refused >= 12, refused
    with pytest.raises(PathNotAllowed, match="not a usable path"):
        confine(writes={"out_dir": f"{root}/a\x00b"})
    with pytest.raises(PathNotAllowed, match="not a usable path"):
        confine(writes={"out_dir": f"{root}/loop/x"})


def test_warc_writer_prefix_cannot_escape(tmp_path):
    from datetime import datetime, timezone

    from tasks.warc_writer import RotatingWarcWriter

    out = tmp_path / "a" / "b" / "out"
    for prefix in ("../../escaped-x", str(tmp_path / "absolute-x"), "..", "a/../../../up-x"):
        try:
            with RotatingWarcWriter(out, prefix, 1 << 20) as w:
                w.write_exchange("http://ex.com/", [], "HTTP/1.1 200 OK", [("Content-Type", "text/html")],
                                 b"<p>x</p>", datetime.now(timezone.utc), None)
        except ValueError:
            continue                                  # refused: one plain path component only
        assert files_outside(tmp_path, out / "warc") == [], prefix
