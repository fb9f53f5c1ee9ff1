"""Serve the pages of a WARC file over HTTP on 127.0.0.1, for the crawl demo and tests.

`refinery run` uses it to show the crawler end to end without the internet: the
bundled real pages are served at http://127.0.0.1:PORT/<original host>/<original path>,
with a robots.txt that disallows one path, so politeness is visible in the crawl log.
"""
from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

from tasks.warc import iter_records

ROBOTS = b"User-agent: *\nDisallow: /private/\n"


def load_pages(warc_path: str) -> dict[str, tuple[str, bytes]]:
    pages = {}
    for rec in iter_records(warc_path):
        if rec.error or rec.status not in (200, None):
            continue
        u = urlsplit(rec.url)
        path = f"/{u.hostname}{u.path or '/'}" + (f"?{u.query}" if u.query else "")
        pages[path] = (rec.http_headers.get("content-type", "text/html"), rec.payload)
    return pages


@contextlib.contextmanager
def serve_pages(warc_path: str, extra: dict[str, tuple[str, bytes]] | None = None) -> Iterator[tuple[str, list[str]]]:
    """Yield (base_url, page_urls) while a loopback server serves the WARC's pages."""
    pages = load_pages(warc_path) | (extra or {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server naming
            if self.path == "/robots.txt":
                ctype, body = "text/plain", ROBOTS
            elif self.path in pages:
                ctype, body = pages[self.path]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the demo's console for the pipeline's own output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield base, [base + p for p in sorted(pages)]
    finally:
        server.shutdown()
        server.server_close()
