"""Attachment files: encrypted objects in the object store, their metadata in Cassandra.

The one place that puts the pieces together (the gateway uploads through it, the reader
downloads through it, deletion and retention remove through it):

- the bytes: `sealstream.file_crypto` (streaming AEAD over segments, docs/format.md
  "Attachment files") under a per-file key derived from the chat's current DEK;
- where they live: `sealstream.adapters.object_store` under `object_key(chat, file)`
  (``chats/<chat_id>/files/<file_id>``, so a chat's objects are one prefix);
- what is known about them: `AttachmentRow` in Cassandra's `attachments` table, written only
  once the object is complete, so an upload that fails or is cut off halfway leaves no row (and
  `ObjectStore.put` aborts its multipart upload: no object either).

Neither the plaintext nor anything derived from it (hash, name) is stored outside the ciphertext.
Every call blocks (boto3, the Cassandra driver): async callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.ids import id_time
from sealstream.adapters.cassandra import AttachmentRow
from sealstream.adapters.object_store import ObjectStore
from sealstream.crypto import ChatKey
from sealstream.errors import DecryptionError, SealstreamError
from sealstream.file_crypto import (
    FILE_HEADER_LEN,
    FileContext,
    FileLayout,
    FileOpener,
    decrypt_file,
    encrypt_file,
)

OBJECT_CONTENT_TYPE = "application/octet-stream"
"""What the object store is told an attachment object is: ciphertext, whatever the file."""


def readable_by(row: AttachmentRow, user: str) -> bool:
    """Whether a participant `user` of the row's chat may read the file: its uploader always,
    the others once a message referenced it (an upload never sent stays its uploader's draft:
    another participant must not fetch it by guessing its id)."""
    return row.sender_id == user or row.shared_at is not None


def chat_prefix(chat_id: uuid.UUID) -> str:
    """The object-key prefix of every attachment of a chat (chat deletion removes it whole)."""
    return f"chats/{chat_id}/files/"


def object_key(chat_id: uuid.UUID, file_id: int) -> str:
    """Where the ciphertext of a file is kept: ``chats/<chat_id>/files/<file_id>``."""
    return f"{chat_prefix(chat_id)}{file_id}"


class AttachmentTooLarge(SealstreamError):
    """The upload passed `limit` bytes (plaintext); raised from inside the stream, so the
    object store aborts the upload and nothing of it remains."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"attachment larger than {limit} bytes")
        self.limit = limit


class AttachmentKeys(Protocol):
    """The chat DEKs (`sealstream.keys.service.KeyService`)."""

    def current_key(self, chat_id: uuid.UUID) -> ChatKey: ...

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey: ...


