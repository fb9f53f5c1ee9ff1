"""Media types, defined once: which responses are HTML, and which WARC payloads extraction reads."""
from __future__ import annotations

# what the crawler parses for links (and what a browser renders as a page)
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# extraction also reads XML-labelled and unlabelled payloads: other crawlers' WARCs label XHTML pages
# that way, and the binary sniff in tasks/extract.py rejects what is not markup
EXTRACTABLE_TYPES = HTML_TYPES | {"application/xml", "text/xml", ""}


def media_type(content_type: str | None) -> str:
    """'text/html; charset=utf-8' -> 'text/html'."""
    return (content_type or "").split(";", 1)[0].strip().lower()
