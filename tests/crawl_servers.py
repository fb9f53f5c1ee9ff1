"""Tiny threaded HTTP servers for the crawler tests.

Bound to 127.0.0.1 on a free port. Every request is logged with a server-side
monotonic timestamp, so tests can prove what the crawler did (or never did) on the
wire instead of trusting its own report. Routes are `fn(handler, n)` where n counts
the hits on that path, 1-based.
"""
from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[["Handler", int], None]


@dataclass
class Hit:
    t: float                 # time.monotonic() when the request line arrived
    path: str
    user_agent: str


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive and chunked, like real servers

    def do_GET(self) -> None:
        n = self.server.record(self.path, self.headers.get("User-Agent", ""))
        route = self.server.routes.get(self.path) or self.server.routes.get(self.path.split("?")[0])
        (route or page(b"not found", status=404))(self, n)

    def log_message(self, *args) -> None:   # keep pytest output clean
        pass


class CrawlServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Route] | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: list[Hit] = []
        self.sent: dict[str, tuple[int, bool]] = {}     # path -> (bytes written, completed)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        # a short poll interval makes shutdown() quick: tests start dozens of servers
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def record(self, path: str, ua: str) -> int:
        with self._lock:
            self.hits.append(Hit(time.monotonic(), path, ua))
            self._counts[path] = self._counts.get(path, 0) + 1
            return self._counts[path]

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        with self._lock:
            return [h.path for h in self.hits]

    def times(self) -> list[float]:
        with self._lock:
            return [h.t for h in self.hits]

    def wait_sent(self, path: str, timeout: float = 5.0) -> tuple[int, bool]:
        """Wait for a streaming route to finish (or fail) writing."""
        end = time.monotonic() + timeout
        while path not in self.sent and time.monotonic() < end:
            time.sleep(0.01)
        return self.sent[path]

    def __enter__(self) -> "CrawlServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


# -- responses -------------------------------------------------------------------------

def send(h: Handler, status: int, body: bytes = b"", headers: dict | None = None,
         length: bool = True) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if length:
        h.send_header("Content-Length", str(len(body)))
    else:                                    # no length, no chunking: body ends at close
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    h.wfile.write(body)


def page(body: bytes | str, ctype: str = "text/html; charset=utf-8", status: int = 200,
         headers: dict | None = None) -> Route:
    data = body.encode() if isinstance(body, str) else body
    return lambda h, n: send(h, status, data, {"Content-Type": ctype, **(headers or {})})


def robots(text: str) -> Route:
    return page(text, "text/plain")


def redirect(location: str, status: int = 302) -> Route:
    return page(b"", status=status, headers={"Location": location})


def gzipped(html: str) -> Route:
    data = gzip.compress(html.encode(), mtime=0)
    return page(data, headers={"Content-Encoding": "gzip"})


def chunked(html: str, pieces: int = 3) -> Route:
    data = html.encode()
    step = max(1, len(data) // pieces)

    def route(h: Handler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for i in range(0, len(data), step):
            part = data[i:i + step]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        h.wfile.write(b"0\r\n\r\n")
    return route


def sequence(*routes: Route) -> Route:
    """The n-th hit gets routes[n-1]; later hits repeat the last one."""
    return lambda h, n: routes[min(n, len(routes)) - 1](h, n)


def status(code: int, headers: dict | None = None) -> Route:
    return page(f"status {code}", status=code, headers=headers)


def stream(total: int, ctype: str, with_length: bool, chunk: int = 64 * 1024) -> Route:
    """A large body written piece by piece; records how much got out before the client hung up."""
    def route(h: Handler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        if with_length:
            h.send_header("Content-Length", str(total))
        else:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent, block = 0, b"x" * chunk
        try:
            while sent < total:
                h.wfile.write(block if with_length else b"%x\r\n%s\r\n" % (chunk, block))
                h.wfile.flush()
                sent += chunk
            if not with_length:
                h.wfile.write(b"0\r\n\r\n")
            h.server.sent[h.path] = (sent, True)
        except OSError:                       # client closed: exactly what the crawler should do
            h.server.sent[h.path] = (sent, False)
            h.close_connection = True
    return route


def slow(seconds: float, inner: Route) -> Route:
    def route(h: Handler, n: int) -> None:
        time.sleep(seconds)
        try:
            inner(h, n)
        except OSError:
            h.close_connection = True
    return route


def hang_first(release: threading.Event, inner: Route, limit: float = 20.0) -> Route:
    """First hit blocks until `release` is set (a crawl to kill mid-request); later hits answer."""
    def route(h: Handler, n: int) -> None:
        if n == 1:
            release.wait(limit)
        try:
            inner(h, n)
        except OSError:
            h.close_connection = True
    return route


def lying_length(claimed: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> Route:
    """A Content-Length that is not the body's: too long (the server then hangs up, as a
    crashed backend does) or too short (the rest spills into the keep-alive connection)."""
    def route(h: Handler, n: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(claimed))
        h.end_headers()
        try:
            h.wfile.write(body)
            h.wfile.flush()
        except OSError:
            pass
        if claimed > len(body):
            h.close_connection = True
    return route
