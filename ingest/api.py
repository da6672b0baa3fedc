"""The gateway's HTTP and WebSocket API: a thin FastAPI layer over `IngestService`.

Chat creation is a plain `def` (Postgres, KMS): FastAPI runs it in its thread pool. Posting is
`async`: the service does its Postgres work in that pool and awaits Kafka's acknowledgement on the
event loop, so a Kafka outage holds no thread. Every route needs a bearer token. Message ids leave as decimal strings (64-bit ids exceed JavaScript's
safe integers). Nothing here logs or echoes message text.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match
from starlette.types import Message, Receive, Scope, Send

from ingest.service import (
    MAX_BATCH,
    MAX_PARTICIPANTS,
    Accepted,
    Change,
    IngestService,
    NewMessage,
)
from ingest.uploads import UploadAborted
from schemas.events import MAX_ATTACHMENTS, MAX_ID_LEN, MAX_TEXT_BYTES
from schemas.ids import id_time
from sealstream.auth import AuthError, Principal, VerifiedTokens
from sealstream.errors import SealstreamError
from sealstream.http import (
    MESSAGE_ID_PATTERN,
    ApiError,
    CurrentPrincipal,
    CurrentUser,
    MessageIdPath,
    error_body,
    install,
)
from sealstream.http import message_id as parse_message_id
from sealstream.http_limits import LargeBody
from sealstream.settings import Settings
from sealstream.text_rules import ID_PATTERN, Utf8
from sealstream.websocket_auth import AUTH_FRAME_SECONDS, accept
from sealstream.websocket_auth import frame_text as _frame_text
from sealstream.websocket_auth import receive_until_expiry as _receive_until_expiry
from sealstream.websocket_auth import socket_principal as _socket_principal

log = logging.getLogger(__name__)

CHATS, MESSAGES, ATTACHMENTS = "chats", "messages", "attachments"
DESCRIPTION = f"""\
Accepts chat messages and publishes them to Kafka for encryption at rest and indexing.

* `202 Accepted` means Kafka acknowledged the message on every in-sync replica (acks=all): it
  will be encrypted and indexed and is never lost. `503` (with `Retry-After`) means a backing
  service did not answer in time: the message may or may not have been accepted. Retry with the
  same `client_message_id` and the same text: one `client_message_id` is at most one message.
* A retry with the same `client_message_id` (same chat, same sender, within 24 h) returns the
  original `message_id`: `duplicate: true` when that message was already acknowledged (nothing is
  published), `duplicate: false` when this request published it (again) under that id. The same
  `client_message_id` with another text is `409 idempotency_conflict`.
