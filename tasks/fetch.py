"""The polite crawler: seeds in, WARC files + crawl_log.parquet out.

One asyncio task per URL. Each task waits at its host's gate (politeness), then at
the global cap, so a slow or strict host never holds back the others. Per URL:

    normalize -> SSRF guard -> robots.txt -> GET (retries) -> redirect? loop to guard
              -> 2xx of an allowed type, within max_bytes -> WARC -> links -> journal

Only final 2xx responses of an allowed content type are written to the WARC: every
response record is then a page for the extractor. Errors, redirects and refusals
live in crawl_log.parquet only.

Resume: each finished URL is appended to crawl_state/journal.jsonl after its WARC
record is flushed. A restarted crawl skips journaled URLs, re-queues the links they
found, and repairs the .open WARC file the killed run left (see `_resume`).
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import httpx
import pyarrow as pa
from protego import Protego

from core.config import CrawlConfig
from tasks.decode import DecodeError, decode_content
from core.io import TMP_PREFIX, write_parquet_atomic
from core.media import HTML_TYPES, media_type
from tasks.netguard import RefusedAddress, check_url_allowed, is_forbidden_ip
from tasks.urls import extract_links, normalize_url, same_site
from tasks.warc_writer import OPEN_SUFFIX, RotatingWarcWriter, repair_open_file

log = logging.getLogger(__name__)

OUTCOMES = ("fetched", "robots", "http error", "too large", "wrong type", "refused",
            "redirects", "network error", "invalid url",
            "duplicate")   # redirected to a URL this crawl fetches under its own row
REDIRECTS = {301, 302, 303, 307, 308}
ROBOTS_MAX_BYTES = 512 * 1024      # RFC 9309 asks parsers to read at least 500 KiB
DEADLINE_FACTOR = 5                # whole-request limit = timeout_s * this (stops drip-feeding servers)
# Retry what may go away by itself; a malformed request or URL will not.
RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, OSError)

_DISALLOW_ALL = Protego.parse("User-agent: *\nDisallow: /\n")

LOG_SCHEMA = pa.schema([
    ("url", pa.string()), ("final_url", pa.string()), ("outcome", pa.string()),
    ("status", pa.int32()), ("bytes", pa.int64()), ("content_type", pa.string()),
    ("fetch_time", pa.timestamp("us", tz="UTC")), ("elapsed_s", pa.float64()),
    ("depth", pa.int32()), ("attempts", pa.int32()), ("error", pa.string()),
    ("warc_file", pa.string()), ("warc_offset", pa.int64()), ("warc_length", pa.int64()),
])


@dataclass
class Row:
    """One crawl_log row; `site` and `links` only travel in the journal (for resume)."""
    url: str
    depth: int = 0
    site: str = ""                  # the seed whose site links must stay on
    final_url: str | None = None
    outcome: str = ""
    status: int | None = None
    bytes: int = 0
    content_type: str | None = None
    fetch_time: datetime | None = None   # start of the last request
    elapsed_s: float | None = None       # duration of the last request
    attempts: int = 0                    # requests sent, retries and redirect hops included
    error: str | None = None
    warc_file: str | None = None
    warc_offset: int | None = None
    warc_length: int | None = None
    links: list[str] = field(default_factory=list)   # children admitted from this page

    def to_json(self) -> str:
        d = asdict(self)
        d["fetch_time"] = self.fetch_time.isoformat() if self.fetch_time else None
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Row":
        d = json.loads(line)
        d["fetch_time"] = datetime.fromisoformat(d["fetch_time"]) if d.get("fetch_time") else None
        return cls(**d)


class _Stop(Exception):
    """Ends a URL with an outcome; raised from anywhere in its fetch."""

    def __init__(self, outcome: str, error: str | None = None):
        super().__init__(error or outcome)
        self.outcome, self.error = outcome, error


@dataclass
class _Reply:
    status: int
    reason: str
    http_version: str
    headers: httpx.Headers
    request_line: str
    request_headers: list[tuple[str, str]]
    ip: str | None
    body: bytes = b""


# -- small helpers ---------------------------------------------------------------------

def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """The page for link extraction, inflation bounded by `limit` (zip bombs); None if undecodable."""
    try:
        return decode_content(raw, content_encoding, limit)
    except DecodeError:
        return None


def _headers(pairs) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs]


def _peer_ip(resp: httpx.Response) -> str | None:
    stream = resp.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    return addr[0] if addr else None


class HostGate:
    """Politeness for one host: `slots` requests in flight, starts >= `delay` apart.

    The start is stamped after the global slot is taken, so time spent queued for
    it cannot shrink the gap to the next request.
    """

    def __init__(self, slots: int, delay: float):
        self._sem = asyncio.Semaphore(slots)
        self._lock = asyncio.Lock()
        self.delay = delay                  # raised later by a robots.txt Crawl-delay
        self._last_start = float("-inf")
        self._not_before = 0.0              # set by Retry-After: the whole host waits

    def defer(self, seconds: float) -> None:
        self._not_before = max(self._not_before, time.monotonic() + seconds)

    @contextlib.asynccontextmanager
    async def slot(self, global_sem: asyncio.Semaphore):
        async with self._sem:
            async with self._lock:
                # Re-check after each sleep: delay or not_before may have grown meanwhile.
                while (wait := max(self._last_start + self.delay, self._not_before) - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await global_sem.acquire()
                self._last_start = time.monotonic()
            try:
                yield
            finally:
                global_sem.release()


# -- the crawler -----------------------------------------------------------------------

class Crawler:
    def __init__(self, cfg: CrawlConfig, out_dir: Path, done: dict[str, Row],
                 on_progress: Callable[[int, int], None] | None, warc_prefix: str):
        self.cfg = cfg
        self.out_dir = out_dir
        self.on_progress = on_progress
        self.rows: dict[str, Row] = dict(done)            # finished, journaled rows
        self.seen: set[str] = set(done) | {r.final_url for r in done.values() if r.final_url}
        self.admitted = len(done)
        self.over_budget = 0
        self.ua_token = cfg.user_agent.split("/", 1)[0].split()[0]   # RFC 9309 product token
        self.allowed_types = {t.lower() for t in cfg.allowed_content_types}
        self.deadline = cfg.timeout_s * DEADLINE_FACTOR
        self.gates: dict[str, HostGate] = {}
        self.robots: dict[str, asyncio.Task] = {}
        self.rng = random.Random()
        self.warc = RotatingWarcWriter(out_dir, warc_prefix, cfg.warc_max_bytes,
                                       info={"http-header-user-agent": cfg.user_agent,
                                             "robots": "obey" if cfg.respect_robots else "ignore"})
        self.warc_lock = asyncio.Lock()

    # ---- scheduling ----
    async def run(self, seeds: list[str]) -> None:
        state = self.out_dir / "crawl_state"
        state.mkdir(parents=True, exist_ok=True)
        self.global_sem = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency,
                              max_keepalive_connections=self.cfg.concurrency)
        headers = {"User-Agent": self.cfg.user_agent,
                   "Accept": "text/html,application/xhtml+xml;q=0.9,text/plain;q=0.8,*/*;q=0.1",
                   "Accept-Encoding": "gzip, deflate"}   # what every downstream reader can decode
        # trust_env=False: a proxy from the environment would hide the peer address the
        # SSRF check inspects, and tests must never leave loopback.
        with open(state / "journal.jsonl", "a", encoding="utf-8") as self.journal:
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False, limits=limits,
                                         timeout=httpx.Timeout(self.cfg.timeout_s),
                                         headers=headers) as self.client:
                try:
                    async with asyncio.TaskGroup() as self.tg:
                        for raw in seeds:
                            self._admit_seed(raw)
                        for row in list(self.rows.values()):   # resumed: links not yet fetched
                            for link in row.links:
                                self._admit(link, row.depth + 1, row.site)
                        self._progress()
                except BaseException:
                    # Cancelled (Ctrl-C, flow timeout) or crashed: a write may be half done
                    # in its thread, so the file keeps its .open name for the next run to repair.
                    self.warc.close(finalize=False)
                    raise
                self.warc.close()

    def _admit_seed(self, raw: str) -> None:
        try:
            url = normalize_url(raw)
        except ValueError as e:
            if raw not in self.seen and self._take_budget(raw):
                self._finish(Row(url=raw, outcome="invalid url", error=str(e)))
            return
        self._admit(url, 0, url)

    def _take_budget(self, url: str) -> bool:
        if self.admitted >= self.cfg.max_pages:
            self.over_budget += 1
            return False
        self.seen.add(url)
        self.admitted += 1
        return True

    def _admit(self, url: str, depth: int, site: str) -> bool:
        if url in self.seen or not self._take_budget(url):
            return False
        self.tg.create_task(self._visit(Row(url=url, depth=depth, site=site)))
        return True

    def _finish(self, row: Row) -> None:
        # Called only after the row's WARC record (if any) is flushed: the journal
        # line is the promise that the record is on disk.
        self.rows[row.url] = row
        self.journal.write(row.to_json() + "\n")
        self.journal.flush()
        self._progress()

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(len(self.rows), self.admitted)

    def _gate(self, url: str) -> HostGate:
        host = urlsplit(url).netloc
        if host not in self.gates:
            self.gates[host] = HostGate(self.cfg.per_host_concurrency, self.cfg.per_host_delay_s)
        return self.gates[host]

    # ---- one URL ----
    async def _visit(self, row: Row) -> None:
        try:
            await self._fetch_chain(row)
        except _Stop as s:
            row.outcome, row.error = s.outcome, s.error
        except Exception as e:  # an exotic reply must cost one URL, not the crawl
            log.exception("crawler: unexpected error on %s", row.url)
            row.outcome, row.error = "network error", f"unexpected {type(e).__name__}: {e}"
        self._finish(row)

    async def _fetch_chain(self, row: Row) -> None:
        url, chain = row.url, [row.url]
        while True:
            row.final_url = url
            await self._guard(url)
            if not await self._robots_allow(url):
                raise _Stop("robots", f"disallowed by robots.txt: {url}")
            reply = await self._request(url, row)
            if reply.status in REDIRECTS:
                url = self._next_hop(url, reply, chain)
                continue
            if not 200 <= reply.status < 300:
                raise _Stop("http error", f"HTTP {reply.status}")
            await self._store(row, url, reply)
            row.outcome = "fetched"
            return

    def _next_hop(self, url: str, reply: _Reply, chain: list[str]) -> str:
        location = reply.headers.get("location")
        if not location:
            raise _Stop("http error", f"HTTP {reply.status} without Location")
        try:
            target = normalize_url(urljoin(url, location))
        except ValueError as e:
            raise _Stop("invalid url", f"redirect to {location!r}: {e}") from None
        if target in chain:
            raise _Stop("redirects", f"redirect loop back to {target}")
        if len(chain) > self.cfg.max_redirects:
            raise _Stop("redirects", f"more than {self.cfg.max_redirects} redirects")
        if target in self.seen:                       # fetched at most once per crawl
            raise _Stop("duplicate", f"redirects to {target}, crawled under its own row")
        self.seen.add(target)
        chain.append(target)
        return target

    async def _guard(self, url: str, retrying: bool = False) -> None:
        try:
            await check_url_allowed(url, self.cfg.allow_private_hosts)
        except RefusedAddress as e:
            raise _Stop("refused", e.reason) from None
        except OSError as e:
            if retrying:                 # inside the retry loop: a resolver hiccup is retried
                raise
            raise _Stop("network error", f"cannot resolve: {e}") from None

    # ---- requests ----
    async def _request(self, url: str, row: Row, robots: bool = False) -> _Reply:
        """GET one hop, retrying timeouts, connection errors, 5xx and 429."""
        attempt = 0
        while True:
            try:
                reply = await self._attempt(url, row, robots)
            except RETRYABLE as e:
                if attempt >= self.cfg.max_retries:
                    raise _Stop("network error", f"{type(e).__name__}: {e}".strip()) from None
                await asyncio.sleep(self._backoff(attempt))
            except httpx.HTTPError as e:
                raise _Stop("network error", f"{type(e).__name__}: {e}") from None
            else:
                if not (reply.status == 429 or reply.status >= 500) or attempt >= self.cfg.max_retries:
                    return reply
                await asyncio.sleep(self._retry_wait(url, reply, attempt))
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt)
        return base * self.rng.uniform(1.0, 1.1)        # jitter up only: never shorter than asked

    def _retry_wait(self, url: str, reply: _Reply, attempt: int) -> float:
        after = parse_retry_after(reply.headers.get("retry-after")) if reply.status in (429, 503) else None
        if after is None:
            return self._backoff(attempt)
        if after > self.cfg.max_retry_after_s:
            raise _Stop("http error", f"HTTP {reply.status}, Retry-After {after:.0f}s "
                                      f"> max_retry_after_s {self.cfg.max_retry_after_s:g}")
        after *= self.rng.uniform(1.0, 1.05)
        self._gate(url).defer(after)                   # the server asked the whole host to wait
        return after

    async def _attempt(self, url: str, row: Row, robots: bool) -> _Reply:
        await self._guard(url, retrying=True)   # every request, retries too: DNS may have changed
        async with self._gate(url).slot(self.global_sem):
            row.attempts += 1
            row.fetch_time = datetime.now(timezone.utc)
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(self.deadline):
                    async with self.client.stream("GET", url) as resp:
                        return await self._read(resp, row, robots)
            finally:
                row.elapsed_s = time.monotonic() - t0

    async def _read(self, resp: httpx.Response, row: Row, robots: bool) -> _Reply:
        req = resp.request
        reply = _Reply(resp.status_code, resp.reason_phrase, resp.http_version, resp.headers,
                       f"GET {req.url.raw_path.decode('ascii')} HTTP/1.1",
                       _headers(req.headers.raw), _peer_ip(resp))
        row.status, row.content_type, row.bytes = resp.status_code, resp.headers.get("content-type"), 0
        self._check_peer(reply.ip)
        if not 200 <= resp.status_code < 300:
            return reply                                # redirects/errors: the body is not kept
        if robots:                                      # robots.txt: any type, truncated at the cap
            reply.body = await _read_capped(resp.aiter_bytes(), ROBOTS_MAX_BYTES, row, truncate=True)
            return reply
        if media_type(row.content_type) not in self.allowed_types:
            raise _Stop("wrong type", f"content-type {row.content_type!r}")
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.cfg.max_bytes:
            raise _Stop("too large", f"Content-Length {length} > max_bytes {self.cfg.max_bytes}")
        # Raw bytes, still content-encoded: the WARC keeps what the wire carried.
        reply.body = await _read_capped(resp.aiter_raw(), self.cfg.max_bytes, row)
        return reply

    def _check_peer(self, ip: str | None) -> None:
        # Second look after connecting: catches a name that re-resolved to a private
        # address after `check_url_allowed` (DNS rebinding). The request was sent,
        # but nothing from it is read or stored.
        if ip and not self.cfg.allow_private_hosts and (reason := is_forbidden_ip(ip)):
            raise _Stop("refused", f"connected to {reason}")

    # ---- robots.txt ----
    async def _robots_allow(self, url: str) -> bool:
        if not self.cfg.respect_robots:
            return True
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:                   # fetched once; concurrent URLs share the task
            self.robots[origin] = self.tg.create_task(self._load_robots(origin))
        rules = await self.robots[origin]
        return rules is None or rules.can_fetch(url, self.ua_token)

    async def _load_robots(self, origin: str) -> Protego | None:
        """Parsed rules, None for "allow all", or a disallow-all parser (RFC 9309 2.3.1)."""
        try:
            return await self._fetch_robots(origin)
        except Exception as e:  # unreachable robots.txt means "stay away"; never fail the crawl
            log.info("crawler: robots.txt of %s unreachable (%s): disallow all", origin, e)
            return _DISALLOW_ALL

    async def _fetch_robots(self, origin: str) -> Protego | None:
        url, row = origin + "/robots.txt", Row(url=origin + "/robots.txt")
        for _ in range(self.cfg.max_redirects + 1):    # each hop goes through guard + gate
            reply = await self._request(url, row, robots=True)
            if reply.status not in REDIRECTS or not reply.headers.get("location"):
                break
            url = normalize_url(urljoin(url, reply.headers["location"]))
        else:
            return None                                 # too many redirects: "unavailable"
        if 200 <= reply.status < 300:
            rules = Protego.parse(reply.body.decode("utf-8", errors="replace"))
            if (delay := rules.crawl_delay(self.ua_token)) is not None:
                gate = self._gate(origin)
                gate.delay = max(gate.delay, min(float(delay), self.cfg.max_crawl_delay_s))
            return rules
        # 4xx means "no robots.txt": allow all. 429 is a server asking us to slow down,
        # so like 5xx (server error) we stay away: disallow all.
        return None if 400 <= reply.status < 500 and reply.status != 429 else _DISALLOW_ALL

    # ---- storing ----
    async def _store(self, row: Row, url: str, reply: _Reply) -> None:
        status_line = f"{reply.http_version} {reply.status} {reply.reason}".rstrip()
        async with self.warc_lock:                     # one writer; gzip -9 runs off the event loop
            row.warc_file, row.warc_offset, row.warc_length = await asyncio.to_thread(
                self.warc.write_exchange, url, reply.request_headers, status_line,
                _headers(reply.headers.raw), reply.body, row.fetch_time, reply.ip, reply.request_line)
        if self.cfg.follow_links and row.depth < self.cfg.max_depth \
                and media_type(row.content_type) in HTML_TYPES:
            for link in await asyncio.to_thread(self._links, reply, url):
                if same_site(link, row.site) and self._admit(link, row.depth + 1, row.site):
                    row.links.append(link)       # journaled, so a resumed crawl re-queues it

    def _links(self, reply: _Reply, url: str) -> list[str]:
        html = decode_body(reply.body, reply.headers.get("content-encoding"), self.cfg.max_bytes)
        return extract_links(html, url) if html else []


async def _read_capped(chunks, limit: int, row: Row, truncate: bool = False) -> bytes:
    """Body up to `limit` bytes; past it, stop reading (and fail unless `truncate`)."""
    parts: list[bytes] = []
    async for chunk in chunks:
        row.bytes += len(chunk)
        parts.append(chunk)
        if row.bytes > limit:
            if truncate:
                return b"".join(parts)[:limit]
            raise _Stop("too large", f"body passed max_bytes {limit}")
    return b"".join(parts)


# -- resume ----------------------------------------------------------------------------

def _load_journal(path: Path) -> dict[str, Row]:
    """Finished rows by URL (last line wins). A torn last line (kill mid-write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "rb+") as f:
            f.truncate(keep)
        data = data[:keep]
    rows: dict[str, Row] = {}
    for line in data.decode("utf-8").splitlines():
        try:
            row = Row.from_json(line)
        except (ValueError, TypeError) as e:
            log.warning("crawler: skipping bad journal line (%s)", e)
            continue
        rows[row.url] = row
    return rows


