"""A reverse proxy in front of an S3 server that counts requests by operation and can inject faults.

The app talks real S3 protocol to it; the proxy forwards every request to the real server
unless a fault rule answers first.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.servers import serving_in_thread

# (operation, path, body) -> None to forward, (status, body) to answer instead, or DROP.
FaultRule = Callable[[str, str, bytes], tuple[int, bytes] | None]

# A fault answer that closes the connection unanswered, as storage that has gone away does.
DROP = (0, b"")


@dataclass(frozen=True)
class Slow:
    """How a forwarded answer misbehaves once its headers and ``after`` body bytes are sent.

    ``hold`` sends nothing at all, not even the headers, until the proxy stops;
    ``stall`` sends nothing more and keeps the connection open until the proxy stops;
    ``close`` drops the connection; ``trickle`` sends the rest one byte every ``interval``.
    """

    how: str
    after: int = 0
    interval: float = 0.5


def operation(method: str, path: str) -> str:
    """The S3 operation a request performs, as far as this service uses S3."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    has_key = parts.path.strip("/").count("/") >= 1
    if method == "GET" and "list-type" in query:
        return "ListObjectsV2"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if method == "PUT":
        return "PutObject" if has_key else "CreateBucket"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "GET":
        return "GetObject"
    if method == "DELETE":
        return "DeleteObject"
    return f"{method} other"


class S3Proxy:
    """Counts and optionally fails the requests it forwards to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream_host = target.hostname or "127.0.0.1"
        self.upstream_port = target.port or 80
        self.counts: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.fault: FaultRule | None = None
        # Operation name -> how its forwarded answers misbehave.
        self.slow: dict[str, Slow] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.completed.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _relay(self) -> None:
                body = self._body()
                name = operation(self.command, self.path)
                with proxy._lock:
                    proxy.counts[name] += 1
                answer = proxy.fault(name, self.path, body) if proxy.fault else None
                if answer == DROP:
                    self.close_connection = True
                    return
                if answer is not None:
                    status, payload = answer
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=30
                )
                dropped = {"connection", "transfer-encoding", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                slow = proxy.slow.get(name)
                if slow is not None and slow.how == "hold":
                    self.close_connection = True
                    proxy.stopping.wait()
                    upstream.close()
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD" and slow is not None:
                    self._misbehave(payload, slow)
                    upstream.close()
                    return
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()
                with proxy._lock:
                    proxy.completed[name] += 1

            def _misbehave(self, payload: bytes, slow: Slow) -> None:
                self.wfile.write(payload[: slow.after])
                self.wfile.flush()
                self.close_connection = True
                if slow.how == "stall":
                    proxy.stopping.wait()
                elif slow.how == "trickle":
                    for byte in payload[slow.after :]:
                        if proxy.stopping.wait(slow.interval):
                            return
                        try:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        except OSError:
                            return

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler

    def serving(self) -> AbstractContextManager[str]:
        """Listen on a free loopback port; yields the proxy's endpoint URL."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        self.stopping.clear()
        return _releasing(serving_in_thread(server), self.stopping)


@contextmanager
def _releasing(serving: AbstractContextManager[str], stopping: threading.Event) -> Iterator[str]:
    """Serve, and release every stalled answer when the block ends."""
    with serving as url:
        try:
            yield url
        finally:
            stopping.set()
