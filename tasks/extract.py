"""Extraction: WARC page records -> main text documents (trafilatura), one shard at a time.

`extract_shard` is the whole step as a plain function over one input file; the
Prefect task in flows/extract.py only adds retries, caching and reporting.
Pages are parsed in worker processes with a hard per-page deadline (tasks/workers.py).
"""
from __future__ import annotations

import functools
import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa

from core.config import ExtractConfig
from tasks.decode import DecodeError, decode_content, decode_text, dechunk
from core.guard import files_under
from core.io import write_parquet_atomic
from core.media import EXTRACTABLE_TYPES, media_type
from core.rejects import EXTRACT_REJECTS
from core.text import count_words
from tasks.warc import ReadStats, Record, file_problem, iter_records, looks_like_warc
from tasks.workers import ItemFailed, borrow_pool, prestart

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# in a folder, a file named like a WARC is an input even when its content is not one, so a
# damaged file is counted (as a rejection of the whole file) instead of silently skipped
WARC_NAME = re.compile(r"\.(warc|wet|arc)(\.gz)?$", re.I)
FILE_PROBLEMS = {"empty file": "0 bytes", "truncated gzip": "the gzip stream ends before its first record",
                 "corrupt gzip": "gzip header, then data that does not inflate",
                 "not a warc file": "neither WARC/WET nor HTML", "unreadable file": "the file cannot be opened"}
