"""Turn a WARC payload into text: undo transfer and content encodings, then find the charset.

Every limit here exists because of real crawl data: gzip bombs (bounded inflation),
servers that label gzip bodies as plain or plain bodies as gzip, chunked bodies stored
as-is by some crawlers (wget), and pages whose declared charset is wrong.
"""
from __future__ import annotations

import codecs
import re
import zlib

try:
    import brotli  # shipped with the pinned stack (urllib3[brotli] via trafilatura)
except ImportError:  # pragma: no cover
    brotli = None


class DecodeError(ValueError):
    """A payload that cannot be decoded; the message is the rejection reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


_CHUNK_LINE = re.compile(rb"[0-9a-fA-F]{1,8}(;[^\r\n]*)?\r?\n")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9_\-.]+)""", re.I)


def dechunk(body: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer coding; bodies that are not chunked come back as they are."""
    if not _CHUNK_LINE.match(body):
        return body
    out, pos = [], 0
    while True:
        m = _CHUNK_LINE.match(body, pos)
        if not m:
            return body  # not chunked after all: keep the original rather than mangle it
        n = int(m.group(0).split(b";")[0].strip(), 16)
        start = m.end()
        if n == 0:
            return b"".join(out)
        if start + n > len(body):  # truncated final chunk: keep what arrived
            out.append(body[start:])
            return b"".join(out)
        out.append(body[start:start + n])
        pos = start + n
        while body[pos:pos + 1] in (b"\r", b"\n"):
            pos += 1


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(body, limit + 1)
    if len(out) > limit:
        raise DecodeError("decoded too large", f"inflates past {limit} bytes")
    if not d.eof:
        raise DecodeError("truncated payload", f"compressed body ends early after {len(out)} bytes")
    return out


def decode_content(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding with inflation bounded by `limit` bytes (gzip-bomb safe)."""
    enc = (content_encoding or "").lower().strip()
    try:
        if body[:2] == b"\x1f\x8b" and enc in ("gzip", "x-gzip", ""):
            return _inflate(body, 31, limit)   # also catches gzip served without a header
        if enc == "deflate":
            try:
                return _inflate(body, 15, limit)
            except zlib.error:
                return _inflate(body, -15, limit)  # raw deflate, as some servers send
        if enc == "br" and brotli is not None:
            d = brotli.Decompressor()
            out = d.process(body, output_buffer_limit=limit + 1) if _brotli_has_limit() else d.process(body)
            if len(out) > limit:
                raise DecodeError("decoded too large", f"inflates past {limit} bytes")
            return out
    except (zlib.error, brotli.error if brotli else zlib.error) as e:
        raise DecodeError("bad content-encoding", f"{enc or 'gzip'}: {e}") from None
    # Common Crawl stores decoded bodies and keeps the header; trust the bytes, not the label
    if len(body) > limit:
        raise DecodeError("too large", f"{len(body)} bytes")
    return body


def _brotli_has_limit() -> bool:
    import inspect
    try:
        return "output_buffer_limit" in inspect.signature(brotli.Decompressor.process).parameters
    except (TypeError, ValueError):
        return False


def _valid_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().strip("\"'").lower()).name
    except LookupError:
        return None


def _normalize(name: str | None) -> str | None:
    v = _valid_codec(name)
    # pages labelled latin-1 are nearly always windows-1252 (as browsers assume)
    return "cp1252" if v in ("latin_1", "iso8859-1", "ascii") else v


def _declared(body: bytes, header_charset: str | None) -> list[str]:
    """Charsets the page claims: HTTP header, then XML declaration and <meta>."""
    head = body[:4096]
    return [header_charset or ""] + [m.group(1).decode("ascii", "ignore")
                                     for m in (_XML_ENCODING.search(head), _META_CHARSET.search(head)) if m]


def sniff_charset(body: bytes, header_charset: str | None) -> list[str]:
    """Candidate charsets, most trusted first: BOM, UTF-8, HTTP header, <meta>/XML declaration."""
    cands: list[str] = []
    for bom, name in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            cands.append(name)
    # valid UTF-8 with non-ASCII bytes is almost never an accident, while labels often are
    cands += ["utf-8"] + _declared(body, header_charset)
    seen, out = set(), []
    for c in cands:
        v = _normalize(c)
        if v and v not in seen:
            seen.add(v)
            out.append(v)
    return out


def to_text(body: bytes, header_charset: str | None = None) -> tuple[str, str]:
    """Decode bytes to str; returns (text, charset used). See `decode_text`."""
    text, charset, _ = decode_text(body, header_charset)
    return text, charset


def decode_text(body: bytes, header_charset: str | None = None) -> tuple[str, str, str | None]:
    """Decode bytes to str; returns (text, charset used, repair or None).

    A declared charset is used only if the bytes really decode in it: mislabelled
    pages are common, so a failing label falls through to UTF-8, then detection.
    The repair says what was wrong with a page that still decoded: "charset label
    wrong" (it decoded in another charset than it claims) or "invalid utf-8 replaced".
    """
    text, charset, repair = _decode(body, header_charset)
    if repair is None and not body.isascii():
        label = next((v for v in map(_normalize, _declared(body, header_charset)) if v), None)
        if label and label != _normalize(charset):
            repair = "charset label wrong"
    return text, charset, repair


def _decode(body: bytes, header_charset: str | None) -> tuple[str, str, str | None]:
    for cs in sniff_charset(body, header_charset) + ["utf-8"]:
        try:
            return body.decode(cs), cs, None
        except (UnicodeDecodeError, LookupError):
            continue
    # UTF-8 with a few broken bytes (a cut multi-byte character, a stray legacy byte) keeps
    # its UTF-8: valid multi-byte sequences outnumbering invalid ones are no accident
    text = body.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if len(text) - len(text.encode("ascii", "ignore")) - bad > bad:
        return text, "utf-8", "invalid utf-8 replaced"
    from charset_normalizer import from_bytes

    # detection is guesswork on short inputs; below 1 KB windows-1252 is the safer bet
    matches = from_bytes(body[:200_000]) if len(body) >= 1024 else []
    best = matches.best() if matches else None
    if best is not None and best.encoding:
        enc = best.encoding
        # on a tie, windows-1252: the web's most common legacy charset (cp1250 wins ties by name)
        if any(m.encoding == "cp1252" and (m.chaos, m.coherence) == (best.chaos, best.coherence) for m in matches):
            enc = "cp1252"
        return body.decode(enc, errors="replace"), enc, None
    return body.decode("cp1252", errors="replace"), "cp1252", None
