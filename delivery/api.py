"""Live delivery's HTTP API: the WebSocket `/v1/stream` and the SSE stream
`GET /v1/chats/{chat_id}/events`, a thin layer over `DeliveryService` and the `Hub`.

Authentication is the gateway's and the reader's: a bearer token (sealstream.http for SSE,
sealstream.websocket_auth for the socket, closed with 1008 `token expired` at the token's `exp`;
an SSE stream simply ends then). Frames are JSON; message text is never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Path, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from delivery.hub import Delivered, Outbox, Subscription
from delivery.service import DeliveryService, parse_cursor
from sealstream.auth import Principal
from sealstream.errors import SealstreamError
from sealstream.http import ApiError, CurrentPrincipal, error_body, install
from sealstream.settings import DeliveryHttp, Settings
from sealstream.websocket_auth import (
    accept,
    frame_text,
    receive_until_expiry,
    seconds_left,
    socket_principal,
)

log = logging.getLogger(__name__)

TAG = "live"
_TOO_SLOW = 1013  # "try again later": the client did not read its frames fast enough

DESCRIPTION = """\
Pushes every stored change of the chats a participant follows: new messages, edits and
deletions, decrypted, as they are stored (docs: README "Live delivery").

**WebSocket** `GET /v1/stream`, authenticated like the gateway's `/v1/ws` (subprotocol
`bearer, <jwt>`, `Authorization` header, or a first frame `{"auth": "<jwt>"}`); closed with 1008
`token expired` when the token's `exp` passes. Client frames:
`{"type": "subscribe", "chat_id", "cursor"?}` and `{"type": "unsubscribe", "chat_id"}`.
Server frames: `subscribed` / `unsubscribed` `{"type", "chat_id"}`; changes
`{"type": "message"|"edit"|"delete", "chat_id", "event_id", "message_id", "sender_id",
"revision", "text" (not on delete), "created_at", "edited_at", "deleted_at" (delete only)}`;
`{"type": "removed", "chat_id", "reason": "removed"|"chat_deleted"}` (that subscription ended);
`{"type": "error", "chat_id"?, "error": {"code", "message", "field"?}}` with codes
`forbidden`, `not_found`, `gone`, `cursor_expired`, `invalid_request`, `too_many_subscriptions`.
A client that does not read its frames is closed with 1013.

**Cursor**: the `event_id` of the last change received (decimal). Resubscribing with it sends,
in event order, what was missed, then live changes; each event id once per subscription.
`cursor_expired`: older than the edit window or too many changes missed; refetch history from
the reader and subscribe without a cursor.
"""


class SubscribeFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["subscribe", "unsubscribe"]
    chat_id: uuid.UUID
    cursor: str | None = Field(default=None, max_length=19)


class _DroppableStream(StreamingResponse):
    """The SSE response, cut off when the client is dropped as too slow (`outbox.dropped`) or
    its token expired `lifetime` seconds from now: `_sse` ends by itself in both cases, but not
    while it is stuck writing to a client that stopped reading (the stream would then hold its
    subscription, and queue changes made after the token's expiry, for as long as the TCP
    connection lives). `cleanup` ends the subscription when the stream is cut off."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        outbox: Outbox,
        lifetime: float | None,
        cleanup: Callable[[], None],
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._outbox = outbox
        self._lifetime = lifetime
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.ensure_future(super().__call__(scope, receive, send))
        dropped = asyncio.ensure_future(self._outbox.dropped.wait())
        # A second past the expiry: `_sse` normally ends the stream itself at `exp`.
        limit = None if self._lifetime is None else max(0.0, self._lifetime) + 1.0
        try:
            await asyncio.wait({streaming, dropped}, timeout=limit, return_when="FIRST_COMPLETED")
        finally:
            dropped.cancel()
            if not streaming.done():
                streaming.cancel()
                self._cleanup()
                log.info("event stream cut off", extra={"dropped": self._outbox.overflowed})
        if streaming.done() and not streaming.cancelled():
            streaming.result()  # re-raise what the stream raised (a disconnect, an error)


