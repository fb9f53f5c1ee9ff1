"""WARC / WET ingest: every page record of a file, with damaged records counted, not fatal.

fastwarc does the parsing (it is several times faster than warcio). Around it we add
what a crawl-scale reader needs and fastwarc leaves out:
- resync after a corrupt record: an OSError mid-file makes us scan for the next gzip
  member (or `WARC/` line) and carry on, so one bad record does not lose the file;
- lying Content-Length: fastwarc trusts it, so a record whose length is too long swallows
  the records after it and one too short leaves a tail that shifts the stream. In plain
  WARCs each record must end exactly where the next begins; in gzip-per-record WARCs each
  record must fill exactly its own member (checked before fastwarc reads it). The same
  member check finds a cut-off last member, which fastwarc yields as if whole;
- bounded memory: a payload over `max_payload` bytes is skipped, not read (a 5 GB record
  must not become a 5 GB bytes object), and files are never read whole.
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
    payload_size: int | None = None  # when the payload was not kept (too large): its size


@dataclass
class ReadStats:
    records: int = 0                                  # every record seen, any type
    by_type: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # reason -> count


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == GZIP_MAGIC


def file_problem(path: str | Path) -> str | None:
    """None for a WARC/WET file (sniffed from content, not the name: `WARC/` at the start,
    maybe gzipped), else why it is not one, as a rejection reason for the whole file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "unreadable file"
    if not head:
        return "empty file"
    if head[:3] == GZIP_MAGIC:
        d = zlib.decompressobj(31)
        try:
            head = d.decompress(head, 64)
        except zlib.error:
            return "corrupt gzip"
        if len(head) < 5 and not d.eof:
            return "truncated gzip"        # cut off before its first record even began
    return None if head.lstrip()[:5] == b"WARC/" else "not a warc file"


def looks_like_warc(path: str | Path) -> bool:
    return file_problem(path) is None


def _clean_uri(uri: str | None) -> str:
    # WARC/1.1 as written by wget wraps the URI in <...>
    uri = (uri or "").strip()
    return uri[1:-1] if uri.startswith("<") and uri.endswith(">") else uri


def _member_complete(f: io.BufferedReader, start: int) -> bool:
    """Whether the gzip member at `start` ends before the file does (streamed: the member
    may be a whole-file gzip of gigabytes)."""
    d = zlib.decompressobj(31)
    f.seek(start)
    try:
        while not d.eof:
            data = d.unconsumed_tail or f.read(1 << 20)
            if not data:
                return False
            d.decompress(data, 1 << 20)
    except zlib.error:
        return False
    return True


def _block_start(head: bytes) -> int | None:
    crlf, lf = head.find(b"\r\n\r\n"), head.find(b"\n\n")  # WET files in the wild use bare LF
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf + 4
    return None if lf == -1 else lf + 2


def _check_member(f: io.BufferedReader, offset: int, content_length: int) -> str | None:
    """For a record starting a gzip member: None if the member holds the record's headers,
    exactly Content-Length bytes and the closing CRLFs (or further records: a whole-file
    gzip), else the damage. Inflates no further than the declared end, keeping 16 bytes."""
    d = zlib.decompressobj(31)
    f.seek(offset)
    head, want, window, total, block = b"", None, b"", 0, 1 << 14  # most members are small
    try:
        while not d.eof and (want is None or total < want + 16):
            data = d.unconsumed_tail or f.read(block)
            block = min(block * 2, 1 << 20)
            if not data:
                return "truncated record"
            out = d.decompress(data, 1 << 20)
            if want is None:
                head += out
                start = _block_start(head)
                if start is None:
                    if len(head) > 1 << 20:
                        return None        # no end of headers in sight: fastwarc's call
                    continue
                want, out, head = start + content_length, head, b""
            lo, hi = max(0, want - total), want + 16 - total
            if hi > 0:
                window += out[lo:hi]
            total += len(out)
    except zlib.error:
        return "malformed record"
    if want is None:
        return None
    if total >= want:
        rest = window.lstrip(b"\r\n\x00 ")
        return None if rest.startswith(b"WARC/") or (d.eof and not rest) else "content-length mismatch"
    # the member ended before the declared length: a lie, unless the record goes on in
    # the next member (a writer that splits records; that member is not a record start)
    f.seek(f.tell() - len(d.unused_data))
    nxt = f.read(4096)
    if nxt[:3] == GZIP_MAGIC and not _inflates_to_warc(nxt):
        return None
    return "content-length mismatch"


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
        if len(block) < 1 << 20:
            return None                # scanned to the end of the file
        pos += len(block) - len(marker) + 1  # overlap: a marker split across blocks
        f.seek(pos)


