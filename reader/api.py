"""The reader's HTTP API: a thin FastAPI layer over `ReaderService`.

Handlers are plain `def`s: the Cassandra, Postgres and OpenSearch drivers block, so FastAPI runs
each request in its thread pool. Every route needs a bearer token (`CurrentUser`). Attachment
downloads stream: the file is decrypted segment by segment in the thread pool as the client
reads it (reader.downloads holds their HTTP semantics).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Header, Path, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Message, Receive, Scope, Send

from reader import downloads
from reader.messages import ReadMessage
from reader.prefetch import ReadAhead
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
from sealstream.adapters.cassandra import AttachmentRow
from sealstream.adapters.opensearch import MAX_SEARCH_CHATS
from sealstream.http import (
    MESSAGE_ID_PATTERN,
    ApiError,
    CurrentUser,
    MessageIdPath,
    error_body,
    install,
)
from sealstream.http import message_id as parse_message_id
from sealstream.settings import Settings
from sealstream.text_rules import ID_PATTERN

TAG = "messages"
FILES_TAG = "attachments"
log = logging.getLogger(__name__)


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


AttachmentIdPath = Annotated[
    str, Path(pattern=MESSAGE_ID_PATTERN, description="Decimal 64-bit attachment id")
]
RangeHeader = Annotated[
    str | None,
    Header(
        alias="Range",
        description="One byte range (`bytes=a-b`, `bytes=a-`, `bytes=-n`): 206 with only those "
        "bytes. Several ranges, another unit or a malformed value are ignored (200, whole file)",
    ),
]
IfNoneMatchHeader = Annotated[
    str | None,
    Header(alias="If-None-Match", description="The ETag of a copy held: 304 if it still is"),
]
IfRangeHeader = Annotated[
    str | None,
    Header(
        alias="If-Range",
        description="Honour Range only if the file's ETag is still this one (else 200, whole)",
    ),
]
_BINARY = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
_FILE_HEADERS = {
    name: {"description": text, "schema": {"type": "string"}}
    for name, text in {
        "ETag": "Strong; the same for as long as the file exists",
        "Content-Length": "Bytes of this response's body",
        "Accept-Ranges": "bytes",
        "Content-Disposition": 'attachment; filename="<attachment id><extension>"',
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private",
    }.items()
}
_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The whole file, with the media type it was uploaded with",
        "content": _BINARY,
        "headers": _FILE_HEADERS,
    },
    206: {
        "description": "The requested byte range (`Content-Range: bytes a-b/size`)",
        "content": _BINARY,
        "headers": {**_FILE_HEADERS, "Content-Range": {"schema": {"type": "string"}}},
    },
    304: {"description": "Not modified: If-None-Match named the file's ETag"},
    404: {"description": "No such chat, or no such (or a deleted) attachment in it"},
    416: {"description": "The range starts past the end (`Content-Range: bytes */size`)"},
    429: {
        "description": "`too_many_downloads`: the caller already has "
        "`AttachmentSettings.downloads_per_user` downloads under way on this reader"
    },
    503: {
        "description": "`busy`: `AttachmentSettings.downloads_at_once` downloads under way on "
        "this reader, or the object store is unavailable; retry after `Retry-After` seconds"
    },
    500: {
        "description": "The stored file failed its integrity check before its first byte "
        "(`integrity_error`), or a bug. A failure after the first byte aborts the connection: "
        "the body ends short of Content-Length"
    },
}

_HEAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "As GET, with no body", "headers": _FILE_HEADERS},
    304: _DOWNLOAD_RESPONSES[304],
    404: _DOWNLOAD_RESPONSES[404],
}


def parse_attachment_id(raw: str) -> int:
    """The value of an `AttachmentIdPath`; 422 naming the field when out of range."""
    value = int(raw)
    if not 1 <= value <= 2**63 - 1:
        raise ApiError(
            422,
            "invalid_request",
            "path.attachment_id: must be a decimal 64-bit attachment id",
            "path.attachment_id",
        )
    return value


class DownloadSlots:
    """Downloads under way on this reader, in all and per user: a download takes a slot before
    its object is touched and gives it back when its response ends, however it ends. Beyond
    `at_once` in all: 503 `busy` (Retry-After); beyond `per_user` of one user: 429
    `too_many_downloads`. Taken in the route's worker thread, given back on the event loop:
    hence the lock."""

    def __init__(self, at_once: int, per_user: int) -> None:
        self.at_once = at_once
        self.per_user = per_user
        self._lock = threading.Lock()
        self._total = 0
        self._of: dict[str, int] = {}

    def take(self, user: str) -> Callable[[], None]:
        """A slot for `user`, or `ApiError` (429/503); returns the function that gives it back
        (call it once)."""
        with self._lock:
            mine = self._of.get(user, 0)
            if mine >= self.per_user:
                raise ApiError(
                    429,
                    "too_many_downloads",
                    f"at most {self.per_user} downloads of one user at once "
                    "(AttachmentSettings.downloads_per_user); retry when one has finished",
                )
            if self._total >= self.at_once:
                raise ApiError(503, "busy", "too many downloads under way; retry")
            self._total += 1
            self._of[user] = mine + 1

        def give_back() -> None:
            with self._lock:
                self._total -= 1
                left = self._of.pop(user) - 1
                if left:
                    self._of[user] = left

        return give_back


class _ClientStalled(Exception):
    """The client took no piece of a download within the send timeout."""


class DecryptedFile(StreamingResponse):
    """A streamed download that is aborted, never ended cleanly, when its source fails.

    Once the status line is sent, the only way left to tell the client that the body is not
    the file is to break the transfer: the last (empty) body message is never sent, so the
    server closes the connection short of Content-Length and the client sees a truncated
    transfer (curl: "transfer closed with N bytes remaining"), not a complete file.

    `send_timeout`: seconds the client may take to accept each piece (about 1 MiB). uvicorn
    waits for ever on a client that keeps its socket open and reads nothing, and meanwhile the
    download holds its read-ahead thread, a store connection and a few MiB of plaintext; past
    this the download is cut off the same way and all of that is released."""

    send_timeout: float | None = None
    # Called once when the response ended, however (gives the download's slot back).
    on_end: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Here and not only around the streaming: Starlette may cancel the streaming task
        # before it ever ran (the client left first), and the slot must come back anyway.
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._ended()

    async def stream_response(self, send: Send) -> None:
        try:
            await self._stream(send)
        finally:
            self._ended()

    async def _send(self, send: Send, message: Message) -> None:
        try:
            with anyio.fail_after(self.send_timeout):
                await send(message)
        except TimeoutError:
            # Only this deadline: a timeout of the store's read is a failure of the source.
            raise _ClientStalled() from None

    def _ended(self) -> None:
        on_end = self.on_end
        if on_end is not None:
            self.on_end = None
            on_end()

    async def _stream(self, send: Send) -> None:
        chunks = aiter(self.body_iterator)
        try:
            await self._send(
                send,
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                },
            )
            async for chunk in chunks:
                await self._send(
                    send, {"type": "http.response.body", "body": chunk, "more_body": True}
                )
        except _ClientStalled:
            log.warning(
                "attachment download cut off: the client read nothing in time",
                extra={"send_timeout_seconds": self.send_timeout},
            )
            return
        except Exception as exc:  # noqa: BLE001 - any failure mid-body ends in an abort
            # The integrity failure itself was logged by ids (ReaderService); the type only.
            log.error("attachment download aborted", extra={"error": type(exc).__name__})
            return
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # stops the read-ahead thread now, not at garbage collection
        await send({"type": "http.response.body", "body": b"", "more_body": False})


SEND_BYTES = 1024 * 1024
"""Decrypted segments are joined into pieces of about this size before they go to the event
loop: one hand-over between threads and one socket write per MiB instead of per 64 KiB
segment (reader.prefetch)."""


def _coalesced(chunks: Iterator[bytes], at_least: int = SEND_BYTES) -> Iterator[bytes]:
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held >= at_least:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def _file_response(
    service: ReaderService,
    row: AttachmentRow,
    head: bool,
    range_header: str | None,
    if_none_match: str | None,
    if_range: str | None,
    send_timeout: float | None = None,
    slots: DownloadSlots | None = None,
    user: str = "",
) -> Response:
    tag = downloads.etag(row)
    headers = downloads.headers(row, tag)
    if downloads.not_modified(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    wanted = None
    if not head and downloads.range_applies(if_range, tag):
        try:
            wanted = downloads.parse_range(range_header, row.size)
        except downloads.Unsatisfiable as err:
            return JSONResponse(
                error_body("range_not_satisfiable", str(err), "header.range"),
                status_code=416,
                headers={
                    "ETag": tag,
                    "Accept-Ranges": "bytes",
                    "Cache-Control": "private",
                    "Content-Range": f"bytes */{err.size}",
                },
            )
    # Set here, not as media_type: Starlette would append "; charset=utf-8" to text/* types.
    headers["Content-Type"] = row.content_type
    if head:
        headers["Content-Length"] = str(row.size)
        return Response(status_code=200, headers=headers)
    give_back = slots.take(user) if slots is not None else None
    try:
        if wanted is None:
            headers["Content-Length"] = str(row.size)
            chunks = ReadAhead(_coalesced(service.attachment_bytes(row)))
            response = DecryptedFile(chunks, status_code=200, headers=headers)
        else:
            headers["Content-Length"] = str(wanted.length)
            headers["Content-Range"] = wanted.content_range
            chunks = ReadAhead(
                _coalesced(service.attachment_bytes(row, wanted.start, wanted.length))
            )
            response = DecryptedFile(chunks, status_code=206, headers=headers)
    except BaseException:
        if give_back is not None:
            give_back()
        raise
    response.send_timeout = send_timeout
    response.on_end = give_back
    return response


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
        openapi_tags=[
            {"name": TAG, "description": "Reading a chat's messages"},
            {"name": FILES_TAG, "description": "Downloading a chat's attachment files"},
        ],
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

    send_timeout = settings.reader.limits.send_timeout_seconds
    slots = DownloadSlots(
        settings.attachments.downloads_at_once, settings.attachments.downloads_per_user
    )
    download_doc = (
        "Participants only. Streamed and decrypted on the fly; a single `Range` decrypts only "
        "the segments it touches. `Content-Type` is the media type given at upload; the file "
        "name is the attachment id with an extension guessed from that type (no user file name "
        "is stored). Conditional requests: `If-None-Match` (304) and `If-Range`."
    )

    @app.get(
        "/v1/chats/{chat_id}/attachments/{attachment_id}",
        tags=[FILES_TAG],
        summary="Download an attachment, decrypted, whole or one byte range",
        description=download_doc,
        response_class=Response,
        responses=_DOWNLOAD_RESPONSES,
    )
    def download(
        user: CurrentUser,
        chat_id: ChatId,
        attachment_id: AttachmentIdPath,
        range_header: RangeHeader = None,
        if_none_match: IfNoneMatchHeader = None,
        if_range: IfRangeHeader = None,
    ) -> Response:
        row = service.attachment(user, chat_id, parse_attachment_id(attachment_id))
        return _file_response(
            service, row, False, range_header, if_none_match, if_range, send_timeout, slots, user
        )

    @app.head(
        "/v1/chats/{chat_id}/attachments/{attachment_id}",
        tags=[FILES_TAG],
        summary="An attachment's headers (size, type, ETag) without its bytes",
        description="The headers GET would answer for the whole file; `Range` is not "
        "honoured on HEAD (RFC 9110 §14.2). Checks the metadata only: no byte is decrypted.",
        response_class=Response,
        responses=_HEAD_RESPONSES,
    )
    def download_head(
        user: CurrentUser,
        chat_id: ChatId,
        attachment_id: AttachmentIdPath,
        if_none_match: IfNoneMatchHeader = None,
    ) -> Response:
        row = service.attachment(user, chat_id, parse_attachment_id(attachment_id))
        return _file_response(service, row, True, None, if_none_match, None)

    return app
