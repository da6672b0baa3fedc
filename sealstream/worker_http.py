"""A tiny HTTP endpoint for the consumer workers: /healthz, /readyz and Prometheus /metrics.

The encryptor and indexer have no API, but operators and orchestrators still need liveness,
readiness and metrics from them; the standard library's threaded server is plenty for that.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sealstream.settings import HttpSettings

_ERROR_CODES = {
    400: "bad_request",
    414: "uri_too_long",
    431: "header_too_large",
    501: "not_allowed",
}


class _HeadLimit:
    """The request stream, refusing (431) a head over `limit` bytes while it is read line by
    line, so an oversized head is never buffered (the GET-only handler never reads a body)."""

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._read = 0

    def readline(self, size: int = -1) -> bytes:
        line = self._stream.readline(size)
        self._read += len(line)
        if self._read > self._limit:
            raise http.client.LineTooLong(f"request line and headers exceed {self._limit} bytes")
        return line

    def restart(self) -> None:
        self._read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def serve(settings: HttpSettings, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    limits = settings.limits

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            super().setup()
            self.rfile = _HeadLimit(self.rfile, limits.max_header_bytes)  # type: ignore[assignment]

        def handle_one_request(self) -> None:
            self.rfile.restart()  # type: ignore[attr-defined]
            try:
                super().handle_one_request()
            except http.client.LineTooLong:  # the request line itself was over the limit
                self.send_error(431)
                self.close_connection = True

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            # The error body every Sealstream listener sends, not the library's HTML page.
            text = (
                f"request line and headers exceed {limits.max_header_bytes} bytes"
                if code == 431
                else (message or "request refused")
            )
            body = json.dumps(
                {"error": {"code": _ERROR_CODES.get(code, "http_error"), "message": text}}
            ).encode()
            self.close_connection = True
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._send(200, b'{"status": "ok"}', "application/json")
            elif self.path == "/readyz":
                ok = ready()
                self._send(
                    200 if ok else 503,
                    b'{"ready": %s}' % (b"true" if ok else b"false"),
                    "application/json",
                )
            else:
                self._send(404, b'{"error": {"code": "not_found"}}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:  # no access log noise on stderr
            return

    server = _LimitedServer((settings.host, settings.port), Handler)
    server.max_connections = limits.max_connections
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server


class _LimitedServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at once: beyond, 503 and close."""

    max_connections = 1000
    _open = 0
    _lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            refuse = self._open >= self.max_connections
            if not refuse:
                self._open += 1
        if refuse:
            body = json.dumps(
                {"error": {"code": "unavailable", "message": "too many open connections; retry"}}
            ).encode()
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open -= 1
