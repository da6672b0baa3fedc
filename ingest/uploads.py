"""The gateway's attachment upload: the checks of an upload's headers, and the bridge that
streams a request body (async, on the event loop) into the blocking `AttachmentFiles.store`
(boto3 and the Cassandra driver, in a worker thread) without ever holding the file.

The bridge is a bounded in-memory stream of `UPLOAD_QUEUE_CHUNKS` body chunks: the event loop
pushes each chunk the server received, the worker thread pulls them as the store encrypts and
uploads; when the store is slower the queue fills and the loop stops reading the socket (so
TCP flow control slows the client). Memory stays at the queue plus one object-store part,
whatever the file's size (docs/operations.md "Attachments").

A body that ends early (the client went away) makes the store's iterator raise `UploadAborted`,
never end: the object store then aborts its multipart upload and no row is written, so a
truncated file is never stored as if complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TypeVar

import anyio
from anyio import from_thread, to_thread

from sealstream.errors import SealstreamError
from sealstream.http import ApiError

_T = TypeVar("_T")

UPLOAD_QUEUE_CHUNKS = 16
"""Body chunks (uvicorn hands them over at up to about 64 KiB each) queued between the socket
and the store's thread."""

CONTENT_TYPE_FIELD = "header.content-type"


class UploadAborted(SealstreamError):
    """The request body ended before its end (the client disconnected or the request was
    cancelled): the upload is abandoned and nothing of it is kept."""

    def __init__(self) -> None:
        super().__init__("the upload's body ended early (client disconnected)")


def media_type(header: str | None, allowed: Iterable[str]) -> str:
    """The media type of a `Content-Type` header value (lower case, parameters dropped) when it
    is one of `allowed` (compared case-insensitively); else 415 `unsupported_content_type`
    naming the header. The value is not echoed (it is the client's input)."""
    accepted = sorted({a.lower() for a in allowed})
    if header is None or not header.strip():
        raise ApiError(
            415,
            "unsupported_content_type",
            f"Content-Type: required, the file's media type (one of {', '.join(accepted)})",
            CONTENT_TYPE_FIELD,
        )
    media = header.split(";", 1)[0].strip().lower()
    if media not in accepted:
        raise ApiError(
            415,
            "unsupported_content_type",
            f"Content-Type: not an accepted attachment type (one of {', '.join(accepted)})",
            CONTENT_TYPE_FIELD,
        )
    return media


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "attachment_too_large",
        f"body: an attachment is at most {limit} bytes (AttachmentSettings.max_bytes)",
        "body",
    )


async def store_streamed(
    store: Callable[[Iterable[bytes]], _T],
    body: AsyncIterator[bytes],
    limiter: anyio.CapacityLimiter,
) -> _T:
    """`store(chunks)` in a worker thread (one of `limiter`'s), `chunks` being the bytes of
    `body` as they arrive. Returns what `store` returns; raises what it raises (the body is
    then no longer read), or `UploadAborted` (through `store`) when `body` fails or this call
    is cancelled before the body ended."""
    send, receive = anyio.create_memory_object_stream[bytes](UPLOAD_QUEUE_CHUNKS)
    body_complete = False  # set before `send` is closed, read by the thread after it
    failure: list[Exception] = []
    result: list[_T] = []

    def chunks() -> Iterator[bytes]:
        while True:
            try:
                chunk = from_thread.run(receive.receive)
            except anyio.EndOfStream:
                if not body_complete:
                    raise UploadAborted() from None
                return
            yield chunk

    def run() -> _T:
        with receive:  # closed when the store ends, however: the pump stops reading
            return store(chunks())

    async def pump() -> None:
        nonlocal body_complete
        try:
            async for chunk in body:
                if chunk:
                    await send.send(chunk)
            body_complete = True
        except anyio.BrokenResourceError:
            return  # the store ended first (too large, store down): its error answers
        except Exception:  # noqa: BLE001 - ClientDisconnect and kin: the thread sees an abort
            return
        finally:
            send.close()

    async def stored(scope: anyio.CancelScope) -> None:
        try:
            result.append(await to_thread.run_sync(run, limiter=limiter))
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
            failure.append(exc)
            scope.cancel()  # stop waiting for a body nobody reads any more

    async with anyio.create_task_group() as group:
        group.start_soon(pump)
        group.start_soon(stored, group.cancel_scope)
    if failure:
        raise failure[0]
    return result[0]
