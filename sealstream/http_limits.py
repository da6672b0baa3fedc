"""What an HTTP listener accepts before refusing: request-head size (431), body size (413), open
connections (503), WebSocket message size (1009) and the time a request head or body may take
(408, against slowloris), from `HttpLimits` (docs/security.md).

uvicorn's own knobs do not give these answers: its parsers accept request heads of any size
(httptools) or answer 400 (h11), and its concurrency limit answers a plain-text 503. So the head
and connection limits live in a small subclass of uvicorn's httptools protocol, which refuses
while it parses (before a byte of an oversized head is buffered past the limit and before the
app runs), and the body limit in an ASGI middleware that counts the bytes as they stream in
(chunked bodies have no Content-Length to check). Every refusal has the JSON error body of
sealstream.http; the WebSocket limit is uvicorn's `ws_max_size` (the websockets library closes
with 1009).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.http11 import MAX_LINE_LENGTH as WS_MAX_LINE
from websockets.http11 import MAX_NUM_HEADERS as WS_MAX_HEADERS

from sealstream.settings import HttpLimits

log = logging.getLogger(__name__)

_REASONS = {400: b"Bad Request", 413: b"Content Too Large", 431: b"Request Header Fields Too Large"}
_REASONS[503] = b"Service Unavailable"
_REASONS[408] = b"Request Timeout"


def _refusal(status: int, code: str, message: str, retry_after: bool = False) -> bytes:
    """A complete HTTP/1.1 response with the JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after:
        head.append(b"retry-after: 1")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class LargeBody:
    """A route exempt from the listener's body limits because it streams its body and enforces
    a limit of its own (the gateway's attachment upload, up to `AttachmentSettings.max_bytes`):

    - `BodyLimit` passes its requests through uncounted (the route answers 413 itself, with its
      own error code, and never buffers the body);
    - the body deadline becomes a progress deadline: it starts again each time another
      `PROGRESS_BYTES` of the body arrived, so a large upload at a modest rate is not cut at
      `body_timeout_seconds`, while a client that stalls (or trickles below
      `PROGRESS_BYTES` per `body_timeout_seconds`) still gets 408.

    `method` is matched exactly, `path` (a regular expression) against the whole path."""

    method: str
    path: str

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.fullmatch(self.path, path) is not None


# A streamed body's deadline starts again after each of these many bytes (64 KiB per
# `body_timeout_seconds`, about 1 KiB/s at the default 60 s, is the slowest upload accepted).
PROGRESS_BYTES = 64 * 1024