# payloads labelled text/html that are something else: (magic at the start, what it is)
BINARY_MAGIC = ((b"%PDF-", "pdf"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
                (b"\xff\xd8\xff", "jpeg"), (b"RIFF", "riff (webp/wav/avi)"), (b"PK\x03\x04", "zip"),
                (b"\x1f\x8b", "gzip"), (b"OggS", "ogg"), (b"ID3", "mp3"), (b"wOFF", "woff"), (b"wOF2", "woff2"),
                (b"\x7fELF", "elf"), (b"\x00\x00\x01\x00", "ico"))
WARMUP_PAGE = ("<html><head><title>t</title><meta name='date' content='2020-01-01'></head><body><article>"
               + "<p>Warm-up paragraph with enough words to pass every extraction threshold.</p>" * 5
               + "</article></body></html>")

DOC_SCHEMA = pa.schema([
    ("id", pa.string()),             # sha256(url \0 text)[:32]: stable across runs and machines
    ("url", pa.string()),
    ("domain", pa.string()),
    ("fetch_time", pa.timestamp("s", tz="UTC")),
    ("title", pa.string()),
    ("date", pa.string()),           # publication date found by trafilatura, if any
    ("text", pa.string()),
    ("n_chars", pa.int64()),
    ("n_words", pa.int64()),
    ("source", pa.string()),         # "<file name>@<record offset>"
    ("charset", pa.string()),
])


@dataclass
class ShardResult:
    input: str
    docs_path: str
    rejected_path: str
    docs: int
    rejected: int
    pages: int
    records: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    repaired_by_reason: dict[str, int] = field(default_factory=dict)  # decoded despite a fault
    seconds: float = 0.0


# ---- pure helpers ---------------------------------------------------------------------

def doc_id(url: str, text: str) -> str:
    return hashlib.sha256(f"{url}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def domain_of(url: str) -> str:
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""
    return host[4:] if host.startswith("www.") else host


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc).replace(microsecond=0)
    except ValueError:
        return None


@functools.cache
def _plain_element_classes() -> None:
    """lxml.html's parser picks each element's Python class by calling a Python `lookup` per element
    proxy (a million calls for 400 pages, ~6% of extraction CPU) only to give forms and inputs their
    own classes, which trafilatura never uses. The same HtmlElement classes from lxml's C lookup:
    identical text, titles and dates on 844 pages (the 1x bench corpus and the bundled WARCs), 0.8 ms
    less CPU a page. Set on trafilatura's parser in the process that extracts (a worker)."""
    from lxml import etree, html
    from trafilatura.utils import HTML_PARSER

    HTML_PARSER.set_element_class_lookup(etree.ElementDefaultClassLookup(
        element=html.HtmlElement, comment=html.HtmlComment, pi=html.HtmlProcessingInstruction,
        entity=html.HtmlEntity))


def extract_html(html: str, url: str, opts: dict) -> dict | None:
    """Main text, title and date of one page. Runs inside a worker process. The page is
    parsed once; trafilatura extracts from a copy, the metadata is read from the original."""
    import trafilatura
    from trafilatura.utils import load_html

    _plain_element_classes()

    full = opts["metadata"] == "full"
    tree = html if full else load_html(html)
    if tree is None:
        return None
    doc = trafilatura.bare_extraction(
        tree, url=url or None, with_metadata=full,
        include_comments=opts["include_comments"], include_tables=opts["include_tables"],
        favor_precision=opts["favor"] == "precision", favor_recall=opts["favor"] == "recall",
        deduplicate=opts["deduplicate"],
    )
    if doc is None or not doc.text:
        return None
    if full:
        return {"title": doc.title or "", "text": doc.text, "date": doc.date or ""}
    title, date = fast_metadata(tree, url) if opts["metadata"] == "fast" else ("", "")
    return {"title": title, "text": doc.text, "date": date}


def fast_metadata(tree, url: str) -> tuple[str, str]:
    """Title and date as trafilatura's metadata pass finds them, without the parts that cost
    (author, site name, categories, tags, licence, and htmldate's extensive search, which
    scans every text node with dateparser): 1.5 ms a page instead of 13 ms."""
    from datetime import date

    from htmldate import find_date
    from trafilatura.metadata import examine_meta, extract_meta_json, extract_title

    meta = examine_meta(tree)
    try:
        meta = extract_meta_json(tree, meta)
    except Exception:  # noqa: BLE001 - trafilatura's own pass tolerates broken JSON-LD the same way
        pass
    meta.title = meta.title or extract_title(tree)
    meta.date = find_date(tree, url=url or None, original_date=True, extensive_search=False,
                          max_date=date.today().isoformat())
    meta.clean_and_trim()
    return meta.title or "", meta.date or ""


def extract_page(html: str, url: str, opts: dict) -> dict | None:
    """The worker's job: `extract_html`, and when it finds nothing, whether the parser gave
    up on the page ({"reject": reason, "detail": ...}) rather than the page having no text."""
    doc = extract_html(html, url, opts)
    if doc is None and (limit := _parser_limit(html)):
        return {"reject": "too deeply nested" if "depth" in limit else "parser limit", "detail": limit}
    return doc


def _parser_limit(html: str) -> str | None:
    """libxml2's resource-limit message for this page, if parsing hit one. It stops at 256
    nested elements, so a 100,000-deep page parses quickly, but everything below is lost."""
    from lxml import etree

    parser = etree.HTMLParser(recover=True, encoding="utf-8")
    try:
        etree.fromstring(html.encode("utf-8", "surrogatepass"), parser)
    except (etree.Error, ValueError):
        pass
    return next((e.message for e in parser.error_log if e.type_name == "ERR_RESOURCE_LIMIT"), None)


def payload_to_html(rec: Record, cfg: ExtractConfig) -> tuple[str, str]:
    """Decode a page record's payload to (html or text, charset). Raises DecodeError."""
    text, charset, _ = decode_payload(rec, cfg)
    return text, charset


def _binary_kind(body: bytes) -> str | None:
    head = body[:16].lstrip(b" \t\r\n")
    kind = next((k for magic, k in BINARY_MAGIC if head.startswith(magic)), None)
    if kind is None and b"\0" in body[:2048] and not body.startswith((b"\xff\xfe", b"\xfe\xff")):
        kind = "binary data"       # NUL bytes: no HTML has them (UTF-16 aside, which has a BOM)
    return kind


def decode_payload(rec: Record, cfg: ExtractConfig) -> tuple[str, str, str | None]:
    """(html or text, charset, repair or None) of a page record. Raises DecodeError."""
    h = rec.http_headers
    if rec.status is not None and not 200 <= rec.status < 300:
        raise DecodeError("http status", str(rec.status))
    ctype = media_type(h.get("content-type"))
    if rec.record_type != "conversion" and ctype not in EXTRACTABLE_TYPES:
        raise DecodeError("not html", ctype)
    body = rec.payload
    if "chunked" in h.get("transfer-encoding", "").lower():
        body = dechunk(body)
    body = decode_content(body, h.get("content-encoding"), cfg.max_html_bytes)
    if rec.record_type != "conversion" and (kind := _binary_kind(body)):
        raise DecodeError("binary payload", f"{kind} labelled {ctype or 'without a type'}")  # PDFs, images
    m = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", h.get("content-type", ""), re.I)
    return decode_text(body, m.group(1) if m else None)


# ---- page sources ---------------------------------------------------------------------

def html_file_records(paths: list[Path], max_bytes: int | None = None) -> Iterator[Record]:
    """Loose HTML files as records, so they go through the same path as WARC pages.
    A file over `max_bytes` is not read: it comes back empty, marked "too large"."""
    for i, p in enumerate(sorted(paths)):
        st = p.stat()
        rec = Record(offset=i, record_type="resource", url=p.resolve().as_uri(),
                     date=datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
                     http_headers={"content-type": "text/html"})
        if max_bytes is not None and st.st_size > max_bytes:
            rec.payload_size, rec.error, rec.error_detail = st.st_size, "too large", f"{st.st_size} bytes"
        else:
            rec.payload = p.read_bytes()
        yield rec


def shard_inputs(inputs: list[str | Path]) -> list[Path]:
    """Each WARC/WET file is a shard; so is each directory of loose HTML files."""
    shards: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = files_under(p, lambda x: not x.name.startswith("."))
            warcs = [x for x in files if WARC_NAME.search(x.name) or looks_like_warc(x)]
            shards.extend(warcs)
            if any(x.suffix.lower() in HTML_SUFFIXES for x in files):
                shards.append(p)
        elif p.is_file():
            shards.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return list(dict.fromkeys(shards))


# ---- the step ---------------------------------------------------------------------------

def _reject(rec: Record, source: str, reason: str, detail: str) -> dict:
    return {"url": rec.url, "domain": domain_of(rec.url), "fetch_time": parse_time(rec.date),
            "source": source, "stage": "extract", "reason": reason, "detail": detail[:500],
            "n_bytes": len(rec.payload) if rec.payload_size is None else rec.payload_size}


def _pool_args(cfg: ExtractConfig) -> tuple:
    return "tasks.extract:extract_page", cfg.model_dump(mode="json"), cfg.workers, cfg.timeout_s, cfg.worker_max_pages


def prestart_workers(cfg: ExtractConfig) -> None:
    """Start the extraction workers of this process's first shard now. Each imports trafilatura and
    parses a warm-up page (~1 s of one core); started beside Prefect's API start-up, which keeps
    one core busy for several seconds, that second is off the extract stage's wall time."""
    prestart(*_pool_args(cfg), warmup=(WARMUP_PAGE, "https://example.org/"))


def extract_shard(input_path: str | Path, out_dir: str | Path, shard_name: str, cfg: ExtractConfig,
                  on_progress=None) -> ShardResult:
    """Extract every page of one input into out_dir/docs/<shard>.parquet and
    out_dir/rejected/<shard>.parquet. Rows are in record order, so the output is
    byte-identical for the same input and config whatever the worker count."""
    t0 = time.monotonic()
    input_path, out_dir = Path(input_path), Path(out_dir)
    stats = ReadStats()
    problem = None if input_path.is_dir() else file_problem(input_path)
    if input_path.is_dir():
        html = files_under(input_path, lambda x: x.suffix.lower() in HTML_SUFFIXES)
        records: Iterator[Record] = html_file_records(html, cfg.max_html_bytes)
    elif problem is None:
        records = iter_records(input_path, stats, max_payload=cfg.max_html_bytes)
    elif input_path.suffix.lower() in HTML_SUFFIXES:
        records, problem = html_file_records([input_path], cfg.max_html_bytes), None
    else:
        records = iter([])

    docs: dict[int, dict] = {}
    rejected: dict[int, dict] = {}
    meta: dict[int, tuple[Record, str, str]] = {}
    repaired: Counter = Counter()
    pages = 0
    if problem:  # the whole file is one rejection: counted, never silently skipped
        stats.errors[problem] += 1
        rejected[0] = {"url": "", "domain": "", "fetch_time": None, "source": input_path.name, "stage": "extract",
                       "reason": problem, "detail": FILE_PROBLEMS.get(problem, problem),
                       "n_bytes": input_path.stat().st_size}

    def jobs():
        nonlocal pages
        for rec in records:
            pages += 1
            source = f"{input_path.name}@{rec.offset}"
            key = pages  # not the offset: in a whole-file gzip fastwarc gives several records one offset
            if rec.error:
                rejected[key] = _reject(rec, source, rec.error, rec.error_detail)
                continue
            try:
                text, charset, repair = decode_payload(rec, cfg)
            except DecodeError as e:
                rejected[key] = _reject(rec, source, e.reason, e.detail)
                continue
            if repair:
                repaired[repair] += 1
            if rec.record_type == "conversion":  # WET: text is already extracted
                docs[key] = _doc(rec, source, {"title": "", "text": text.strip(), "date": ""}, charset)
                continue
            meta[key] = (rec, source, charset)
            yield key, (text, rec.url)

    with borrow_pool(*_pool_args(cfg), warmup=(WARMUP_PAGE, "https://example.org/")) as pool:
        for key, result in pool.imap_unordered(jobs()):
            rec, source, charset = meta.pop(key)
            if isinstance(result, ItemFailed):
                rejected[key] = _reject(rec, source, result.reason, result.detail)
            elif result is None:
                rejected[key] = _reject(rec, source, "no text", "trafilatura found no main text")
            elif "reject" in result:
                rejected[key] = _reject(rec, source, result["reject"], result["detail"])
            elif len(result["text"]) < cfg.min_chars:
                rejected[key] = _reject(rec, source, "too short", f"{len(result['text'])} chars")
            else:
                docs[key] = _doc(rec, source, result, charset)
            if on_progress:
                on_progress(len(docs) + len(rejected))

    docs_path = out_dir / "docs" / f"{shard_name}.parquet"
    rej_path = out_dir / "rejected" / f"{shard_name}.parquet"
    write_parquet_atomic(pa.Table.from_pylist([docs[k] for k in sorted(docs)], schema=DOC_SCHEMA), docs_path)
    write_parquet_atomic(pa.Table.from_pylist([rejected[k] for k in sorted(rejected)], schema=EXTRACT_REJECTS), rej_path)
    reasons = Counter(r["reason"] for r in rejected.values())
    return ShardResult(input=str(input_path), docs_path=str(docs_path), rejected_path=str(rej_path),
                       docs=len(docs), rejected=len(rejected), pages=pages, records=stats.records,
                       rejected_by_reason=dict(sorted(reasons.items())),
                       repaired_by_reason=dict(sorted(repaired.items())), seconds=time.monotonic() - t0)


def _doc(rec: Record, source: str, result: dict, charset: str) -> dict:
    text = result["text"]
    return {"id": doc_id(rec.url, text), "url": rec.url, "domain": domain_of(rec.url),
            "fetch_time": parse_time(rec.date), "title": result["title"], "date": result["date"],
            "text": text, "n_chars": len(text), "n_words": count_words(text), "source": source,
            "charset": charset}
