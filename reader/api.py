"""The reader's HTTP API: a thin FastAPI layer over `ReaderService`.

Handlers are plain `def`s: the Cassandra, Postgres and OpenSearch drivers block, so FastAPI runs
each request in its thread pool. Every route needs a bearer token (`CurrentUser`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import FastAPI, Path, Query, Response
from pydantic import BaseModel, Field

from reader.service import (
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    QUERY_MAX_CHARS,
    SEARCH_LIMIT_DEFAULT,
    SEARCH_LIMIT_MAX,
    ReaderService,
    ReadMessage,
)
from sealstream.http import CurrentUser, MessageIdPath, install
from sealstream.http import message_id as parse_message_id
from sealstream.settings import Settings

TAG = "messages"


class MessageOut(BaseModel):
    message_id: str = Field(description="Decimal 64-bit message id (time-ordered)")
    chat_id: uuid.UUID
    sender_id: str
    text: str
    sent_at: datetime


class PageOut(BaseModel):
    messages: list[MessageOut] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page"
    )


class SearchOut(BaseModel):
    messages: list[MessageOut] = Field(description="Best match first")


def _out(message: ReadMessage) -> MessageOut:
    return MessageOut(
        message_id=message.message_id,
        chat_id=message.chat_id,
        sender_id=message.sender_id,
        text=message.text,
        sent_at=message.sent_at,
    )


def _json(body: BaseModel) -> Response:
    """Serialise a response model once. Returning the model would make FastAPI validate it
    again against `response_model` and then serialise it: twice the work for a 50-message page.
    `response_model` stays on each route for the OpenAPI description."""
    return Response(body.model_dump_json(), media_type="application/json")


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]


def create_app(
    service: ReaderService, settings: Settings, ready: Callable[[], Awaitable[bool]]
) -> FastAPI:
    app = FastAPI(
        title="Sealstream reader",
        version="1",
        description=(
            "History, single messages and search of a chat, decrypted on demand for its "
            'participants. Errors are {"error": {"code", "message", "field"?}}.'
        ),
        openapi_tags=[{"name": TAG, "description": "Reading a chat's messages"}],
    )
    install(app, "reader", settings.auth, ready)

    @app.get(
        "/v1/chats/{chat_id}/messages/{message_id}",
        response_model=MessageOut,
        tags=[TAG],
        summary="One message, decrypted",
    )
    def get_message(user: CurrentUser, chat_id: ChatId, message_id: MessageIdPath) -> Response:
        return _json(_out(service.message(user, chat_id, parse_message_id(message_id))))

    @app.get(
        "/v1/chats/{chat_id}/messages",
        response_model=PageOut,
        tags=[TAG],
        summary="A history page, newest first",
    )
    def get_history(
        user: CurrentUser,
        chat_id: ChatId,
        before: Annotated[
            str | None,
            Query(max_length=64, description="Cursor from a previous page's `next_cursor`"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=HISTORY_LIMIT_MAX)] = HISTORY_LIMIT_DEFAULT,
    ) -> Response:
        page = service.history(user, chat_id, before, limit)
        return _json(
            PageOut(messages=[_out(m) for m in page.messages], next_cursor=page.next_cursor)
        )

    @app.get(
        "/v1/chats/{chat_id}/search",
        response_model=SearchOut,
        tags=[TAG],
        summary="Messages of the chat containing every word of q, decrypted",
    )
    def search(
        user: CurrentUser,
        chat_id: ChatId,
        q: Annotated[str, Query(min_length=1, max_length=QUERY_MAX_CHARS)],
        limit: Annotated[int, Query(ge=1, le=SEARCH_LIMIT_MAX)] = SEARCH_LIMIT_DEFAULT,
    ) -> Response:
        return _json(SearchOut(messages=[_out(m) for m in service.search(user, chat_id, q, limit)]))

    return app