def _error_frame(
    code: str, message: str, field: str | None = None, chat_id: uuid.UUID | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", **error_body(code, message, field)}
    if chat_id is not None:
        frame["chat_id"] = str(chat_id)
    return frame


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]


def create_app(
    service: DeliveryService, settings: Settings, ready: Callable[[], Awaitable[bool]]
) -> FastAPI:
    app = FastAPI(
        title="Sealstream live delivery",
        version="1",
        description=DESCRIPTION,
        openapi_tags=[{"name": TAG, "description": "Following chats live"}],
    )
    install(app, "delivery", settings.auth, ready)
    limits: DeliveryHttp = settings.delivery
    hub = service.hub
    # A resume's replay is queued at once, before the writer runs: room for a whole one, plus
    # `max_queued_events` of live backlog.
    outbox_limit = limits.max_queued_events + limits.max_resume_events + 2

    @app.get(
        "/v1/chats/{chat_id}/events",
        tags=[TAG],
        summary="Server-Sent Events: the chat's changes, live",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "`text/event-stream`: `id:` the event id, `event:` the frame "
                "type, `data:` the JSON frame (as on the WebSocket)",
                "content": {"text/event-stream": {}},
            },
            409: {"description": "`cursor_expired`: refetch history from the reader"},
        },
    )
    async def events(
        principal: CurrentPrincipal,
        chat_id: ChatId,
        cursor: Annotated[
            str | None,
            Query(max_length=19, description="Resume after this event id (decimal)"),
        ] = None,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                max_length=19,
                description="Sent by EventSource on reconnect; wins over `cursor`",
            ),
        ] = None,
    ) -> StreamingResponse:
        """One chat's changes as they are stored, after a resume from the cursor if given. The
        stream ends after a `removed` event, and when the token expires (reconnect with a new
        token and `Last-Event-ID`)."""
        field = "header.Last-Event-ID" if last_event_id else "query.cursor"
        after = parse_cursor(last_event_id or cursor, field)
        outbox = Outbox(outbox_limit)
        sub = Subscription(chat_id, principal.user_id, outbox)
        items = await _checked(sub, after, field)
        sub.replay(items)
        return _DroppableStream(
            _sse(sub, outbox, principal, limits.sse_keepalive_seconds),
            outbox,
            seconds_left(principal),
            lambda: _unfollow(sub),
        )

    def _unfollow(sub: Subscription) -> None:
        sub.end(None)
        hub.remove(sub)

    async def _checked(
        sub: Subscription, cursor: int | None, field: str = "cursor"
    ) -> list[Delivered]:
        """Register `sub` (buffering), check membership, read the resume: the replay to send.
        Registered before the check and the read, so no change falls between them; a failure
        (ApiError: 403/404/410/409/422, naming `field` for the cursor) unregisters it."""
        hub.add(sub)
        try:
            await asyncio.to_thread(service.authorize, sub.user_id, sub.chat_id)
            items = (
                await asyncio.to_thread(service.resume, sub.chat_id, cursor, field)
                if cursor is not None
                else []
            )
        except BaseException:
            hub.remove(sub)
            raise
        if sub.ended:
            hub.remove(sub)
            raise ApiError(403, "forbidden", "you are not a participant of this chat")
        return items

    async def _sse(
        sub: Subscription, outbox: Outbox, principal: Principal, keepalive: float
    ) -> AsyncIterator[bytes]:
        try:
            yield b": subscribed\n\n"
            while True:
                remaining = seconds_left(principal)
                if remaining is not None and remaining <= 0:
                    return
                # A little past the expiry: the loop's clock and the wall clock of `exp` differ.
                wait = keepalive if remaining is None else min(keepalive, remaining + 0.05)
                try:
                    frame = await asyncio.wait_for(outbox.queue.get(), wait)
                except TimeoutError:
                    left = seconds_left(principal)
                    if left is not None and left <= 0:
                        return  # the token expired: the client reconnects with a new one
                    yield b": keep-alive\n\n"
                    continue
                if frame is None:
                    return
                event_id = frame.get("event_id")
                head = f"id: {event_id}\n" if event_id else ""
                data = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
                yield f"{head}event: {frame['type']}\ndata: {data}\n\n".encode()
                if frame["type"] in ("removed", "error"):
                    return  # the subscription ended (removed, or could not be re-checked)
        finally:
            sub.end(None)
            hub.remove(sub)

    @app.websocket("/v1/stream")
    async def stream(socket: WebSocket) -> None:
        await accept(socket)
        outbox = Outbox(outbox_limit)
        subs: dict[uuid.UUID, Subscription] = {}
        writer: asyncio.Task[None] | None = None
        dropped: asyncio.Task[Literal[True]] | None = None
        try:
            principal = await socket_principal(socket, app.state.verified_tokens)
            if principal is None:
                return
            writer = asyncio.create_task(_write(socket, outbox))
            # Dropped as too slow: the writer may be stuck in a send to a client that stopped
            # reading, so the end mark is never reached; the subscriptions end here at once.
            dropped = asyncio.create_task(outbox.dropped.wait())
            while not writer.done():
                receiving = asyncio.create_task(receive_until_expiry(socket, principal))
                waits: set[asyncio.Future[Any]] = {receiving, dropped}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    return
                message = receiving.result()
                if message is None or message["type"] == "websocket.disconnect":
                    return
                reply = await _handle(principal.user_id, frame_text(message), subs, outbox)
                if reply is not None:
                    outbox.put(reply)
        except WebSocketDisconnect:
            return
        finally:
            for sub in subs.values():
                sub.end(None)
                hub.remove(sub)
            outbox.close()
            if writer is not None:
                writer.cancel()
            if dropped is not None:
                dropped.cancel()

    async def _write(socket: WebSocket, outbox: Outbox) -> None:
        try:
            while True:
                frame = await outbox.queue.get()
                if frame is None:
                    if outbox.overflowed:
                        await socket.close(code=_TOO_SLOW, reason="too slow")
                    return
                await socket.send_text(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
        except (WebSocketDisconnect, RuntimeError):
            return  # the socket closed under us (client gone, or token expiry closed it)

    async def _handle(
        user: str, raw: str | None, subs: dict[uuid.UUID, Subscription], outbox: Outbox
    ) -> dict[str, Any] | None:
        if raw is None:
            return _error_frame("invalid_request", "frame: binary frame is not UTF-8", "frame")
        try:
            frame = SubscribeFrame.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "frame"
            if err.get("type") == "json_invalid":
                field, reason = "frame", "malformed JSON"
            else:
                reason = str(err["msg"])
            return _error_frame("invalid_request", f"{field}: {reason}", field)
        chat_id = frame.chat_id
        current = subs.pop(chat_id, None)
        if current is not None:  # a resubscription replaces the subscription
            current.end(None)
            hub.remove(current)
        if frame.type == "unsubscribe":
            return {"type": "unsubscribed", "chat_id": str(chat_id)}
        for ended in [c for c, s in subs.items() if s.ended]:  # removed since: not counted
            del subs[ended]
        if len(subs) >= limits.max_subscriptions:
            return _error_frame(
                "too_many_subscriptions",
                f"chat_id: at most {limits.max_subscriptions} chats per connection",
                "chat_id",
                chat_id,
            )
        sub = Subscription(chat_id, user, outbox)
        try:
            cursor = parse_cursor(frame.cursor, "cursor")
            items = await _checked(sub, cursor)
        except ApiError as err:
            return _error_frame(err.code, err.message, err.field, chat_id)
        except SealstreamError as err:
            log.warning("subscribe failed", extra={"error": type(err).__name__})
            return _error_frame(
                "unavailable", "a backing service is unavailable; retry", None, chat_id
            )
        subs[chat_id] = sub
        outbox.put({"type": "subscribed", "chat_id": str(chat_id)})
        sub.replay(items)
        return None

    return app
