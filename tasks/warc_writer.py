"""Rotating WARC/1.1 writer for the crawler: one gzip member per record.

Gzip per record is what lets a reader seek straight to one record with the
(file, offset, length) kept in the crawl log, the way Common Crawl's index does.

A file is written as NAME.warc.gz.open and renamed to NAME.warc.gz only once it is
closed (rotation or end of crawl), so a final name always means a complete file.
`repair_open_file` turns the .open file a killed crawl leaves behind into a final one.
"""
from __future__ import annotations

import io
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

OPEN_SUFFIX = ".open"
WARC_1_1_SPEC = "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/"
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<n>\d{5,})\.warc\.gz(?:\.open)?$")


def _warc_date(t: datetime) -> str:
    # WARC/1.1 allows sub-second precision (W3C-ISO8601, always UTC).
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wire_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # httpx has already removed the chunked framing from the body, so a stored
    # "Transfer-Encoding: chunked" would make readers de-chunk plain bytes. Keep the
    # fact under another name, as Common Crawl does.
    return [("X-Crawler-Transfer-Encoding" if k.lower() == "transfer-encoding" else k, v)
            for k, v in headers]


def _request_line(url: str) -> str:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"GET {target} HTTP/1.1"


def file_index(name: str, prefix: str) -> int | None:
    """Sequence number of a `{prefix}-NNNNN.warc.gz[.open]` name, else None."""
    m = _NAME.match(name)
    return int(m["n"]) if m and m["prefix"] == prefix else None


class RotatingWarcWriter:
    """Append request/response pairs; start a new file once one passes `max_bytes`.

    Files can exceed `max_bytes` by one exchange: we rotate before a write, never
    split one. Numbering continues after the highest file already in the folder, so
    a resumed crawl never appends to (or overwrites) an earlier file.
    """

    def __init__(self, dir: str | Path, prefix: str, max_bytes: int, info: dict | None = None):
        if not _SAFE_PREFIX.fullmatch(prefix):   # it becomes a file name: one plain path component only
            raise ValueError(f"WARC file prefix {prefix[:80]!r} must match {_SAFE_PREFIX.pattern}")
        self.dir = Path(dir) / "warc"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.info = {"software": "llm-refinery crawler", "format": "WARC File Format 1.1",
                     "conformsTo": WARC_1_1_SPEC,
                     **(info or {})}
        taken = [file_index(p.name, prefix) for p in self.dir.iterdir()]
        self._next = max([i for i in taken if i is not None], default=-1) + 1
        self._f: io.BufferedWriter | None = None
        self._writer: WARCWriter | None = None
        self.name: str | None = None               # final name of the file being written

    # -- file lifecycle -------------------------------------------------------------
    def _open(self) -> None:
        self.name = f"{self.prefix}-{self._next:05d}.warc.gz"
        self._next += 1
        self._f = open(self.dir / (self.name + OPEN_SUFFIX), "xb")   # "x": never clobber
        self._writer = WARCWriter(self._f, gzip=True, warc_version="1.1")
        self._writer.write_record(self._writer.create_warcinfo_record(self.name, self.info))

    def _close_file(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.dir / (self.name + OPEN_SUFFIX), self.dir / self.name)
        self._f = self._writer = None

    def close(self, finalize: bool = True) -> None:
        """Finish the current file. `finalize=False` (a crawl that failed or was
        cancelled, maybe mid-write) keeps the .open name so the next run repairs it."""
        if finalize:
            self._close_file()
        elif self._f is not None:
            self._f.close()
            self._f = self._writer = None

    def __enter__(self) -> "RotatingWarcWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- records --------------------------------------------------------------------
    def write_exchange(self, url: str, request_headers: list[tuple[str, str]],
                       response_status_line: str, response_headers: list[tuple[str, str]],
                       body: bytes, fetch_time: datetime, ip: str | None,
                       request_line: str | None = None) -> tuple[str, int, int]:
        """Write a request record then its response record; flush.

        `response_status_line` is e.g. "HTTP/1.1 200 OK"; `body` the raw bytes as
        received (still content-encoded). Returns (file name, offset, length) of the
        response record's gzip member.
        """
        if self._f is not None and self._f.tell() >= self.max_bytes:
            self._close_file()
        if self._f is None:
            self._open()
        w = self._writer
        date = _warc_date(fetch_time)
        ip_hdr = {"WARC-IP-Address": ip} if ip else {}
        protocol, _, status = response_status_line.partition(" ")
        resp = w.create_warc_record(
            url, "response", payload=io.BytesIO(body), length=len(body),
            http_headers=StatusAndHeaders(status, _wire_headers(response_headers), protocol=protocol),
            warc_headers_dict={"WARC-Date": date, **ip_hdr})
        resp_id = resp.rec_headers.get_header("WARC-Record-ID")
        req = w.create_warc_record(
            url, "request",
            http_headers=StatusAndHeaders(request_line or _request_line(url), list(request_headers),
                                          is_http_request=True),
            warc_headers_dict={"WARC-Date": date, "WARC-Concurrent-To": resp_id, **ip_hdr})
        # The pair points at each other, so either record leads a reader to the other.
        resp.rec_headers.add_header("WARC-Concurrent-To", req.rec_headers.get_header("WARC-Record-ID"))
        w.write_record(req)
        offset = self._f.tell()
        w.write_record(resp)
        length = self._f.tell() - offset
        self._f.flush()                 # the caller journals this record next: it must be in the file
        return self.name, offset, length


def repair_open_file(path: Path, keep_until: int) -> Path | None:
    """Cut a killed crawl's `.open` file to its last journaled byte and give it its final name.

    Bytes past `keep_until` were written but never journaled, so their URLs are
    fetched again; keeping them would store those pages twice. A file with nothing
    journaled in it is deleted. Returns the final path, or None if deleted.
    """
    if keep_until <= 0:
        path.unlink()
        return None
    with open(path, "rb+") as f:
        f.truncate(min(keep_until, f.seek(0, os.SEEK_END)))
        f.flush()
        os.fsync(f.fileno())
    final = path.with_name(path.name[: -len(OPEN_SUFFIX)])
    os.replace(path, final)
    return final
