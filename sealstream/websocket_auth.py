"""Who a WebSocket speaks for: the token handshake and expiry shared by the gateway's `/v1/ws`
and delivery's `/v1/stream`.

The socket is accepted first, then refused with close code 1008 and a reason (`invalid token`,
`token expired`, `authentication required`): a refusal before the handshake is an HTTP 403 that
browsers cannot read. A token comes from, best first, the subprotocol header
`Sec-WebSocket-Protocol: bearer, <jwt>` (answered `bearer`, never the token), an
`Authorization: Bearer <jwt>` header, a first frame `{"auth": "<jwt>"}` (answered
`{"ok": true, "authenticated": true}`, within `AUTH_FRAME_SECONDS`), or `?token=<jwt>`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

from fastapi import WebSocket, status

from sealstream.auth import AuthError, Principal, VerifiedTokens
from sealstream.http import error_body

BEARER = "bearer"  # the WebSocket subprotocol that carries a token: `bearer, <jwt>`
AUTH_FRAME_SECONDS = 10.0  # how long a socket without a handshake token may wait for `auth`
POLICY = status.WS_1008_POLICY_VIOLATION


async def accept(socket: WebSocket) -> None:
    """Accept the handshake, answering the `bearer` subprotocol when the client offered it."""
    offered = socket.scope.get("subprotocols") or []
    await socket.accept(subprotocol=BEARER if BEARER in offered else None)


def handshake_token(socket: WebSocket) -> str | None:
    """The token of the handshake: subprotocol, Authorization header or (discouraged) query."""
    offered = socket.scope.get("subprotocols") or []
    if BEARER in offered and len(offered) > offered.index(BEARER) + 1:
        return str(offered[offered.index(BEARER) + 1])
    header = socket.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return socket.query_params.get("token")


async def socket_principal(socket: WebSocket, tokens: VerifiedTokens) -> Principal | None:
    """Who the accepted socket speaks for; None once it was closed with 1008 for a missing,
    invalid or expired token (then nothing else is read from it)."""
    token = handshake_token(socket)
    from_frame = token is None
    if from_frame:
        try:
            first = await asyncio.wait_for(socket.receive(), AUTH_FRAME_SECONDS)
        except TimeoutError:
            await socket.close(code=POLICY, reason="authentication required")
            return None
        if first["type"] == "websocket.disconnect":
            return None
        token, extra = auth_frame(frame_text(first))
        if token is None:
            await socket.close(code=POLICY, reason="authentication required")
            return None
        if extra:
            # A message riding on the auth frame would otherwise be dropped without a word:
            # refuse the frame, name what does not belong, and nothing is acted upon.
            await socket.send_json(
                {
                    "ok": False,
                    **error_body(
                        "invalid_request",
                        "frame: the auth frame holds only `auth`; send messages after the "
                        f"authenticated answer (unexpected: {', '.join(extra)})",
                        "frame",
                    ),
                }
            )
            await socket.close(code=POLICY, reason="auth frame holds only auth")
            return None
    try:
        principal = tokens.principal(token or "")
    except AuthError as err:
        reason = "token expired" if "expired" in str(err) else "invalid token"
        await socket.close(code=POLICY, reason=reason)
        return None
    if from_frame:
        await socket.send_json({"ok": True, "authenticated": True})
    return principal


def auth_frame(raw: str | None) -> tuple[str | None, list[str]]:
    """The token of a first frame `{"auth": "<jwt>"}` (None if it is not one), and the names
    of any other fields it carries (at most 5, each cut to 40 characters), sorted."""
    try:
        frame = json.loads(raw or "")
    except (ValueError, RecursionError):
        return None, []
    token = frame.get("auth") if isinstance(frame, dict) else None
    if not (isinstance(token, str) and token):
        return None, []
    return token, sorted(str(name)[:40] for name in frame if name != "auth")[:5]


def seconds_left(principal: Principal) -> float | None:
    """Seconds until the token's `exp` (None: no expiry)."""
    return None if principal.expires_at is None else principal.expires_at - time.time()


async def receive_until_expiry(socket: WebSocket, principal: Principal) -> Mapping[str, Any] | None:
    """The next message; None once the token expired and the socket was closed with 1008."""
    remaining = seconds_left(principal)
    try:
        if remaining is not None and remaining <= 0:
            raise TimeoutError
        # `asyncio.timeout`, not `wait_for`: wait_for wraps each receive in a task of its own.
        async with asyncio.timeout(remaining):
            return await socket.receive()
    except TimeoutError:
        await socket.close(code=POLICY, reason="token expired")
        return None


def frame_text(message: Mapping[str, Any]) -> str | None:
    """The frame as text; None for a binary frame that is not UTF-8."""
    text = message.get("text")
    if isinstance(text, str):
        return text
    try:
        return bytes(message.get("bytes") or b"").decode("utf-8")
    except UnicodeDecodeError:
        return None