def _resume(out_dir: Path) -> dict[str, Row]:
    """Journaled rows whose WARC records are really on disk; repairs .open WARC files."""
    rows = _load_journal(out_dir / "crawl_state" / "journal.jsonl")
    warc_dir = out_dir / "warc"
    ends: Counter = Counter()            # final file name -> end of its last journaled record
    for r in rows.values():
        if r.warc_file:
            ends[r.warc_file] = max(ends[r.warc_file], r.warc_offset + r.warc_length)
    for p in sorted(warc_dir.glob(f"*.warc.gz{OPEN_SUFFIX}")) if warc_dir.is_dir() else []:
        kept = repair_open_file(p, ends[p.name[: -len(OPEN_SUFFIX)]])
        log.info("crawler: repaired %s -> %s", p.name, kept.name if kept else "deleted (nothing journaled)")

    def on_disk(r: Row) -> bool:
        if not r.warc_file:
            return True
        f = warc_dir / r.warc_file
        return f.exists() and f.stat().st_size >= r.warc_offset + r.warc_length
    # A record lost with the file (e.g. power loss before the OS wrote it) means refetching.
    return {u: r for u, r in rows.items() if on_disk(r)}


@contextlib.contextmanager
def _exclusive(state_dir: Path):
    """One crawl per out_dir: a second one (say, a retry while the first still runs)
    would "repair" the first one's live .open file. The OS drops the lock if we die."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another crawl is running in {state_dir.parent}") from None
        yield


def _log_table(rows: list[Row]) -> pa.Table:
    cols = {name: [getattr(r, name) for r in rows] for name in LOG_SCHEMA.names}
    return pa.table(cols, schema=LOG_SCHEMA)


async def crawl(seeds: list[str], out_dir: Path, cfg: CrawlConfig,
                on_progress: Callable[[int, int], None] | None = None,
                *, warc_prefix: str = "crawl") -> dict:
    """Crawl `seeds` into out_dir/warc/ and out_dir/crawl_log.parquet; resumes a killed run.

    Returns counts by outcome, plus "total", "resumed" (rows taken from the journal)
    and "over_budget" (URLs not crawled because max_pages was reached).
    """
    out_dir = Path(out_dir)
    with _exclusive(out_dir / "crawl_state"):
        for tmp in out_dir.glob(f"{TMP_PREFIX}*-crawl_log.parquet"):   # a log write that was killed
            tmp.unlink()
        done = _resume(out_dir)
        crawler = Crawler(cfg, out_dir, done, on_progress, warc_prefix)
        await crawler.run(seeds)
        rows = sorted(crawler.rows.values(), key=lambda r: r.url)
        write_parquet_atomic(_log_table(rows), out_dir / "crawl_log.parquet")
    counts = Counter(r.outcome for r in rows)
    summary = {o: counts.get(o, 0) for o in OUTCOMES}
    summary.update(total=len(rows), resumed=len(done), over_budget=crawler.over_budget)
    log.info("crawler: %s", summary)
    return summary