class AttachmentRows(Protocol):
    """Attachment metadata (`sealstream.adapters.cassandra.MessageStore`)."""

    def write_attachment(self, row: AttachmentRow) -> None: ...

    def attachment(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None: ...

    def mark_attachment_shared(self, chat_id: uuid.UUID, file_id: int, when: datetime) -> None: ...


def _limited(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise AttachmentTooLarge(limit)
        yield chunk


class AttachmentFiles:
    """Store, find and read attachment files of chats.

    `segment_size`: plaintext bytes per segment for new files (`AttachmentSettings`).
    """

    def __init__(
        self,
        objects: ObjectStore,
        rows: AttachmentRows,
        keys: AttachmentKeys,
        segment_size: int,
    ) -> None:
        self.objects = objects
        self.rows = rows
        self.keys = keys
        self.segment_size = segment_size

    def store(
        self,
        chat_id: uuid.UUID,
        file_id: int,
        sender_id: str,
        content_type: str,
        chunks: Iterable[bytes],
        max_bytes: int,
    ) -> AttachmentRow:
        """Encrypt the concatenation of `chunks` under the chat's current DEK, store it, then
        write its metadata; returns the metadata. Holds at most one object-store part plus two
        segments in memory, whatever the size.

        Raises `AttachmentTooLarge` past `max_bytes` plaintext bytes, `ObjectStoreError` when the
        store fails, `StoreUnavailable` (Cassandra), `KeyNotFound`/`KeyDestroyed` (no live
        DEK); whatever `chunks` raises propagates. In every case no row is written and the
        multipart upload, if one was started, is aborted (docs/operations.md "Attachments").
        """
        key = self.keys.current_key(chat_id)
        ctx = FileContext(chat_id, file_id)
        where = object_key(chat_id, file_id)
        ciphertext = encrypt_file(
            key, ctx, _limited(chunks, max_bytes), segment_size=self.segment_size
        )
        stored = self.objects.put(where, ciphertext, content_type=OBJECT_CONTENT_TYPE)
        layout = FileLayout(self.segment_size)
        row = AttachmentRow(
            chat_id=chat_id,
            file_id=file_id,
            sender_id=sender_id,
            size=layout.plaintext_size(stored.size),
            ciphertext_size=stored.size,
            content_type=content_type,
            dek_version=key.version,
            segment_size=self.segment_size,
            object_key=where,
            created_at=id_time(file_id),
        )
        try:
            self.rows.write_attachment(row)
        except BaseException:
            # No row, no object: a file without its row could never be read nor found for
            # deletion. The row's error is the one that matters; a failed delete leaves an
            # object nothing refers to (and no key names it), which deletion of the chat's
            # prefix removes.
            with contextlib.suppress(Exception):
                self.objects.delete(where)
            raise
        return row

    def get(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        """The metadata of a live attachment of this chat; None if unknown or deleted."""
        row = self.rows.attachment(chat_id, file_id)
        return None if row is None or row.deleted_at is not None else row

    def share(self, chat_id: uuid.UUID, file_ids: Iterable[int]) -> None:
        """Record that a message references these live attachments of the chat (the gateway,
        once it checked them): until then a file is readable by its uploader only
        (`readable_by`). Raises `StoreUnavailable`."""
        now = datetime.now(UTC)
        for file_id in file_ids:
            self.rows.mark_attachment_shared(chat_id, file_id, now)

    def read(
        self, row: AttachmentRow, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Plaintext bytes `start` .. `start + length - 1` of the file (to its end when
        `length` is None), decrypting only the segments they touch.

        The header and the first segment are fetched and checked before this returns, so a
        wrong key, a swapped or damaged header and a missing object raise here
        (`DecryptionError`, `ObjectNotFound`, `KeyDestroyed`); a later damaged segment raises
        `DecryptionError` from the iterator, after the segments before it were yielded: an HTTP
        response must then be aborted, never ended cleanly. `ValueError` for a range outside
        the file (the HTTP layer answers 416 before calling this).
        """
        size = row.size
        if length is None:
            length = size - start
        whole = start == 0 and length == size
        if not whole and (start < 0 or length < 1 or start + length > size):
            raise ValueError(f"range {start}+{length} is not inside a file of {size} bytes")
        key = self.keys.key(row.chat_id, row.dek_version)
        ctx = FileContext(row.chat_id, row.file_id)
        if whole:  # one request for the whole object (an empty file is one empty segment)
            chunks = _exactly(
                decrypt_file(key, ctx, _read_ahead(self.objects.get(row.object_key))), size
            )
        else:
            chunks = self._read_range(row, key, ctx, start, length)
        return _primed(chunks)

    def _read_range(
        self, row: AttachmentRow, key: ChatKey, ctx: FileContext, start: int, length: int
    ) -> Iterator[bytes]:
        # The header and the segments are requested at once (two round trips to the store side
        # by side, not one after the other: a range read's first byte comes one store latency
        # sooner). The span is computed from the row's segment size, so the header must agree.
        try:
            layout = FileLayout(row.segment_size)
        except ValueError:
            raise DecryptionError() from None  # a segment size no file has: the row is not genuine
        header_request = _HEADER_FETCHES.submit(self._header, row.object_key)
        try:
            span = layout.span(start, length, row.size)
            body = self.objects.get(
                row.object_key, span.ciphertext_start, span.ciphertext_end - span.ciphertext_start
            )
        except BaseException:
            header_request.cancel()
            raise
        try:
            opener = FileOpener.from_header(key, ctx, header_request.result())
        except BaseException:
            _close(body)
            raise
        if opener.layout != layout:  # the row's segment size is not the file's: not genuine
            _close(body)
            raise DecryptionError()
        return opener.decrypt_range(_read_ahead(body), span, row.size)

    def _header(self, where: str) -> bytes:
        return b"".join(self.objects.get(where, 0, FILE_HEADER_LEN))


# Fetches of file headers that run beside the fetch of a range's segments (`_read_range`);
# threads start on first use, none at import.
_HEADER_FETCHES = ThreadPoolExecutor(max_workers=8, thread_name_prefix="attachment-header")


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


READ_AHEAD_CHUNKS = 4
"""Object-store reads (`READ_CHUNK_BYTES` each) a download's fetching thread may be ahead of its
decryption (`_read_ahead`)."""

_END = object()


def _read_ahead(chunks: Iterator[bytes], depth: int = READ_AHEAD_CHUNKS) -> Iterator[bytes]:
    """The items of `chunks` (an object-store read), fetched by a thread of their own at most
    `depth` items ahead: the socket reads of the next chunk overlap the decryption of this one
    instead of adding to it (AES-GCM releases the GIL). An error of `chunks` is raised after the
    items before it. Closing this iterator (or dropping it) stops the thread and closes `chunks`,
    which releases the store's connection."""
    ready: queue.Queue[Any] = queue.Queue(depth)
    stopped = threading.Event()

    def hand_over(item: Any) -> bool:
        while not stopped.is_set():
            try:
                ready.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def fetch() -> None:
        try:
            for chunk in chunks:
                if not hand_over(chunk):
                    return
            hand_over((_END, None))
        except BaseException as exc:  # noqa: BLE001 - raised by the consumer, in its thread
            hand_over((_END, exc))
        finally:
            _close(chunks)

    threading.Thread(target=fetch, name="attachment-fetch", daemon=True).start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, tuple) and item[0] is _END:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stopped.set()


def _exactly(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """`chunks`, the whole file's plaintext, checked to be exactly `size` bytes (the row's
    size, which the response's Content-Length states): `DecryptionError` otherwise.

    The file's own framing (its last-segment flag) proves where the file ends, but the row's
    size is only a Cassandra column: a row cut to a segment boundary would otherwise end the
    response cleanly with a truncated file. So the last piece is held back until the file is
    known to end there, and a file longer than the row fails before the row's size is reached.
    """
    seen = 0
    held: bytes | None = None
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            _close(chunks)
            raise DecryptionError()
        if held is not None:
            yield held
        held = chunk
    if seen != size:
        raise DecryptionError()
    if held is not None:
        yield held


def _primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks` with its first item computed now: errors of the header and first segment
    surface to the caller before it commits to a response."""
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())
    return itertools.chain((first,), chunks)