def _plain_record_end(f: io.BufferedReader, offset: int, content_length: int) -> int | None:
    f.seek(offset)
    start = _block_start(f.read(64 * 1024))
    return None if start is None else offset + start + content_length


def _to_record(rec, max_payload: int | None) -> Record:
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
    r.payload = rec.reader.read(-1 if max_payload is None else max_payload + 1)
    if max_payload is not None and len(r.payload) > max_payload:
        rec.reader.consume()
        r.payload, r.payload_size = b"", rec.content_length
        r.error, r.error_detail = "too large", f"payload over {max_payload} bytes (record of {rec.content_length})"
    return r


def _starts_member(f: io.BufferedReader, offset: int) -> bool:
    f.seek(offset)
    return f.read(3) == GZIP_MAGIC


def iter_records(path: str | Path, stats: ReadStats | None = None,
                 max_payload: int | None = None) -> Iterator[Record]:
    """Yield page records (response/resource/conversion) of one WARC or WET file.

    Damaged records are counted in `stats.errors` and yielded with `.error` set, so
    the caller logs them as rejections; reading resumes at the next intact record.
    A gzip member is checked before fastwarc reads it; other records (plain WARCs,
    whole-file gzip) are held back until the next one parses, so they can be checked
    for a lying Content-Length or a cut-off end before they are released. Payloads
    over `max_payload` bytes come back empty, marked "too large".
    """
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    size = path.stat().st_size
    gz = is_gzip(path)
    base: int | None = 0
    with open(path, "rb") as f, open(path, "rb") as probe:
        while base is not None and base < size:
            f.seek(base)
            held: tuple[Record, int, bool] | None = None
            resync_from: int | None = None
            try:
                for rec in ArchiveIterator(f, record_types=WarcRecordType.any_type, parse_http=False,
                                           quirks_mode=True, stream_detect=True):
                    if held is not None:
                        good = yield from _release(held, gz, probe, size, stats)
                        if not good:
                            # fastwarc trusted the bad length; re-find the true next record
                            resync_from, held = held[0].offset + 1, None
                            break
                    held = None
                    stats.records += 1
                    rtype = str(rec.record_type).rsplit(".", 1)[-1]
                    stats.by_type[rtype] += 1
                    cl = int(rec.headers.get("Content-Length", "0") or 0)
                    member = gz and _starts_member(probe, rec.stream_pos)
                    if member and (damage := _check_member(probe, rec.stream_pos, cl)):
                        # stop before fastwarc reads past (or short of) the member
                        stats.errors[damage] += 1
                        yield Record(rec.stream_pos, rtype, _clean_uri(rec.headers.get("WARC-Target-URI")),
                                     rec.headers.get("WARC-Date"), error=damage,
                                     error_detail=f"gzip member at offset {rec.stream_pos}, Content-Length {cl}")
                        resync_from = rec.stream_pos + 1
                        break
                    if rec.record_type & _PAGE_TYPES:
                        held = (_to_record(rec, max_payload), cl, member)
                    else:
                        rec.reader.consume()
                        held = (Record(rec.stream_pos, rtype, "", None), cl, member)
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
                good = yield from _release(held, gz, probe, size, stats, last=True)
                if not good and not gz:
                    resync_from = held[0].offset + 1  # a too-long record may have swallowed the next ones
            base = None if resync_from is None else _next_sync(probe, resync_from, gz)


def _release(held: tuple[Record, int, bool], gz: bool, probe, size: int, stats: ReadStats, last: bool = False):
    """Yield a held page record, marked damaged if it does not end where it claims to.

    Returns whether the record was whole.
    """
    rec, cl, checked = held
    ok, reason = True, "truncated record"
    if checked:
        pass                       # its gzip member was checked before it was read
    elif gz:
        # whole-file gzip: records are not members; only the end of the file can be cut off
        ok = not last or _member_complete(probe, 0)
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
