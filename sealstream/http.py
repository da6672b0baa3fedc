"""What the HTTP services share: authentication, error bodies, health, readiness and metrics.

Errors always have the body {"error": {"code", "message", "field"?}}: the client learns exactly
what was wrong (field, limit, reason) and never sees a stack trace, an input echo or a 500 for
its own mistake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sealstream.auth import ADMIN_ROLE, AuthError, Principal, VerifiedTokens
from sealstream.errors import (
    DecryptionError,
    InvalidMessage,
    KeyDestroyed,
    KeyNotFound,
    KmsError,
    SealstreamError,
)
from sealstream.http_limits import BodyLimit, LargeBody, limited_protocol
from sealstream.settings import AuthSettings, HttpSettings

log = logging.getLogger(__name__)

REQUEST_SECONDS = Histogram(
    "sealstream_http_request_seconds",
    "HTTP request latency",
    ["service", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


class ApiError(Exception):
    """An error meant for the client: HTTP status, a stable code and a readable message."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


def _json_error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


_bearer = HTTPBearer(auto_error=False)


# The auth dependencies are `async def` on purpose: they only check a signature, and a plain
# `def` dependency costs every request a hop to the thread pool and back.
async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthenticated", "missing bearer token (Authorization: Bearer ...)")
    tokens: VerifiedTokens = request.app.state.verified_tokens
    try:
        return tokens.principal(credentials.credentials)
    except AuthError as err:
        raise ApiError(401, "unauthenticated", str(err)) from None


