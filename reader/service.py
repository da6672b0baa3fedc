"""The reader's logic: who may read a chat, history paging, search, opening envelopes, and
finding and decrypting attachment files.

Plain classes that take their collaborators (reader.ports) as arguments; no I/O set-up here.
Errors meant for the client are `ApiError`s (403/404/410/422); a failed integrity check is the
opaque `DecryptionError`, which the HTTP layer turns into a 500 `integrity_error` with no detail.
Message text is only ever held in memory on its way to the caller: never logged, never raised.
"""

from __future__ import annotations

import base64
import binascii
import logging
import struct
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from prometheus_client import Counter, Histogram

from reader.messages import ReadMessage
from reader.ports import (
    AttachmentSource,
    ChatDirectory,
    KeySource,
    MessageSource,
    QueryTerms,
    SearchPort,
    TextAnalyzer,
)
from reader.query import PlainQueryTerms
from reader.search import (
    SEARCH_LIMIT_DEFAULT,
    MessageSearch,
    SearchOptions,
    SearchPage,
    check_options,
    check_query,
)
from schemas.ids import EPOCH_MS, SEQUENCE_BITS, WORKER_BITS
from sealstream.adapters.cassandra import AttachmentRow, StoredMessage
from sealstream.adapters.object_store import ObjectNotFound, ObjectStoreError
from sealstream.adapters.postgres import ChatRow
from sealstream.attachments import readable_by
from sealstream.crypto import envelope_dek_version, open_envelope
from sealstream.errors import DecryptionError, KeyDestroyed, KeyNotFound, MessageGone
from sealstream.http import ApiError
from sealstream.keys.cache import TtlCache

log = logging.getLogger(__name__)

MAX_MESSAGE_ID = 2**63 - 1  # Cassandra bigint; Snowflake ids are 63-bit
HISTORY_LIMIT_MAX = 100
HISTORY_LIMIT_DEFAULT = 50
# First history page: start just above "now + skew" so a gateway whose clock runs a little ahead
# still has its newest messages on page one. Costs at most one extra (empty) bucket read.
DEFAULT_CLOCK_SKEW_MS = 10 * 60 * 1000

_TIME_SHIFT = WORKER_BITS + SEQUENCE_BITS
_CURSOR = struct.Struct(">BQ")  # cursor format version | id of the last message returned
_CURSOR_VERSION = 1
_CURSOR_CHARS = 12  # base64url of 9 bytes, no padding

DECRYPTS_PER_REQUEST = Histogram(
    "sealstream_reader_decrypts_per_request",
    "Envelopes opened per reader request",
    ["op"],
    buckets=(0, 1, 2, 5, 10, 20, 50, 100),
)
INTEGRITY_FAILURES = Counter(
    "sealstream_reader_integrity_failures", "Stored envelopes that failed to open"
)
ATTACHMENT_INTEGRITY_FAILURES = Counter(
    "sealstream_reader_attachment_integrity_failures",
    "Attachment files that failed their integrity check, before or during a download",
    ["when"],
)


def _file_integrity_error() -> ApiError:
    return ApiError(500, "integrity_error", "the stored file failed its integrity check")


@dataclass(frozen=True)
class Page:
    """A history page, newest first; `next_cursor` is None on the last page."""

    messages: list[ReadMessage]
    next_cursor: str | None


# --- cursors ---------------------------------------------------------------------------------


