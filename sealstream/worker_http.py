"""A tiny HTTP endpoint for the consumer workers: /healthz, /readyz and Prometheus /metrics.

The encryptor and indexer have no API, but operators and orchestrators still need liveness,
readiness and metrics from them; the standard library's threaded server is plenty for that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sealstream.settings import HttpSettings


def serve(settings: HttpSettings, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
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

    server = ThreadingHTTPServer((settings.host, settings.port), Handler)
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
