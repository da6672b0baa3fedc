"""The gateway's HTTP and WebSocket API: a thin FastAPI layer over `IngestService`.

Handlers are plain `def`s where they block (Postgres, the Kafka acknowledgement): FastAPI runs
them in its thread pool. Every route needs a bearer token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Path, WebSocket, WebSocketDisconnect, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ingest.service import MAX_BATCH, Accepted, IngestService, NewMessage
from schemas.events import MAX_ID_LEN
from sealstream.auth import AuthError, verify_token
from sealstream.errors import SealstreamError
from sealstream.http import ApiError, CurrentUser, error_body, install
from sealstream.settings import Settings

TAG = "ingest"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateChatIn(Strict):
    participants: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="Other participants (the caller is added)",
    )
    tenant_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LEN)
    chat_id: uuid.UUID | None = Field(default=None, description="Optional; generated if absent")


class ChatOut(BaseModel):
    chat_id: uuid.UUID
    participants: list[str]
    created_at: datetime


class MessageIn(Strict):
    text: str = Field(description="1 to 16384 bytes of UTF-8, not blank")
    client_message_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ID_LEN,
        description="Makes retries idempotent: the same id returns the same message_id",
    )


class BatchIn(Strict):
    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_BATCH)


class AcceptedOut(BaseModel):
    message_id: str = Field(description="Decimal 64-bit id (exceeds JavaScript's safe integers)")
    chat_id: uuid.UUID
    client_message_id: str | None = None
    duplicate: bool = Field(description="True when a retry matched an earlier client_message_id")


class BatchOut(BaseModel):
    accepted: list[AcceptedOut]


class WsFrame(Strict):
    chat_id: uuid.UUID
    text: str
    client_message_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_LEN)


def _out(chat_id: uuid.UUID, item: Accepted) -> AcceptedOut:
    return AcceptedOut(
        message_id=str(item.message_id),
        chat_id=chat_id,
        client_message_id=item.client_message_id,
        duplicate=item.duplicate,
    )


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]


def create_app(
    service: IngestService, settings: Settings, ready: Callable[[], Awaitable[bool]]
) -> FastAPI:
    app = FastAPI(
        title="Sealstream ingest gateway",
        version="1",
        description="Post chat messages. `202` means Kafka acknowledged the message (acks=all): "
        "it will be encrypted at rest and indexed; it is never lost.",
    )
    install(app, "ingest", settings.auth, ready)

    @app.post("/v1/chats", status_code=201, response_model=ChatOut, tags=[TAG])
    def create_chat(body: CreateChatIn, user: CurrentUser) -> ChatOut:
        """Create a chat (the caller is a participant) with its first data key."""
        chat = service.create_chat(user, body.participants, body.tenant_id, body.chat_id)
        return ChatOut(
            chat_id=chat.chat_id, participants=list(chat.participants), created_at=chat.created_at
        )

    @app.post(
        "/v1/chats/{chat_id}/messages", status_code=202, response_model=AcceptedOut, tags=[TAG]
    )
    def post_message(chat_id: ChatId, body: MessageIn, user: CurrentUser) -> AcceptedOut:
        """Post one message; answers after Kafka acknowledged it."""
        [accepted] = service.post(user, chat_id, [NewMessage(body.text, body.client_message_id)])
        return _out(chat_id, accepted)

    @app.post(
        "/v1/chats/{chat_id}/messages:batch", status_code=202, response_model=BatchOut, tags=[TAG]
    )
    def post_batch(chat_id: ChatId, body: BatchIn, user: CurrentUser) -> BatchOut:
        """Post up to 500 messages in order; answers after Kafka acknowledged all of them."""
        items = [NewMessage(m.text, m.client_message_id) for m in body.messages]
        return BatchOut(accepted=[_out(chat_id, a) for a in service.post(user, chat_id, items)])

    @app.websocket("/v1/ws")
    async def websocket(socket: WebSocket) -> None:
        """Frames `{"chat_id", "text", "client_message_id"?}`; one reply frame per message."""
        token = socket.query_params.get("token")
        header = socket.headers.get("authorization", "")
        if not token and header.lower().startswith("bearer "):
            token = header[7:]
        try:
            user = verify_token(settings.auth, token or "")
        except AuthError:
            await socket.close(code=status.WS_1008_POLICY_VIOLATION)
            return
        await socket.accept()
        try:
            while True:
                raw = await socket.receive_text()
                await socket.send_json(await _handle_frame(service, user, raw))
        except WebSocketDisconnect:
            return

    return app


async def _handle_frame(service: IngestService, user: str, raw: str) -> dict[str, Any]:
    try:
        frame = WsFrame.model_validate(json.loads(raw))
    except json.JSONDecodeError:
        return {"ok": False, **error_body("invalid_request", "frame: malformed JSON", "frame")}
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "frame"
        return {"ok": False, **error_body("invalid_request", f"{field}: {err['msg']}", field)}
    try:
        [accepted] = await run_in_threadpool(
            service.post, user, frame.chat_id, [NewMessage(frame.text, frame.client_message_id)]
        )
    except ApiError as err:
        return {"ok": False, **error_body(err.code, err.message, err.field)}
    except SealstreamError as err:
        code = "unavailable" if err.retriable else "internal"
        return {"ok": False, **error_body(code, "could not accept the message; retry")}
    return {
        "ok": True,
        "message_id": str(accepted.message_id),
        "chat_id": str(frame.chat_id),
        "client_message_id": accepted.client_message_id,
        "duplicate": accepted.duplicate,
    }
