"""URL normalization and link extraction for the crawler.

Normalization is what makes dedup work: two spellings of one page must map to one
string, or the crawler fetches it twice. We only apply rewrites that cannot change
which resource a server returns (RFC 3986 section 6 "syntax-based" normalization),
plus two crawler conventions: the fragment is dropped (never sent to the server) and
query parameters are sorted (almost every server treats them as a set).

Credentials are dropped, never sent: userinfo (https://user:pass@host/) and credential query
parameters (?token=, ?api_key=, ... : core.redact.SECRET_PARAMS). The crawler collects public
pages; a URL that only works with a secret in it would put that secret into the WARC files, the
crawl log, the extracted documents' `url` column and the run's logs, all of which are shared.
"""
from __future__ import annotations

import re
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

import lxml.etree
import lxml.html

from core.redact import SECRET_PARAMS, redact_url

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as-is when re-quoting; "%" keeps existing escapes intact.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _fix_escapes(s: str) -> str:
    # "%7e" and "~" and "%7E" are one URL (RFC 3986 6.2.2.2): decode unreserved, uppercase the rest.
    def fix(m: re.Match) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()
    return _ESCAPE.sub(fix, s)


def _idna_host(host: str) -> str:
    if host.startswith("["):                  # IPv6 literal: keep as written, lowercased
        return host
    host = host.rstrip(".")                    # "example.com." and "example.com" are one host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"bad host {host!r}: {e}") from None


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4; unlike posixpath.normpath it keeps '//' and trailing slashes."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def _sort_query(query: str) -> str:
    # Sort the raw "k=v" pairs by key instead of parse+urlencode, which
    # would re-encode values ("+" vs "%20") and so change what the server sees.
    pairs = [p for p in query.split("&") if p and unquote(p.split("=", 1)[0]).strip().lower() not in SECRET_PARAMS]
    pairs.sort(key=lambda p: p.split("=", 1)[0])   # stable: repeated keys keep their order
    return "&".join(_fix_escapes(quote(p, safe=_QUERY_SAFE)) for p in pairs)


def normalize_url(url: str) -> str:
    """Canonical form of an http(s) URL; ValueError for anything we would not fetch."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {redact_url(url)!r}")
    host = parts.hostname                      # already lowercased, brackets stripped
    if ":" in host:
        host = f"[{host}]"
    host = _idna_host(host)
    port = parts.port                          # raises ValueError for a bad port
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    # Credentials in a URL are dropped on purpose: the crawler never sends any (module docstring).
    path = _fix_escapes(quote(_remove_dot_segments(parts.path or "/"), safe=_PATH_SAFE))
    return urlunsplit((scheme, netloc, path, _sort_query(parts.query), ""))


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def same_site(a: str, b: str) -> bool:
    """Same host, treating "www.example.com" and "example.com" as one site (ports ignored)."""
    def site(u: str) -> str:
        h = host_of(u)
        return h[4:] if h.startswith("www.") else h
    return site(a) != "" and site(a) == site(b)


def extract_links(html: bytes | str, base_url: str) -> list[str]:
    """Absolute, normalized http(s) links of <a>/<area href>, in document order, unique."""
    if not html or not html.strip():
        return []
    if isinstance(html, str) and html.lstrip().startswith("<?xml"):
        html = html.encode("utf-8")            # lxml refuses str input with an encoding declaration
    try:
        doc = lxml.html.fromstring(html)
    except (ValueError, lxml.etree.ParserError):
        return []
    base = base_url
    for b in doc.iter("base"):                 # <base href> changes how relative links resolve
        if b.get("href"):
            base = urljoin(base_url, b.get("href").strip())
        break
    seen: dict[str, None] = {}
    for el in doc.iter("a", "area"):
        href = el.get("href")
        if not href:
            continue
        try:
            seen.setdefault(normalize_url(urljoin(base, href.strip())), None)
        except ValueError:
            continue                           # mailto:, javascript:, malformed: not crawlable
    return list(seen)