def encode_cursor(message_id: int) -> str:
    """Opaque cursor: base64url (no padding) of a format byte and the last message id seen."""
    raw = _CURSOR.pack(_CURSOR_VERSION, message_id)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The message id inside a cursor; 422 naming `query.before` for anything else."""
    invalid = ApiError(
        422, "invalid_request", "query.before: not a cursor returned by this API", "query.before"
    )
    if len(cursor) != _CURSOR_CHARS or not cursor.isascii():
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise invalid from None
    if len(raw) != _CURSOR.size:
        raise invalid
    version, message_id = _CURSOR.unpack(raw)
    # Canonical form only: a cursor is exactly what encode_cursor produced (no alternate spellings).
    if version != _CURSOR_VERSION or not 1 <= message_id <= MAX_MESSAGE_ID:
        raise invalid
    if encode_cursor(message_id) != cursor:
        raise invalid
    return int(message_id)


def ceiling_id(now_ms: int, skew_ms: int = DEFAULT_CLOCK_SKEW_MS) -> int:
    """An exclusive upper bound above every id made up to `now_ms + skew_ms`."""
    return min(MAX_MESSAGE_ID, (max(0, now_ms + skew_ms - EPOCH_MS) + 1) << _TIME_SHIFT)


# --- chats -----------------------------------------------------------------------------------


class CachedChatDirectory:
    """A `ChatDirectory` over a lookup function, with a short in-process TTL cache.

    Participants changes reach the reader within `ttl_seconds`. A deletion reaches it at once:
    the wiring calls `forget` on the key service's invalidation (Redis pub/sub), and a deleted
    chat's keys are destroyed anyway, so reads of it fail closed (410). Unknown chats
    are not cached, so a chat is readable as soon as it exists.
    """

    def __init__(
        self,
        lookup: Callable[[uuid.UUID], ChatRow | None],
        ttl_seconds: float = 2.0,
        max_entries: int = 10_000,
        members: Callable[[str, int, Collection[uuid.UUID] | None], list[ChatRow]] | None = None,
    ) -> None:
        self._lookup = lookup
        self._members = members
        self._cache: TtlCache[uuid.UUID, ChatRow] = TtlCache(max_entries, ttl_seconds)

    def forget(self, chat_id: uuid.UUID) -> None:
        """Drop a chat at once (its deletion was announced by another process)."""
        self._cache.pop(chat_id)

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        cached = self._cache.get(chat_id)
        if cached is not None:
            return cached
        chat = self._lookup(chat_id)
        if chat is not None:
            self._cache.put(chat_id, chat)
        return chat

    def member_chats(
        self, user_id: str, limit: int, chat_ids: Collection[uuid.UUID] | None = None
    ) -> list[ChatRow]:
        """Straight from `members` (Postgres), never cached: a removal takes effect at once."""
        if self._members is None:
            raise TypeError("this directory was built without a membership lookup")
        return self._members(user_id, limit, chat_ids)


# --- opening envelopes ------------------------------------------------------------------------


def _resealed(row: StoredMessage, fresh: StoredMessage) -> bool:
    """Whether `fresh` is `row` re-sealed with another DEK version and nothing else changed."""
    return (
        fresh.deleted_at is None
        and fresh.dek_version != row.dek_version
        and replace(fresh, envelope=row.envelope, dek_version=row.dek_version) == row
    )


class EnvelopeOpener:
    """Opens stored rows with their chat's key, for every read path (reader and live delivery).

    `open` checks that the row and its envelope agree on the DEK version and opens the envelope
    with the row's own context (chat, id, sender, revision, time), so a rewritten column fails
    like a flipped bit: `DecryptionError`, counted and logged by ids only. `KeyDestroyed`
    (a shredded chat) propagates.

    `reread(chat_id, message_id)` (the store's `get`) covers a row fetched before
    `sealstream keys reencrypt` re-sealed it and opened after the job destroyed its old
    version (the job destroys a version once no row uses it, which a read in flight does not
    count): on `KeyDestroyed` the row is read again, once, and opened instead only if it is the
    same message re-sealed, i.e. only its envelope and DEK version differ (what re-encryption
    changes). Anything else leaves `KeyDestroyed` standing: a row still on the destroyed
    version (a shredded chat), gone or edited since, or differing in any field the
    caller may show beside the text (live delivery shows a change event's own sender,
    revision, times and attachments; a forged event naming a destroyed version must not
    borrow a real message's text). A message deleted since raises `MessageGone` (a
    `KeyDestroyed`): history and search leave it out, a single read answers 404.
    """

    def __init__(
        self,
        keys: KeySource,
        reread: Callable[[uuid.UUID, int], StoredMessage | None] | None = None,
    ) -> None:
        self.keys = keys
        self.reread = reread

    def open(self, row: StoredMessage) -> ReadMessage:
        try:
            try:
                return self._open_row(row)
            except KeyDestroyed:
                fresh = self.reread(row.chat_id, row.message_id) if self.reread else None
                if fresh is not None and fresh.deleted_at is not None:
                    raise MessageGone("the message was deleted while it was read") from None
                if fresh is None or not _resealed(row, fresh):
                    raise
                return self._open_row(fresh)
        except DecryptionError:
            INTEGRITY_FAILURES.inc()
            # Ids and version only: never the envelope or any part of a plaintext.
            log.error(
                "stored envelope failed its integrity check",
                extra={
                    "chat_id": str(row.chat_id),
                    "message_id": row.message_id,
                    "dek_version": row.dek_version,
                },
            )
            raise

    def _open_row(self, row: StoredMessage) -> ReadMessage:
        version = envelope_dek_version(row.envelope)  # DecryptionError if malformed
        if version != row.dek_version:
            raise DecryptionError()  # the row and its envelope disagree: tampered or corrupt
        try:
            key = self.keys.key(row.chat_id, version)
        except KeyNotFound:
            # The chat exists (checked) but never had this version: the row is not genuine.
            raise DecryptionError() from None
        # KeyDestroyed propagates: the HTTP layer answers 410 (crypto-shredded).
        try:
            # The row's chat, id, sender, revision and time: the envelope must be bound to these
            # (v2; v1 binds the ids only and opens as revision 1), so a rewritten column fails.
            context = row.context()
        except (TypeError, ValueError):
            raise DecryptionError() from None  # a column no envelope can bind: not genuine
        plaintext = open_envelope(row.envelope, key, context)
        try:
            text = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError() from None
        return ReadMessage(
            message_id=str(row.message_id),
            chat_id=row.chat_id,
            sender_id=row.sender_id,
            text=text,
            sent_at=row.created_at,
            revision=row.revision,
            edited_at=row.edited_at,
            attachments=tuple(str(a) for a in row.attachment_ids),
        )


# --- the service -----------------------------------------------------------------------------


def _check_limit(limit: int, maximum: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise ApiError(
            422, "invalid_request", f"query.limit: must be between 1 and {maximum}", "query.limit"
        )


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class ReaderService:
    def __init__(
        self,
        chats: ChatDirectory,
        messages: MessageSource,
        keys: KeySource,
        search_index: SearchPort,
        clock_ms: Callable[[], int] | None = None,
        clock_skew_ms: int = DEFAULT_CLOCK_SKEW_MS,
        *,
        analyzer: TextAnalyzer,
        query_terms: QueryTerms | None = None,
        attachments: AttachmentSource | None = None,
    ) -> None:
        """`analyzer` analyses queries and the texts about to be returned (the index's own,
        `SearchIndex.analyze`); `query_terms` turns query words into index terms per tenant
        (plain words by default; the blind index plugs in its keyed terms here); `attachments`
        the attachment files (downloads answer 503 without it)."""
        self.chats = chats
        self.attachments = attachments
        self.messages = messages
        self.keys = keys
        self._open = EnvelopeOpener(keys, messages.get).open
        self.search_index = search_index
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.clock_skew_ms = clock_skew_ms
        self.finder = MessageSearch(
            chats, messages, search_index, analyzer, query_terms or PlainQueryTerms(), self._open
        )

    # --- access ----------------------------------------------------------------------------------

    def _chat_for(self, user: str, chat_id: uuid.UUID) -> ChatRow:
        """The chat, if `user` may read it; checked before any message is touched."""
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ApiError(404, "not_found", "no such chat or message")
        if chat.state == "deleted":
            raise ApiError(410, "gone", "this chat was deleted")
        if user not in chat.participants:
            raise ApiError(403, "forbidden", "you are not a participant of this chat")
        return chat

    def _open_unless_gone(self, row: StoredMessage) -> ReadMessage | None:
        """The row opened, or None for a message deleted while the page was read."""
        try:
            return self._open(row)
        except MessageGone:
            return None

    # --- queries -------------------------------------------------------------------------------

    def message(self, user: str, chat_id: uuid.UUID, message_id: int) -> ReadMessage:
        self._chat_for(user, chat_id)
        row = self.messages.get(chat_id, message_id)
        if row is None or row.deleted_at is not None:
            raise ApiError(404, "not_found", "no such chat or message")
        try:
            read = self._open(row)
        except MessageGone:
            raise ApiError(404, "not_found", "no such chat or message") from None
        DECRYPTS_PER_REQUEST.labels("message").observe(1)
        return read

    def history(
        self,
        user: str,
        chat_id: uuid.UUID,
        before: str | None = None,
        limit: int = HISTORY_LIMIT_DEFAULT,
    ) -> Page:
        """A page of up to `limit` messages older than the cursor (or the newest), newest first."""
        _check_limit(limit, HISTORY_LIMIT_MAX)
        before_id = (
            decode_cursor(before)
            if before is not None
            else ceiling_id(self._clock_ms(), self.clock_skew_ms)
        )
        chat = self._chat_for(user, chat_id)
        # The store walks back bucket by bucket down to the chat's creation (minus clock skew).
        oldest_ms = _millis(chat.created_at) - self.clock_skew_ms
        # One row more than asked tells whether another page exists; it is not decrypted.
        rows = list(self.messages.history(chat_id, before_id, oldest_ms, limit + 1))
        more = len(rows) > limit
        messages = [read for row in rows[:limit] if (read := self._open_unless_gone(row))]
        DECRYPTS_PER_REQUEST.labels("history").observe(len(messages))
        cursor = encode_cursor(rows[limit - 1].message_id) if more else None
        return Page(messages=messages, next_cursor=cursor)

    def search(
        self,
        user: str,
        chat_id: uuid.UUID,
        q: str,
        limit: int = SEARCH_LIMIT_DEFAULT,
        options: SearchOptions | None = None,
    ) -> SearchPage:
        """Messages of one chat holding every word of `q` (reader.search); the same search as
        `search_all`, with the chat's own answers: 404 unknown, 410 deleted, 403 not a member.

        Membership is read afresh (uncached) like `search_all`'s, so both stop at once for a
        user removed from the chat. `options.chat_ids` is ignored (the path names the chat).
        """
        checked = check_options(replace(options or SearchOptions(), limit=limit, chat_ids=None))
        q = check_query(q)
        self._chat_for(user, chat_id)
        chats = self.finder.member_chats(user, [chat_id])
        if not chats:  # removed (or deleted) since the cached row was read
            raise ApiError(403, "forbidden", "you are not a participant of this chat")
        page = self.finder.run(user, q, checked, chats)
        DECRYPTS_PER_REQUEST.labels("search").observe(page.decrypted)
        return page

    def search_all(self, user: str, q: str, options: SearchOptions | None = None) -> SearchPage:
        """Messages of every chat `user` belongs to now holding every word of `q` (filters,
        sort and paging in `options`, reader.search). Chats the user is not in, deleted chats and
        unknown ids in `options.chat_ids` contribute nothing (no error: nothing to learn)."""
        checked = check_options(options or SearchOptions())
        q = check_query(q)
        page = self.finder.run(user, q, checked)
        DECRYPTS_PER_REQUEST.labels("search_all").observe(page.decrypted)
        return page

    # --- attachments ---------------------------------------------------------------------------

    def _files(self) -> AttachmentSource:
        if self.attachments is None:
            raise ApiError(503, "unavailable", "attachments are not configured on this reader")
        return self.attachments

    def attachment(self, user: str, chat_id: uuid.UUID, file_id: int) -> AttachmentRow:
        """The metadata of a live attachment of the chat, if `user` may read the chat: the chat
        checks of the message routes first (404 unknown chat, 410 deleted, 403 not a
        participant), then 404 for an unknown, deleted or other chat's attachment, and for
        one no message referenced yet unless `user` uploaded it."""
        self._chat_for(user, chat_id)
        row = self._files().get(chat_id, file_id)
        if row is None or not readable_by(row, user):
            # Not sent in a message yet: the uploader's draft, answered as unknown to others.
            raise ApiError(404, "not_found", "no such attachment in this chat")
        return row

    def attachment_bytes(
        self, row: AttachmentRow, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Plaintext bytes `start` .. `start + length - 1` of the file (to its end when
        `length` is None), decrypted as they are consumed. Header and first segment are checked
        before this returns: a 500 `integrity_error` `ApiError` (logged by ids), a 404
        `ApiError` when the object is gone though its row is live (a deletion under way),
        `KeyDestroyed` (410). A later bad segment raises `DecryptionError` from the iterator,
        logged here by ids: the caller must abort."""
        try:
            chunks = self._files().read(row, start, length)
        except (DecryptionError, KeyNotFound):
            # KeyNotFound: the chat exists (checked) but never had the row's DEK version, so
            # the row is not genuine, as for message envelopes (EnvelopeOpener).
            self._integrity_failure(row, "first_segment")
            raise _file_integrity_error() from None
        except ObjectNotFound:
            raise ApiError(404, "not_found", "no such attachment in this chat") from None
        except ObjectStoreError as exc:
            if exc.code != "InvalidRange":
                raise  # retriable: 503; anything else: 500 internal
            # The range is inside the size the row records, so the object is shorter than the
            # file it should hold: cut or replaced, an integrity failure like a bad tag.
            self._integrity_failure(row, "first_segment")
            raise _file_integrity_error() from None
        return self._watched(row, chunks)

    def _watched(self, row: AttachmentRow, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except DecryptionError:
            self._integrity_failure(row, "mid_stream")
            raise

    @staticmethod
    def _integrity_failure(row: AttachmentRow, when: str) -> None:
        ATTACHMENT_INTEGRITY_FAILURES.labels(when).inc()
        # Ids and version only: never a byte of the file.
        log.error(
            "attachment failed its integrity check",
            extra={
                "chat_id": str(row.chat_id),
                "file_id": row.file_id,
                "dek_version": row.dek_version,
                "when": when,
            },
        )