* Message ids are decimal strings: 64-bit ids exceed JavaScript's safe integers.
* Files: `POST /v1/chats/{{chat_id}}/attachments` with the raw bytes as the body and the media
  type as `Content-Type` stores a file (streamed, encrypted) and answers its `attachment_id`;
  a message references such ids in `attachments` (the sender's own files of that chat).
* Text: 1 to {MAX_TEXT_BYTES} bytes of UTF-8, not blank.
* Errors are `{{"error": {{"code", "message", "field"?}}}}`; they name the field and the rule
  and never echo the input.
* A sender edits (`PATCH .../messages/{{message_id}}`) or deletes (`DELETE`) their own message
  within the edit window (48 h by default) after sending it; `202` carries the change's own
  `event_id` once Kafka acknowledged it, and the encryptor applies it moments later. A message
  posted moments ago may not be stored yet: `404 message_not_found`, retry shortly.

**WebSocket** `GET /v1/ws`, authenticated by one of, best first: the subprotocol header
`Sec-WebSocket-Protocol: bearer, <jwt>` (the server answers `bearer`, never the token), an
`Authorization: Bearer <jwt>` header, a first frame `{{"auth": "<jwt>"}}` (answered
`{{"ok": true, "authenticated": true}}`, within {AUTH_FRAME_SECONDS:g} s of opening), or, discouraged
because URLs land in proxies' logs, `?token=<jwt>`. Then send JSON frames: a post
`{{"chat_id", "text", "client_message_id"?, "attachments"?}}` (`"type": "post"` optional), an edit
`{{"type": "edit", "chat_id", "message_id", "text"}}` or a deletion
`{{"type": "delete", "chat_id", "message_id"}}` (`message_id` an integer or its decimal string). Each
gets one reply, in order, after Kafka's ack: `{{"ok": true, "message_id", "chat_id",
"client_message_id", "duplicate"}}` for a post, `{{"ok": true, "type", "chat_id", "message_id",
"event_id"}}` for an edit or deletion, or `{{"ok": false, "error": {{"code", "message",
"field"?}}}}` with the code the HTTP route would give. A bad frame does not close the socket.
The handshake always completes (101); a missing, invalid or expired token then closes the socket
with code 1008 and a reason (`invalid token`, `token expired`, `authentication required`), and
the socket is closed with 1008 `token expired` when the token's `exp` passes. A message over the
listener's frame limit closes it with 1009.
"""


# An id as the gateway accepts it: 1..128 printable characters, not blank (ingest.service.check_id).
IdText = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN), Utf8]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateChatIn(Strict):
    participants: list[IdText] = Field(
        default_factory=list,
        max_length=MAX_PARTICIPANTS,
        description=f"User ids (1..{MAX_ID_LEN} printable characters) besides the caller, who "
        f"is always a participant; at most {MAX_PARTICIPANTS} in all",
    )
    tenant_id: IdText | None = Field(default=None, description="Defaults to `default`")
    chat_id: uuid.UUID | None = Field(
        default=None,
        description="Optional, generated if absent; repeating a creation with the same id and "
        "participants returns the chat again",
    )


class ChatOut(BaseModel):
    chat_id: uuid.UUID
    participants: list[str]
    created_at: datetime


# An attachment id as the upload returned it: a decimal string (as message ids).
AttachmentIdText = Annotated[str, Field(pattern=MESSAGE_ID_PATTERN)]
_ATTACHMENTS_DESCRIPTION = (
    "Ids of attachments (`POST /v1/chats/{chat_id}/attachments`) the message references: each "
    "one uploaded to this chat by the sender and not deleted, distinct, at most "
    "`AttachmentSettings.max_per_message` (10 by default); else 422 `unknown_attachment` / "
    "`invalid_request` naming `attachments[i]`"
)


class MessageIn(Strict):
    text: str = Field(description=f"1 to {MAX_TEXT_BYTES} bytes of UTF-8, not blank")
    client_message_id: IdText | None = Field(
        default=None,
        description="Makes retries idempotent: the same id returns the same message_id",
    )
    attachments: list[AttachmentIdText] = Field(
        default_factory=list, max_length=MAX_ATTACHMENTS, description=_ATTACHMENTS_DESCRIPTION
    )

    def new_message(self) -> NewMessage:
        return NewMessage(self.text, self.client_message_id, _attachment_ids(self.attachments))


def _attachment_ids(ids: list[str]) -> tuple[int, ...]:
    return tuple(int(i) for i in ids)


class AttachmentOut(BaseModel):
    attachment_id: str = Field(description="Decimal 64-bit id (exceeds JavaScript's safe integers)")
    chat_id: uuid.UUID
    size: int = Field(description="Bytes of the file")
    content_type: str = Field(description="The media type sent, lower case, without parameters")
    created_at: datetime = Field(description="The attachment id's time")


class BatchIn(Strict):
    messages: list[MessageIn] = Field(
        min_length=1, max_length=MAX_BATCH, description="Published in this order"
    )


class AcceptedOut(BaseModel):
    message_id: str = Field(description="Decimal 64-bit id (exceeds JavaScript's safe integers)")
    chat_id: uuid.UUID
    client_message_id: str | None = None
    duplicate: bool = Field(description="True when a retry matched an earlier client_message_id")


class BatchOut(BaseModel):
    accepted: list[AcceptedOut] = Field(description="One entry per message, in request order")


class EditIn(Strict):
    text: str = Field(description=f"The new text: 1 to {MAX_TEXT_BYTES} bytes of UTF-8, not blank")


class ChangeOut(BaseModel):
    chat_id: uuid.UUID
    message_id: str = Field(description="Decimal 64-bit id of the message changed")
    event_id: str = Field(
        description="Decimal 64-bit id of this change, greater than message_id; later changes "
        "have greater ids"
    )


class WsFrame(Strict):
    """A post frame (the frame grammar's default: a frame without `type` is a post)."""

    type: Literal["post"] | None = None
    chat_id: uuid.UUID
    text: str
    client_message_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LEN)
    attachments: list[AttachmentIdText] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)


def _integer_or_decimal(value: object) -> object:
    """A frame's message id as sent: a JSON integer, or its decimal string in the path's
    grammar. Without this, pydantic's lax int took `true` as 1, `1e3` as 1000, `"1_2"` as 12
    and a float past 2^53 as the id it rounds to (another message's)."""
    if isinstance(value, bool | float) or (
        isinstance(value, str) and not re.fullmatch(MESSAGE_ID_PATTERN, value)
    ):
        raise ValueError("must be an integer or its decimal string (no sign, point or exponent)")
    return value


# A message id in a frame: a number or its decimal string, as the replies give it.
WsMessageId = Annotated[int, BeforeValidator(_integer_or_decimal), Field(ge=1, lt=2**63)]


class WsEdit(Strict):
    type: Literal["edit"]
    chat_id: uuid.UUID
    message_id: WsMessageId
    text: str


class WsDelete(Strict):
    type: Literal["delete"]
    chat_id: uuid.UUID
    message_id: WsMessageId


_CHANGE_FRAMES: dict[str, type[WsEdit] | type[WsDelete]] = {"edit": WsEdit, "delete": WsDelete}


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


_ERRORS = {
    401: "Missing, invalid or expired bearer token",
    403: "The caller is not a participant of the chat, or the tenant is not the token's",
    404: "No such chat",
    409: "The chat id is taken / the client_message_id was used for another text or other "
    "attachments",
    410: "The chat was deleted",
    422: "Invalid request; `field` names the offending field (`unknown_attachment`: "
    "`attachments[i]` is not an attachment the sender uploaded to this chat)",
    503: "A backing service (Kafka, Postgres, KMS) did not answer within its deadline, or no worker-id lease is held; retry after `Retry-After` seconds",
}


# What the statuses mean for an edit or a sender's deletion.
_CHANGE_ERRORS = {
    403: "`not_participant`: not a participant of the chat; `not_sender`: the message is "
    "someone else's",
    404: "`unknown_chat`: no such chat; `message_not_found`: no such message in the chat, or "
    "posted moments ago and not stored yet (retry shortly)",
    410: "`gone`: the chat was deleted; `message_deleted`: the message was deleted",
    422: "Invalid request (`field` names it: `text`, `path.message_id`); "
    "`edit_window_passed`: the message is older than the edit window",
    503: "Postgres, Cassandra or Kafka did not answer within its deadline, or no worker-id "
    "lease is held; retry after `Retry-After` seconds (an edit may then be applied twice, "
    "as two revisions of the same text)",
}


def _errors(
    *codes: int, described: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    texts = {**_ERRORS, **(described or {})}
    return {code: {"model": ErrorOut, "description": texts[code]} for code in codes}


def _out(chat_id: uuid.UUID, item: Accepted) -> dict[str, Any]:
    """An `AcceptedOut` as its JSON object. The routes answer with a `JSONResponse` of these
    rather than a model: FastAPI would validate and serialize a returned model once more
    (docs/benchmarks.md, "Gateway")."""
    return {
        "message_id": str(item.message_id),
        "chat_id": str(chat_id),
        "client_message_id": item.client_message_id,
        "duplicate": item.duplicate,
    }


def _change_out(chat_id: uuid.UUID, change: Change) -> dict[str, Any]:
    """A `ChangeOut` as its JSON object (ids as decimal strings)."""
    return {
        "chat_id": str(chat_id),
        "message_id": str(change.message_id),
        "event_id": str(change.event_id),
    }


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]


def create_app(
    service: IngestService, settings: Settings, ready: Callable[[], Awaitable[bool]]
) -> FastAPI:
    app = FastAPI(
        title="Sealstream ingest gateway",
        version="1",
        description=DESCRIPTION,
        openapi_tags=[
            {"name": CHATS, "description": "Creating chats"},
            {"name": MESSAGES, "description": "Posting messages (see also the WebSocket above)"},
            {"name": ATTACHMENTS, "description": "Uploading files to reference in messages"},
        ],
    )
    install(app, "ingest", settings.auth, ready)

    @app.post(
        "/v1/chats",
        status_code=201,
        response_model=ChatOut,
        tags=[CHATS],
        summary="Create a chat",
        responses=_errors(401, 403, 409, 410, 422, 503),
    )
    def create_chat(body: CreateChatIn, principal: CurrentPrincipal) -> ChatOut:
        """Create a chat with its first data key; the caller is always a participant.

        The chat belongs to the tenant of the caller's token (`tenant` claim); a token without
        one creates chats in the default tenant only."""
        own_tenant = principal.tenant or settings.keys.default_tenant
        if body.tenant_id not in (None, own_tenant):
            raise ApiError(
                403,
                "forbidden",
                f"tenant_id: your token is for tenant '{own_tenant}'",
                "tenant_id",
            )
        chat = service.create_chat(
            principal.user_id, body.participants, principal.tenant or body.tenant_id, body.chat_id
        )
        return ChatOut(
            chat_id=chat.chat_id, participants=list(chat.participants), created_at=chat.created_at
        )

    @app.delete(
        "/v1/chats/{chat_id}/participants/me",
        status_code=204,
        tags=[CHATS],
        summary="Leave a chat",
        responses=_errors(401, 403, 404, 409, 410, 422, 503),
    )
    def leave_chat(chat_id: ChatId, user: CurrentUser) -> Response:
        """Remove the caller from the chat's participants (audited). Their live streams of the
        chat end at once; other gateways and readers refuse them within 2 s (chat cache)."""
        service.leave(user, chat_id)
        return Response(status_code=204)

    @app.post(
        "/v1/chats/{chat_id}/messages",
        status_code=202,
        response_model=AcceptedOut,
        tags=[MESSAGES],
        summary="Post one message",
        responses=_errors(401, 403, 404, 409, 410, 422, 503),
    )
    async def post_message(chat_id: ChatId, body: MessageIn, user: CurrentUser) -> JSONResponse:
        """Answers once Kafka acknowledged the message."""
        [accepted] = await service.post(user, chat_id, [body.new_message()], batch=False)
        return JSONResponse(_out(chat_id, accepted), status_code=202)

    # Before the route above, which stays for what the fast path leaves to it (and the OpenAPI).
    [single] = [r for r in app.routes if isinstance(r, APIRoute) and r.endpoint is post_message]
    app.router.routes.insert(app.router.routes.index(single), SinglePost(single, service))

    @app.post(
        "/v1/chats/{chat_id}/messages:batch",
        status_code=202,
        response_model=BatchOut,
        tags=[MESSAGES],
        summary=f"Post up to {MAX_BATCH} messages",
        responses=_errors(401, 403, 404, 409, 410, 422, 503),
    )
    async def post_batch(chat_id: ChatId, body: BatchIn, user: CurrentUser) -> JSONResponse:
        """All or nothing: answers once Kafka acknowledged every message, in request order."""
        items = [m.new_message() for m in body.messages]
        accepted = await service.post(user, chat_id, items, batch=True)
        return JSONResponse({"accepted": [_out(chat_id, a) for a in accepted]}, status_code=202)

    @app.post(
        UPLOAD_PATH,
        status_code=201,
        response_model=AttachmentOut,
        tags=[ATTACHMENTS],
        summary="Upload a file",
        responses={
            **_errors(401, 403, 404, 410, 413, 415, 422, 429, 503, described=_UPLOAD_ERRORS),
            201: {
                "description": "Stored, encrypted; reference `attachment_id` in a message",
                "headers": {
                    "Location": {
                        "description": "/v1/chats/{chat_id}/attachments/{attachment_id}",
                        "schema": {"type": "string"},
                    }
                },
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The file's bytes, as they are (no multipart form); the "
                "`Content-Type` header names its media type",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "*/*": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def upload_attachment(chat_id: ChatId, request: Request, user: CurrentUser) -> Response:
        """Stream the body into the chat's attachments, encrypted under the chat's current
        key, without holding it in memory; answers once the file and its metadata are stored.
        Participants only. The limit (`AttachmentSettings.max_bytes`) is checked against
        `Content-Length` before the body is read, and against the bytes as they arrive
        (chunked bodies); nothing of a refused, failed or interrupted upload remains."""
        try:
            row = await service.upload(
                user,
                chat_id,
                request.headers.get("content-type"),
                _declared_size(request),
                request.stream(),
            )
        except ApiError as err:
            if err.status == 413:  # do not read (and discard) the rest of a body too large
                return _closing_error(err)
            if err.status == 429:  # nor the body of an upload refused for now
                refusal = _closing_error(err)
                refusal.headers["Retry-After"] = "1"
                return refusal
            raise
        except UploadAborted:
            # The client went away: nobody reads this answer, and nothing was stored.
            log.info("upload abandoned by the client", extra={"chat_id": str(chat_id)})
            return _closing_error(ApiError(400, "upload_aborted", "the body ended early"))
        except SealstreamError as err:
            if not err.retriable:
                raise  # the app's handler answers (and logs) it
            # A store went down mid-upload: answer now, without reading the rest of the body.
            log.warning("upload failed: dependency unavailable", extra={"error": str(err)})
            refusal = _closing_error(
                ApiError(503, "unavailable", "a backing service is unavailable; retry")
            )
            refusal.headers["Retry-After"] = "1"
            return refusal
        where = f"/v1/chats/{chat_id}/attachments/{row.file_id}"
        return JSONResponse(
            {
                "attachment_id": str(row.file_id),
                "chat_id": str(chat_id),
                "size": row.size,
                "content_type": row.content_type,
                "created_at": id_time(row.file_id).isoformat(),
            },
            status_code=201,
            headers={"Location": where},
        )

    @app.patch(
        "/v1/chats/{chat_id}/messages/{message_id}",
        status_code=202,
        response_model=ChangeOut,
        tags=[MESSAGES],
        summary="Edit one's own message",
        responses=_errors(401, 403, 404, 410, 422, 503, described=_CHANGE_ERRORS),
    )
    async def edit_message(
        chat_id: ChatId, message_id: MessageIdPath, body: EditIn, user: CurrentUser
    ) -> JSONResponse:
        """Publish the new text as the message's next revision; answers once Kafka
        acknowledged it. Only the sender, within the edit window (`Settings.edits`)."""
        change = await service.change(user, chat_id, parse_message_id(message_id), body.text)
        return JSONResponse(_change_out(chat_id, change), status_code=202)

    @app.delete(
        "/v1/chats/{chat_id}/messages/{message_id}",
        status_code=202,
        response_model=ChangeOut,
        tags=[MESSAGES],
        summary="Delete one's own message",
        responses=_errors(401, 403, 404, 410, 422, 503, described=_CHANGE_ERRORS),
    )
    async def delete_message(
        chat_id: ChatId, message_id: MessageIdPath, user: CurrentUser
    ) -> JSONResponse:
        """Publish the message's deletion; answers once Kafka acknowledged it. Only the
        sender, within the edit window; once the encryptor applied it the reader answers 404
        for it and leaves it out of history and search, as after an operator's deletion."""
        change = await service.change(user, chat_id, parse_message_id(message_id))
        return JSONResponse(_change_out(chat_id, change), status_code=202)

    @app.websocket("/v1/ws")
    async def websocket(socket: WebSocket) -> None:
        # Accept first, then refuse with 1008: a refusal before the handshake is an HTTP 403
        # that browsers cannot even read, while the close code and reason are documented.
        await accept(socket)
        try:
            principal = await _socket_principal(socket, app.state.verified_tokens)
            if principal is None:
                return
            user = principal.user_id
            while True:
                message = await _receive_until_expiry(socket, principal)
                if message is None or message["type"] == "websocket.disconnect":
                    return
                # One frame at a time: replies come in order and a chat's order is kept.
                await socket.send_json(await _handle_frame(service, user, _frame_text(message)))
        except WebSocketDisconnect:
            return

    return app


UPLOAD_PATH = "/v1/chats/{chat_id}/attachments"
UPLOAD_BODY = LargeBody("POST", r"/v1/chats/[^/]+/attachments")
"""The upload's body streams past the listener's `max_body_bytes` (up to
`AttachmentSettings.max_bytes`, which the route enforces itself): `serve` exempts it."""

_UPLOAD_ERRORS = {
    403: "`not_participant`: the caller is not a participant of the chat",
    404: "`unknown_chat`: no such chat",
    410: "`gone`: the chat was deleted",
    413: "`attachment_too_large`: `Content-Length` or the body passed "
    "`AttachmentSettings.max_bytes`",
    415: "`unsupported_content_type`: `Content-Type` missing or not in "
    "`AttachmentSettings.content_types` (field `header.content-type`)",
    422: "Invalid request: the chat id is not a UUID (`path.chat_id`)",
    429: "`too_many_uploads`: the caller already has `AttachmentSettings.uploads_per_user` "
    "uploads under way on this gateway; retry after `Retry-After` seconds",
    503: "The object store, Cassandra, Postgres or the KMS did not answer; nothing was stored, "
    "retry after `Retry-After` seconds",
}


def _declared_size(request: Request) -> int | None:
    """The request's Content-Length, None when absent (chunked) or not a number."""
    raw = request.headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else None


def _closing_error(err: ApiError) -> JSONResponse:
    """The error, and the connection closed after it: the rest of the body is not read."""
    response = JSONResponse(error_body(err.code, err.message, err.field), status_code=err.status)
    response.headers["Connection"] = "close"
    return response


_CHAT_ID: TypeAdapter[uuid.UUID] = TypeAdapter(uuid.UUID)  # what FastAPI checks `ChatId` with
_JSON = b"application/json"


class SinglePost(BaseRoute):
    """`POST /v1/chats/{chat_id}/messages` without FastAPI's per-request machinery (dependency
    solving, request and response models) when the request is plainly valid: a bearer token
    verified before, `Content-Type: application/json`, a well-formed chat id and a body that
    `MessageIn` accepts. The same checks, by the same validators, then the same service call
    and answer. Anything else (a missing or bad token, another content type, a malformed body)
    is handed, body included, to the FastAPI route behind it, so every refusal is the one that
    route gives. Errors of the service call go to the app's exception handlers as the route's
    would (docs/benchmarks.md, "Gateway")."""

    def __init__(self, route: APIRoute, service: IngestService) -> None:
        self.route = route
        self.service = service

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return self.route.matches(scope)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        return self.route.url_path_for(name, **path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.route.handle(scope, receive, send)
            return
        token, content_type = None, None
        for name, value in scope["headers"]:  # the first of each, as Starlette's `get`
            if name == b"authorization" and token is None:
                token = value
            elif name == b"content-type" and content_type is None:
                content_type = value
        received: list[Message] = []
        while True:  # BodyLimit counts these bytes and refuses (413) past its limit
            received.append(await receive())
            if received[-1]["type"] != "http.request" or not received[-1].get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in received)
        principal = self._principal(scope, token)
        if (
            principal is None
            or content_type != _JSON
            or not body
            or received[-1]["type"] != "http.request"
        ):
            await self.route.handle(scope, _replay(received, receive), send)
            return
        try:
            chat_id = _CHAT_ID.validate_python(scope["path_params"]["chat_id"])
            message_in = MessageIn.model_validate_json(body)
        except ValidationError:
            await self.route.handle(scope, _replay(received, receive), send)
            return
        [accepted] = await self.service.post(
            principal.user_id,
            chat_id,
            [message_in.new_message()],
            batch=False,
        )
        await JSONResponse(_out(chat_id, accepted), status_code=202)(scope, receive, send)

    @staticmethod
    def _principal(scope: Scope, header: bytes | None) -> Principal | None:
        """The principal of a well-formed `Bearer` header with a valid token, else None."""
        if header is None or header[:7] != b"Bearer " or header[7:8] == b" ":
            return None
        tokens: VerifiedTokens = scope["app"].state.verified_tokens
        try:
            return tokens.principal(header[7:].decode("latin-1").strip())
        except AuthError:
            return None


def _replay(received: list[Message], receive: Receive) -> Receive:
    """`receive` for a route after the request was read: the messages read, as they came,
    then the connection's own."""
    pending = list(received)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _frame_error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"ok": False, **error_body(code, message, field)}


class _UnknownFrameType(Exception):
    """A frame whose `type` is none of post, edit, delete."""


def _parse_frame(raw: str) -> WsFrame | WsEdit | WsDelete:
    """The frame as a `WsFrame` (post), `WsEdit` or `WsDelete` by its `type` (absent: a post);
    `ValidationError`, `_UnknownFrameType` or `ValueError` (malformed JSON) otherwise.

    pydantic's own JSON parser first, as a post (one pass, a quarter of the cost of
    `json.loads` and a validation of its result); a frame it refuses is parsed again the old
    way, so a refusal answers exactly as before (a lone surrogate, which it calls malformed
    JSON, is a `text` error there), and an edit or deletion is validated by its own model."""
    try:
        return WsFrame.model_validate_json(raw)
    except ValidationError:
        frame = json.loads(raw)
    kind = frame.get("type") if isinstance(frame, dict) else None
    if kind is None or kind == "post":
        return WsFrame.model_validate(frame)
    if not isinstance(kind, str) or kind not in _CHANGE_FRAMES:
        raise _UnknownFrameType
    return _CHANGE_FRAMES[kind].model_validate(frame)


async def _handle_frame(service: IngestService, user: str, raw: str | None) -> dict[str, Any]:
    if raw is None:
        return _frame_error("invalid_request", "frame: binary frame is not UTF-8", "frame")
    try:
        frame = _parse_frame(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "frame"
        return _frame_error("invalid_request", f"{field}: {err['msg']}", field)
    except _UnknownFrameType:
        return _frame_error(
            "invalid_request", "type: must be post (or absent), edit or delete", "type"
        )
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return _frame_error("invalid_request", "frame: malformed JSON", "frame")
    try:
        if isinstance(frame, WsFrame):
            [accepted] = await service.post(
                user,
                frame.chat_id,
                [
                    NewMessage(
                        frame.text, frame.client_message_id, _attachment_ids(frame.attachments)
                    )
                ],
                batch=False,
            )
            return {"ok": True, **_out(frame.chat_id, accepted)}
        text = frame.text if isinstance(frame, WsEdit) else None
        change = await service.change(user, frame.chat_id, frame.message_id, text)
        return {"ok": True, "type": change.kind, **_change_out(frame.chat_id, change)}
    except ApiError as err:
        return _frame_error(err.code, err.message, err.field)
    except SealstreamError as err:
        if err.retriable:
            log.warning("dependency unavailable", extra={"error": str(err)})
            return _frame_error("unavailable", "a backing service is unavailable; retry")
        log.error("unexpected domain error", extra={"error": type(err).__name__})
        return _frame_error("internal", "internal error")
    except Exception as err:  # a bug must not end the socket for every later frame
        log.exception("websocket frame failed", extra={"error": type(err).__name__})
        return _frame_error("internal", "internal error")
