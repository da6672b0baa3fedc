"""The reader's HTTP API: a thin FastAPI layer over `ReaderService`.

Handlers are plain `def`s: the Cassandra, Postgres and OpenSearch drivers block, so FastAPI runs
each request in its thread pool. Every route needs a bearer token (`CurrentUser`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import FastAPI, Path, Query, Response
from pydantic import BaseModel, Field

from reader.messages import ReadMessage
from reader.search import (
    MAX_CHAT_FILTER,
    MAX_SENDER_CHARS,
    QUERY_MAX_CHARS,
    SEARCH_LIMIT_DEFAULT,
    SEARCH_LIMIT_MAX,
    SearchOptions,
    SearchPage,
)
from reader.service import HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX, ReaderService
from sealstream.adapters.opensearch import MAX_SEARCH_CHATS
from sealstream.http import CurrentUser, MessageIdPath, install
from sealstream.http import message_id as parse_message_id
from sealstream.settings import Settings
from sealstream.text_rules import ID_PATTERN

TAG = "messages"


class MessageOut(BaseModel):
    message_id: str = Field(description="Decimal 64-bit message id (time-ordered)")
    chat_id: uuid.UUID
    sender_id: str
    text: str
    sent_at: datetime
    revision: int = Field(
        ge=1, description="1 as posted; raised by one for each edit its sender made"
    )
    edited_at: datetime | None = Field(
        description="RFC 3339 time of the last edit (from its id's clock); null if never edited"
    )
    attachments: list[str] = Field(
        default_factory=list,
        description="Ids (decimal strings) of the chat's attachment files the message "
        "references, in the sender's order; empty when none",
    )


class PageOut(BaseModel):
    messages: list[MessageOut] = Field(description="Newest first")
    next_cursor: str | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page"
    )


class FoundOut(MessageOut):
    highlights: list[tuple[int, int]] = Field(
        description=(
            "[start, end) offsets of the matched words in `text`, in Unicode code points (not "
            "UTF-16 units: an emoji counts 1), in text order"
        )
    )


class SearchOut(BaseModel):
    messages: list[FoundOut] = Field(
        description="In the order of `sort`; may hold fewer than `limit` (even none) while "
        "`next_cursor` is not null (hits dropped after decryption still move the cursor on)"
    )
    next_cursor: str | None = Field(
        description="Pass as `cursor` (with the same q, filters and sort) for the next page; "
        "null on the last page"
    )
    more_chats: bool = Field(
        description=f"True when the user belongs to more than {MAX_SEARCH_CHATS} chats: only "
        "the newest were searched (narrow with `chat_id`)"
    )


def _out(message: ReadMessage) -> MessageOut:
    return MessageOut(
        message_id=message.message_id,
        chat_id=message.chat_id,
        sender_id=message.sender_id,
        text=message.text,
        sent_at=message.sent_at,
        revision=message.revision,
        edited_at=message.edited_at,
        attachments=list(message.attachments),
    )


def _json(body: BaseModel) -> Response:
    """Serialise a response model once. Returning the model would make FastAPI validate it
    again against `response_model` and then serialise it: twice the work for a 50-message page.
    `response_model` stays on each route for the OpenAPI description."""
    return Response(body.model_dump_json(), media_type="application/json")


def _search_out(page: SearchPage) -> SearchOut:
    return SearchOut(
        messages=[
            FoundOut(**_out(found.message).model_dump(), highlights=found.highlights)
            for found in page.found
        ],
        next_cursor=page.next_cursor,
        more_chats=page.more_chats,
    )


ChatId = Annotated[uuid.UUID, Path(description="The chat's UUID")]
SearchQ = Annotated[
    str,
    Query(
        min_length=1,
        max_length=QUERY_MAX_CHARS,
        description=(
            "Words that must all appear (accent-insensitive; exact spellings rank first with "
            'sort=relevance). Words in double quotes must appear consecutively ("a phrase"). '
            "The last word also matches longer words when q ends inside it (search-as-you-type)."
        ),
    ),
]
SearchLimit = Annotated[int, Query(ge=1, le=SEARCH_LIMIT_MAX)]
SenderFilter = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_SENDER_CHARS,
        pattern=ID_PATTERN,
        description="Only messages of this sender",
    ),
]
FromFilter = Annotated[
    datetime | None,
    Query(
        alias="from",
        description="ISO-8601 date-time with a time zone; messages made at or after it (by the "
        "message id's time, the clock of record, not the producer's sent_at)",
    ),
]
ToFilter = Annotated[
    datetime | None,
    Query(
        alias="to",
        description="ISO-8601 date-time with a time zone; messages made before it (exclusive)",
    ),
]
SortParam = Annotated[
    Literal["newest", "relevance"],
    Query(
        description="`newest` first (default), or `relevance`: exact spellings first, then newest"
    ),
]
CursorParam = Annotated[
    str | None,
    Query(max_length=64, description="`next_cursor` of the previous page"),
]
ChatFilter = Annotated[
    list[uuid.UUID] | None,
    Query(
        alias="chat_id",
        max_length=MAX_CHAT_FILTER,
        description=f"Only these chats (repeat the parameter, at most {MAX_CHAT_FILTER}); "
        "chats the caller is not in contribute nothing",
    ),
]


def create_app(
    service: ReaderService, settings: Settings, ready: Callable[[], Awaitable[bool]]
) -> FastAPI:
    app = FastAPI(
        title="Sealstream reader",
        version="1",
        description=(
            "History, single messages and search of a chat or of all the caller's chats, "
            "decrypted on demand for participants. "
            'Errors are {"error": {"code", "message", "field"?}}.'
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
        summary="Messages of the chat containing every word of q, decrypted, with highlights",
    )
    def search(
        user: CurrentUser,
        chat_id: ChatId,
        q: SearchQ,
        limit: SearchLimit = SEARCH_LIMIT_DEFAULT,
        sender_id: SenderFilter = None,
        since: FromFilter = None,
        until: ToFilter = None,
        sort: SortParam = "newest",
        cursor: CursorParam = None,
    ) -> Response:
        options = SearchOptions(
            sender_id=sender_id, since=since, until=until, sort=sort, cursor=cursor
        )
        return _json(_search_out(service.search(user, chat_id, q, limit, options)))

    @app.get(
        "/v1/search",
        response_model=SearchOut,
        tags=[TAG],
        summary="Messages of every chat the caller belongs to containing every word of q",
        description=(
            "Searches the chats the caller is a participant of at the time of the request "
            "(read afresh on every page), decrypted, with highlights. Deleted chats and "
            "messages never appear."
        ),
    )
    def search_all(
        user: CurrentUser,
        q: SearchQ,
        limit: SearchLimit = SEARCH_LIMIT_DEFAULT,
        chat_ids: ChatFilter = None,
        sender_id: SenderFilter = None,
        since: FromFilter = None,
        until: ToFilter = None,
        sort: SortParam = "newest",
        cursor: CursorParam = None,
    ) -> Response:
        options = SearchOptions(
            limit=limit,
            chat_ids=chat_ids,
            sender_id=sender_id,
            since=since,
            until=until,
            sort=sort,
            cursor=cursor,
        )
        return _json(_search_out(service.search_all(user, q, options)))

    return app