async def current_user(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    return principal.user_id


async def current_admin(principal: Annotated[Principal, Depends(current_principal)]) -> str:
    """The operator behind an admin request (recorded in the key audit trail)."""
    if ADMIN_ROLE not in principal.roles:
        raise ApiError(403, "forbidden", f"this operation needs the '{ADMIN_ROLE}' role")
    return principal.user_id


CurrentUser = Annotated[str, Depends(current_user)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
CurrentAdmin = Annotated[str, Depends(current_admin)]


# A message id in a URL: decimal, as the APIs return it (64-bit ids exceed JavaScript's integers).
# The pattern stops below 2**63 - 1 (9.2e18) at 8999999999999999999 so that the description
# refuses no id the API accepts, and vice versa (Snowflake ids stay below it for centuries).
MESSAGE_ID_PATTERN = r"^([1-9][0-9]{0,17}|[1-8][0-9]{18})$"
MessageIdPath = Annotated[
    str,
    Path(
        pattern=MESSAGE_ID_PATTERN,
        description="Decimal 64-bit message id",
    ),
]
_MAX_MESSAGE_ID = 2**63 - 1  # Cassandra bigint; Snowflake ids are 63-bit


def message_id(raw: str) -> int:
    """The value of a `MessageIdPath` parameter; 422 naming the field when out of range."""
    value = int(raw)
    if not 1 <= value <= _MAX_MESSAGE_ID:
        raise ApiError(
            422,
            "invalid_request",
            "path.message_id: must be a decimal 64-bit message id",
            "path.message_id",
        )
    return value


def readiness(check: Callable[[], object]) -> Callable[[], Awaitable[bool]]:
    """Turn a blocking dependency check (raises when a dependency is down) into `/readyz`."""

    async def ready() -> bool:
        try:
            await asyncio.to_thread(check)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.warning("not ready", extra={"error": type(exc).__name__})
            return False

    return ready


class _RequestTiming:
    """Request latency by route and status, as a plain ASGI middleware (Starlette's
    `BaseHTTPMiddleware` costs a task group and two memory streams per request)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            REQUEST_SECONDS.labels(
                self.service, getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - started)


def install(
    app: FastAPI,
    service: str,
    auth: AuthSettings,
    ready: Callable[[], Awaitable[bool]],
) -> None:
    """Add error handlers, request metrics, /healthz, /readyz and /metrics to a service app."""
    app.state.auth_settings = auth
    # Verified tokens are cached until their `exp` (sealstream.auth.VerifiedTokens).
    app.state.verified_tokens = VerifiedTokens(auth)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _json_error(exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the rule; do not echo the input back (it may be message text).
        problems = [
            {"field": "body", "reason": "malformed JSON"}
            if err.get("type") == "json_invalid"
            else {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body",
                "reason": str(err.get("msg", "invalid")),
            }
            for err in exc.errors()
        ]
        first = problems[0] if problems else {"field": "body", "reason": "invalid"}
        body = error_body("invalid_request", f"{first['field']}: {first['reason']}", first["field"])
        body["error"]["problems"] = problems
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8): invalid input like any
            # other malformed body, so the same 422 naming the field.
            return _json_error(422, "invalid_request", "body: malformed JSON", "body")
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _json_error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(SealstreamError)
    async def _domain(_: Request, exc: SealstreamError) -> JSONResponse:
        if isinstance(exc, InvalidMessage):
            return _json_error(422, "invalid_message", str(exc))
        if isinstance(exc, KeyDestroyed):
            return _json_error(410, "gone", "this chat was deleted")
        if isinstance(exc, KeyNotFound):
            return _json_error(404, "not_found", "no such chat or message")
        if isinstance(exc, DecryptionError | KmsError):
            log.error("integrity failure", extra={"error": type(exc).__name__})
            return _json_error(
                500, "integrity_error", "the stored message failed its integrity check"
            )
        if exc.retriable:
            log.warning("dependency unavailable", extra={"error": str(exc)})
            return _json_error(503, "unavailable", "a backing service is unavailable; retry")
        log.error("unexpected domain error", extra={"error": type(exc).__name__})
        return _json_error(500, "internal", "internal error")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        # A bug still answers the documented error body (Starlette's default is plain text);
        # the type only is logged: a library's message may quote data we do not control.
        log.error("unhandled error", extra={"error": type(exc).__name__})
        return _json_error(500, "internal", "internal error")

    app.add_middleware(_RequestTiming, service=service)
    app.openapi = lambda: _openapi_with_errors(app)  # type: ignore[method-assign]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ok = await ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable, machine-readable"},
                "message": {"type": "string", "description": "Names the field and the rule"},
                "field": {"type": "string", "description": "The offending field, if one"},
                "problems": {
                    "type": "array",
                    "description": "422 only: every invalid field",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
                    },
                },
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
# What each status means on every route that can answer it (the listener's limits included).
_STATUS_TEXT = {
    "401": "Missing, invalid or expired bearer token",
    "403": "Not allowed: not a participant of the chat, another tenant, or not an admin",
    "404": "No such chat, message, tenant or job",
    "408": "Request head or body not complete in time (HttpLimits.head/body_timeout_seconds)",
    "410": "The chat was deleted",
    "413": "Request body over the listener's limit (HttpLimits.max_body_bytes)",
    "422": "Invalid request; `field` names the offending field and `message` the rule",
    "431": "Request line and headers over the listener's limit (HttpLimits.max_header_bytes)",
    "500": "Internal error (a stored message failing its integrity check, or a bug)",
    "503": "A backing service is unavailable, or too many connections; retry (Retry-After)",
}


def _openapi_with_errors(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI description with every error it can answer, each with the real error
    body (FastAPI documents only 422, with its own shape, which these services never send)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = FastAPI.openapi(app)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError", "ErrorOut", "ErrorDetail"):
        schemas.pop(unused, None)
    schemas["Error"] = _ERROR_SCHEMA
    admin = app.title.endswith("admin")
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            # 413: the body limit answers on every method, GET included.
            codes = {"401", "408", "413", "422", "431", "500", "503"}
            if admin:
                codes.add("403")
            if "{" in path:
                codes |= {"403", "404"}
            if "{chat_id}" in path:  # a deleted chat; jobs and tenants are never "gone"
                codes.add("410")
            responses = operation.setdefault("responses", {})
            for code in sorted(codes | {c for c in responses if c[0] in "45"}):
                described = responses.get(code, {}).get("description")
                responses[code] = {
                    "description": described or _STATUS_TEXT.get(code, "Error"),
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
    app.openapi_schema = schema
    return schema


def _closing_lifespan(
    close: Callable[[], None],
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(close)
            log.info("stopped, connections closed")

    return lifespan


def server_config(
    app: FastAPI,
    http: HttpSettings,
    ws_deflate: bool = True,
    large_bodies: Sequence[LargeBody] = (),
) -> uvicorn.Config:
    """uvicorn's configuration for `app` on `http`, with the listener's limits (`HttpLimits`)
    installed: the body limit as the app's outermost middleware, the head, connection and
    deadline limits in the protocol. `large_bodies`: routes that stream a body past
    `max_body_bytes` and limit it themselves (`sealstream.http_limits.LargeBody`)."""
    # Outermost, so that no other layer buffers a body before it is counted.
    app.add_middleware(BodyLimit, limit=http.limits.max_body_bytes, large_bodies=large_bodies)
    return uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        # Head (431) and connection (503) limits while parsing; messages (1009) by websockets.
        http=limited_protocol(http.limits, large_bodies),
        ws_per_message_deflate=ws_deflate,
        ws_max_size=http.limits.max_ws_frame_bytes,
        # TLS only when both certificate and key are set (production requires it).
        ssl_certfile=str(http.tls_cert) if http.tls else None,
        ssl_keyfile=str(http.tls_key) if http.tls else None,
        log_config=None,  # keep the JSON logging configured by the service
        # No access log: URLs carry search words, i.e. message text.
        access_log=False,
    )


def serve(
    app: FastAPI,
    http: HttpSettings,
    close: Callable[[], None],
    ws_deflate: bool = True,
    large_bodies: Sequence[LargeBody] = (),
) -> None:
    """Run an app with uvicorn until SIGTERM/SIGINT, then close what the wiring opened.
    `ws_deflate=False` refuses WebSocket per-message compression (live delivery: see there);
    `large_bodies` as for `server_config`."""
    # uvicorn re-raises SIGTERM after its graceful shutdown, so close on the app's shutdown
    # (the `finally` covers start-up failures; closing twice is a no-op).
    app.router.lifespan_context = _closing_lifespan(close)
    try:
        server = uvicorn.Server(server_config(app, http, ws_deflate, large_bodies))
        server.run()
        if not server.started:  # e.g. the port is taken: exit non-zero, as uvicorn.run does
            raise SystemExit(3)
    finally:
        close()