def _large(large_bodies: Sequence[LargeBody], method: str, path: str) -> bool:
    return any(large.matches(method, path) for large in large_bodies)


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the response is `protocol._refusal`."""


def limited_protocol(
    limits: HttpLimits, large_bodies: Sequence[LargeBody] = ()
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the head and connection limits of `limits`; the
    routes of `large_bodies` get a progress deadline for their body (`LargeBody`)."""

    head_limit = limits.max_header_bytes
    connection_limit = limits.max_connections
    head_seconds = limits.head_timeout_seconds
    body_seconds = limits.body_timeout_seconds

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _head_bytes = 0  # bytes of the current request head seen by the parser callbacks
        _raw_head_bytes = 0  # bytes received while the current head is incomplete
        _in_head = True
        _refusal: bytes | None = None
        # The one pending read deadline (head or body); None while a response is being written
        # or the connection idles between requests (uvicorn's keep-alive timeout covers that).
        _deadline: asyncio.TimerHandle | None = None
        # Body bytes still to come before a large body's deadline starts again (None: the body
        # has one deadline for the whole of it).
        _until_progress: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(head_seconds, "request head")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._raw_head_bytes += len(data)
            super().data_received(data)
            # A head still incomplete after more bytes than the limit: refuse now rather than
            # buffer it (httptools keeps a header value whole until its end arrives).
            if (
                self._in_head
                and self._raw_head_bytes > head_limit
                and not self.transport.is_closing()
            ):
                self._refuse(431, "header_too_large", self._head_message())

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            self._in_head = True
            if self._deadline is None:  # a keep-alive connection's next request
                self._arm(head_seconds, "request head")
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._raw_head_bytes = 0
            self._arm(body_seconds, "request body")
            self._until_progress = None
            if large_bodies:
                path = self.url.split(b"?", 1)[0].decode("latin-1")
                if _large(large_bodies, self.parser.get_method().decode("latin-1"), path):
                    self._until_progress = PROGRESS_BYTES
            if len(self.connections) > connection_limit:
                log.warning("connection limit reached", extra={"limit": connection_limit})
                self._refusal = _refusal(
                    503,
                    "unavailable",
                    f"too many open connections (limit {connection_limit}); retry",
                    retry_after=True,
                )
                raise _Refused
            if self.parser.should_upgrade() and self._should_upgrade():
                self._check_handshake()
            super().on_headers_complete()

        def _check_handshake(self) -> None:
            # The WebSocket library re-parses the handshake with its own, smaller limits; a
            # request past them used to get no answer at all (uvicorn drops the library's 431
            # and leaves the connection open), so refuse it here with the JSON answer.
            method = self.parser.get_method()
            request_line = len(method) + len(self.url) + len(b"  HTTP/1.1\r\n")
            longest = max([request_line, *(len(n) + len(v) + 4 for n, v in self.headers)])
            if len(self.headers) > WS_MAX_HEADERS or longest > WS_MAX_LINE:
                self._refusal = _refusal(
                    431,
                    "header_too_large",
                    f"WebSocket handshake: at most {WS_MAX_HEADERS} headers and "
                    f"{WS_MAX_LINE} bytes per line (request line included)",
                )
                raise _Refused

        def on_body(self, body: bytes) -> None:
            if self._until_progress is not None and self._deadline is not None:
                self._until_progress -= len(body)
                if self._until_progress <= 0:
                    self._until_progress = PROGRESS_BYTES
                    self._arm(body_seconds, "request body")
            super().on_body(body)

        def handle_websocket_upgrade(self) -> None:
            self._disarm()  # the socket's own rules (auth frame wait, token expiry) apply now
            super().handle_websocket_upgrade()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()
            self._in_head = True
            self._raw_head_bytes = 0

        def _count(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > head_limit:
                self._refusal = _refusal(431, "header_too_large", self._head_message())
                raise _Refused

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._timed_out, seconds, what)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self, seconds: float, what: str) -> None:
            # A client that trickles (or never sends) its request must not hold a connection,
            # and with it a share of `max_connections`, for ever (slowloris).
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                message = f"{what} not received within {seconds:g} s"
                self.transport.write(_refusal(408, "request_timeout", message))
            self.transport.close()

        def _head_message(self) -> str:
            return f"request line and headers exceed {head_limit} bytes"

        def _refuse(self, status: int, code: str, message: str) -> None:
            self.transport.write(_refusal(status, code, message))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this for every parser error, ours (_Refused) included.
            refusal, self._refusal = self._refusal, None
            self.transport.write(refusal or _refusal(400, "bad_request", "malformed HTTP request"))
            self.transport.close()

    return LimitedHttpToolsProtocol


class BodyTooLarge(HTTPException):
    """A request body over the listener's limit (an HTTPException so FastAPI's body reading
    passes it through unchanged and the app's error handler answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body exceeds {limit} bytes")


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, by Content-Length at
    once, else by counting the body as it arrives (chunked transfer has no length up front).
    Requests of `large_bodies` pass through: their route limits its body itself."""

    def __init__(self, app: ASGIApp, limit: int, large_bodies: Sequence[LargeBody] = ()) -> None:
        self.app = app
        self.limit = limit
        self.large_bodies = tuple(large_bodies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            self.large_bodies and _large(self.large_bodies, scope["method"], scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _send_413(send, self.limit)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            # Only reached when the app did not turn it into a response itself.
            if not started:
                await _send_413(send, self.limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(
        {"error": {"code": "payload_too_large", "message": f"body exceeds {limit} bytes"}}
    ).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
