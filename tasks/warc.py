"""WARC / WET ingest: every page record of a file, with damaged records counted, not fatal.

fastwarc does the parsing (it is several times faster than warcio). Around it we add
what a crawl-scale reader needs and fastwarc leaves out:
- resync after a corrupt record: an OSError mid-file makes us scan for the next gzip
  member (or `WARC/` line) and carry on, so one bad record does not lose the file;
- truncation: a cut-off last gzip member is yielded by fastwarc as if whole, so the
  final record of each run is checked to end in a complete member;
- lying Content-Length in plain WARCs: each record must end exactly where the next begins.
"""
from __future__ import annotations

import gzip
import io
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fastwarc.warc import ArchiveIterator, WarcRecordType

GZIP_MAGIC = b"\x1f\x8b\x08"
_PAGE_TYPES = WarcRecordType.response | WarcRecordType.resource | WarcRecordType.conversion


@dataclass
class Record:
    """One page-bearing WARC record, payload still encoded as on the wire."""
    offset: int
    record_type: str            # response | resource | conversion
    url: str
    date: str | None
    status: int | None = None
    http_headers: dict[str, str] = field(default_factory=dict)
    payload: bytes = b""
    error: str | None = None    # rejection reason when the record itself is damaged
    error_detail: str = ""


@dataclass
class ReadStats:
    records: int = 0                                  # every record seen, any type
    by_type: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # reason -> count


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == GZIP_MAGIC


def looks_like_warc(path: str | Path) -> bool:
    """Sniff content rather than trusting the name: `WARC/` at the start, maybe gzipped."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        if head[:3] == GZIP_MAGIC:
            head = zlib.decompressobj(31).decompress(head, 64)
        return head.lstrip()[:5] == b"WARC/"
    except (OSError, zlib.error):
        return False


def _clean_uri(uri: str | None) -> str:
    # WARC/1.1 as written by wget wraps the URI in <...>
    uri = (uri or "").strip()
    return uri[1:-1] if uri.startswith("<") and uri.endswith(">") else uri


def _member_complete(data: bytes) -> bool:
    d = zlib.decompressobj(31)
    try:
        while data and not d.eof:
            d.decompress(data, 1 << 16)
            data = d.unconsumed_tail
    except zlib.error:
        return False
    return d.eof


def _inflates_to_warc(head: bytes) -> bool:
    try:
        return zlib.decompressobj(31).decompress(head, 16).startswith(b"WARC/")
    except zlib.error:
        return False


def _next_sync(f: io.BufferedReader, start: int, gz: bool) -> int | None:
    """Offset of the next plausible record start at or after `start`."""
    marker = GZIP_MAGIC if gz else b"WARC/1."
    f.seek(start)
    pos = start
    while True:
        block = f.read(1 << 20)
        if not block:
            return None
        i = block.find(marker)
        while i != -1:
            cand = pos + i
            f.seek(cand)
            head = f.read(256 if not gz else 4096)
            if not gz or _inflates_to_warc(head):
                return cand
            i = block.find(marker, i + 1)
        pos += len(block) - len(marker)
        f.seek(pos)


def _plain_record_end(f: io.BufferedReader, offset: int, content_length: int) -> int | None:
    f.seek(offset)
    head = f.read(64 * 1024)
    crlf, lf = head.find(b"\r\n\r\n"), head.find(b"\n\n")  # WET files in the wild use bare LF
    if crlf != -1 and (lf == -1 or crlf < lf):
        return offset + crlf + 4 + content_length
    return None if lf == -1 else offset + lf + 2 + content_length


def _to_record(rec) -> Record:
    rtype = str(rec.record_type).rsplit(".", 1)[-1]
    # fastwarc reports absolute file offsets, also when started mid-file
    r = Record(offset=rec.stream_pos, record_type=rtype,
               url=_clean_uri(rec.headers.get("WARC-Target-URI")), date=rec.headers.get("WARC-Date"))
    if rtype == "response":
        try:
            rec.parse_http(auto_decode="none", quirks_mode=True)
        except OSError as e:
            r.error = f"bad http headers: {e}"
        if rec.http_headers is not None:
            r.status = rec.http_headers.status_code
            r.http_headers = {k.lower(): v for k, v in rec.http_headers.items()}
    elif rtype in ("resource", "conversion"):
        ct = rec.headers.get("Content-Type")
        if ct:
            r.http_headers = {"content-type": ct}
    r.payload = rec.reader.read()
    return r


def iter_records(path: str | Path, stats: ReadStats | None = None) -> Iterator[Record]:
    """Yield page records (response/resource/conversion) of one WARC or WET file.

    Damaged records are counted in `stats.errors` and yielded with `.error` set, so
    the caller logs them as rejections; reading resumes at the next intact record.
    Each record is held back until the next one parses, so it can be checked for
    truncation (gzip) or a lying Content-Length (plain) before it is released.
    """
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    size = path.stat().st_size
    gz = is_gzip(path)
    base: int | None = 0
    with open(path, "rb") as f, open(path, "rb") as probe:
        while base is not None and base < size:
            f.seek(base)
            held: tuple[Record, int] | None = None
            resync_from: int | None = None
            try:
                for rec in ArchiveIterator(f, record_types=WarcRecordType.any_type, parse_http=False,
                                           quirks_mode=True, stream_detect=True):
                    if held is not None:
                        good = yield from _release(held, gz, probe, size, stats)
                        if not good and not gz:
                            # fastwarc trusted the bad length; re-find the true next record
                            resync_from, held = held[0].offset + 1, None
                            break
                    stats.records += 1
                    rtype = str(rec.record_type).rsplit(".", 1)[-1]
                    stats.by_type[rtype] += 1
                    cl = int(rec.headers.get("Content-Length", "0") or 0)
                    if rec.record_type & _PAGE_TYPES:
                        held = (_to_record(rec), cl)
                    else:
                        rec.reader.consume()
                        held = (Record(rec.stream_pos, rtype, "", None), cl)
            except (OSError, ValueError) as e:
                at = held[0].offset if held else base
                if held is not None:
                    yield from _release(held, gz, probe, size, stats, last=True)
                    held = None
                stats.errors["malformed record"] += 1
                yield Record(offset=at, record_type="damaged", url="", date=None, error="malformed record",
                             error_detail=f"after offset {at}: {e}")
                resync_from = at + 1
            if held is not None:
                yield from _release(held, gz, probe, size, stats, last=True)
            base = None if resync_from is None else _next_sync(probe, resync_from, gz)


def _release(held: tuple[Record, int], gz: bool, probe, size: int, stats: ReadStats, last: bool = False):
    """Yield a held page record, marked damaged if it does not end where it claims to.

    Returns whether the record was whole.
    """
    rec, cl = held
    if gz:
        # a record followed by a parsed record was whole; only the last can be cut off
        ok, reason = True, "truncated record"
        if last:
            probe.seek(rec.offset)
            start = rec.offset if probe.read(3) == GZIP_MAGIC else 0  # else whole-file gzip
            probe.seek(start)
            ok = _member_complete(probe.read(size - start))
    else:
        end = _plain_record_end(probe, rec.offset, cl)
        ok = False
        if end is not None and end <= size:
            probe.seek(end)
            after = probe.read(16).lstrip(b"\r\n\x00 ")
            ok = after == b"" or after.startswith(b"WARC/")
        reason = "truncated record" if end is None or end > size else "content-length mismatch"
    if not ok:
        stats.errors[reason] += 1
        rec.error = reason
        yield rec
    elif rec.record_type in ("response", "resource", "conversion"):
        yield rec
    return ok
