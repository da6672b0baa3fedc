"""The gateway's logic: who may post where, what a valid message is, ids, idempotency, publishing,
and the checks of a sender's edit or deletion before it is published.

Plain code over the ports in `ingest.ports`; the HTTP layer only turns requests into these calls.
Errors meant for the client are `ApiError`s naming the field and the rule, never echoing input.
`post` returns only once Kafka acknowledged every record it published (acks=all), so an accepted
message is durable. Client message ids are claimed durably *before* publishing and never
released: if Kafka does not acknowledge in time the outcome is unknown, the retriable
`StoreUnavailable` (-> 503) propagates, and the client's retry re-publishes the same record under
the same message id (the sinks store by id), so one client message id is at most one message.
Message text is never logged nor put in errors.

An edit or a sender's deletion (`change`) is checked against the chat (Postgres) and the message's
stored row (Cassandra, read-only), then published as one `MessageRecord` of kind edit/delete with a
new event id; the encryptor checks it again against the row when it applies it (the row may have
changed in between), so these checks are for a clear answer to the client, not the last word.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

import anyio
from anyio import to_thread
from prometheus_client import Counter, Histogram

from ingest.ports import (
    AttachmentStore,
    ChatDirectory,
    Claim,
    ClaimConflict,
    ClaimStore,
    Granted,
    MessageLookup,
    RecordPublisher,
)
from ingest.uploads import media_type, store_streamed, too_large
from schemas.events import MAX_ID_LEN, MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds, id_millis, id_time
from sealstream.adapters.cassandra import AttachmentRow, StoredMessage
from sealstream.adapters.postgres import ChatRow
from sealstream.attachments import AttachmentTooLarge
from sealstream.crypto import TextFingerprints
from sealstream.errors import KeyNotFound, MembershipRefused, StoreUnavailable
from sealstream.http import ApiError
from sealstream.keys.cache import TtlCache
from sealstream.settings import AttachmentSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_BATCH = 500
MAX_PARTICIPANTS = 1000
# How long a gateway may act on a stale chat row (participants, deleted state).
CHAT_CACHE_SECONDS = 2.0

MESSAGES = Counter(
    "sealstream_ingest_messages",
    "Messages accepted by the gateway (new: published; republished: a retry published again "
    "under its first id after an unknown outcome; duplicate: already acknowledged, not published)",
    ["kind"],
)
BATCH_SIZE = Histogram(
    "sealstream_ingest_batch_size",
    "Messages per accepted post request",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
CHANGES = Counter(
    "sealstream_ingest_changes",
    "Edits and sender deletions the gateway published (kind: edit, delete)",
    ["kind"],
)
UPLOADS = Counter("sealstream_ingest_attachments", "Attachment files stored by the gateway")
UPLOAD_BYTES = Counter(
    "sealstream_ingest_attachment_bytes", "Plaintext bytes of the attachment files stored"
)
_NEW = MESSAGES.labels("new")
_DUPLICATE = MESSAGES.labels("duplicate")
_REPUBLISHED = MESSAGES.labels("republished")


@dataclass(frozen=True)
class NewMessage:
    text: str
    client_message_id: str | None = None
    # Attachment ids the message references (checked by `post`: live, this chat's, the
    # sender's own, distinct, at most `AttachmentSettings.max_per_message`).
    attachments: tuple[int, ...] = ()


@dataclass(frozen=True)
class Accepted:
    message_id: int
    client_message_id: str | None
    # True: an earlier request's message, already acknowledged by Kafka; nothing was published.
    duplicate: bool


ChangeKind = Literal["edit", "delete"]
# Cassandra lookups get threads of their own: a hung Cassandra then holds at most this many
# threads (each until the driver's request timeout), never the ones posts need for Postgres.
CASSANDRA_THREADS = 16
# Uploads too (each holds its thread for the whole transfer): more at once wait for a thread
# while TCP flow control holds their clients.
UPLOAD_THREADS = 16


@dataclass(frozen=True)
class Change:
    """An edit or a sender's deletion Kafka acknowledged: the message and the change's own id
    (a Snowflake id greater than the message id; later changes have higher ids)."""

    kind: ChangeKind
    message_id: int
    event_id: int


@dataclass
class _Plan:
    """What one post request publishes and answers, once its client ids are claimed."""

    accepted: list[Accepted] = field(default_factory=list)
    records: list[MessageRecord] = field(default_factory=list)
    claimed: list[Granted] = field(default_factory=list)  # acknowledged once published
    republished: int = 0


def _utf8_size(value: str) -> int | None:
    """Bytes of UTF-8, or None when the string cannot be UTF-8 (a lone surrogate)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def check_text(text: str, field: str) -> None:
    """Non-blank, valid UTF-8 (no lone surrogates), within the byte limit. Never echoes the text."""
    if not text.strip():
        raise ApiError(
            422, "invalid_message", f"{field}: must contain a non-blank character", field
        )
    size = _utf8_size(text)
    if size is None:
        raise ApiError(
            422, "invalid_message", f"{field}: is not valid UTF-8 (lone surrogate)", field
        )
    if size > MAX_TEXT_BYTES:
        raise ApiError(
            422,
            "message_too_large",
            f"{field}: is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}",
            field,
        )


def check_id(value: str, field: str) -> None:
    """An id (participant, tenant, client message id): 1..128 characters of printable UTF-8."""
    if not 0 < len(value) <= MAX_ID_LEN or not value.strip():
        raise ApiError(
            422, "invalid_request", f"{field}: must be 1..{MAX_ID_LEN} characters", field
        )
    if _utf8_size(value) is None or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ApiError(
            422,
            "invalid_request",
            f"{field}: must be valid UTF-8 without control characters",
            field,
        )


class CachedChats:
    """A `ChatDirectory` with a short in-process TTL cache in front (the participant check of
    every post). Unknown chats are not cached, so a new chat accepts posts at once."""

    def __init__(
        self,
        directory: ChatDirectory,
        ttl_seconds: float = CHAT_CACHE_SECONDS,
        max_entries: int = 100_000,
    ) -> None:
        self.directory = directory
        self._cache: TtlCache[uuid.UUID, ChatRow] = TtlCache(max_entries, ttl_seconds)

    def forget(self, chat_id: uuid.UUID) -> None:
        """Drop a chat at once (its deletion was announced by another process)."""
        self._cache.pop(chat_id)

    def cached(self, chat_id: uuid.UUID) -> ChatRow | None:
        """The chat's row if the cache holds it (never asks Postgres: safe on an event loop)."""
        return self._cache.get(chat_id)

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        cached = self._cache.get(chat_id)
        if cached is not None:
            return cached
        chat = self.directory.get(chat_id)
        if chat is not None:
            self._cache.put(chat_id, chat)
        return chat

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        chat = self.directory.create(chat_id, participants, tenant_id)
        self._cache.put(chat_id, chat)
        return chat

    def leave(self, chat_id: uuid.UUID, user_id: str) -> ChatRow | None:
        chat = self.directory.leave(chat_id, user_id)
        self._cache.pop(chat_id)  # this gateway refuses the leaver's next post at once
        return chat


class IngestService:
    def __init__(
        self,
        chats: ChatDirectory,
        publisher: RecordPublisher,
        ids: SnowflakeIds,
        claims: ClaimStore,
        fingerprints: TextFingerprints,
        topic: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        postgres_budget: float | None = None,
        messages: MessageLookup | None = None,
        edit_window: timedelta = timedelta(hours=48),
        cassandra_budget: float | None = None,
        attachments: AttachmentStore | None = None,
        attachment_settings: AttachmentSettings | None = None,
    ) -> None:
        """`postgres_budget`: seconds a post may spend on its Postgres work, waiting for a
        worker thread included (None: no bound); past it the post is a retriable 503.
        `messages`: the stored rows edits and deletions are checked against (None: the
        gateway refuses them with a 503); `edit_window`: how long after its id's time a
        message may be changed by its sender (`Settings.edits.window_seconds`);
        `cassandra_budget`: seconds for that row's read, as `postgres_budget`.
        `attachments`: where uploads go and references are checked (None: uploads and posts
        referencing attachments answer 503); `attachment_settings`: their limits."""
        self.chats = chats
        self.messages = messages
        self.edit_window = edit_window
        self.cassandra_budget = cassandra_budget
        self._cassandra_threads = anyio.CapacityLimiter(CASSANDRA_THREADS)
        self.attachments = attachments
        self.attachment_settings = attachment_settings or AttachmentSettings()
        self._upload_threads = anyio.CapacityLimiter(UPLOAD_THREADS)
        # Uploads under way per user (touched on the event loop only: no lock needed).
        self._uploads_of: dict[str, int] = {}
        self.publisher = publisher
        self.ids = ids
        self.claims = claims
        self.fingerprints = fingerprints
        self.topic = topic
        self._now = clock
        self.postgres_budget = postgres_budget

    # --- chats -----------------------------------------------------------------------------------

    def create_chat(
        self,
        user: str,
        participants: Sequence[str],
        tenant_id: str | None = None,
        chat_id: uuid.UUID | None = None,
    ) -> ChatRow:
        """Create a chat whose participants are the caller plus `participants` (deduplicated).

        Repeating a creation with the same chat id and participants returns the chat (a safe
        retry); a chat id already taken otherwise is a 409 that reveals nothing about that chat.
        """
        for i, member in enumerate(participants):
            check_id(member, f"participants.{i}")
        if tenant_id is not None:
            check_id(tenant_id, "tenant_id")
        members = tuple(dict.fromkeys([user, *participants]))  # creator first, no duplicates
        if len(members) > MAX_PARTICIPANTS:
            raise ApiError(
                422,
                "invalid_request",
                f"participants: at most {MAX_PARTICIPANTS} including the creator "
                f"(got {len(members)})",
                "participants",
            )
        try:
            chat = self.chats.create(chat_id or uuid.uuid4(), members, tenant_id)
        except KeyNotFound:
            raise ApiError(
                422, "unknown_tenant", "tenant_id: no such tenant", "tenant_id"
            ) from None
        taken = ApiError(
            409, "chat_exists", "chat_id: a chat with this id already exists", "chat_id"
        )
        if user not in chat.participants:
            raise taken
        if chat.state != "active":
            raise ApiError(410, "gone", "this chat was deleted", "chat_id")
        if set(chat.participants) != set(members) or tenant_id not in (None, chat.tenant_id):
            raise taken
        return chat

    def authorize(self, user: str, chat_id: uuid.UUID) -> ChatRow:
        return self._authorized(user, chat_id, self.chats.get(chat_id))

    def _authorized(self, user: str, chat_id: uuid.UUID, chat: ChatRow | None) -> ChatRow:
        if chat is None:
            raise ApiError(404, "unknown_chat", f"chat {chat_id} does not exist", "chat_id")
        if chat.state != "active":
            raise ApiError(410, "gone", "this chat was deleted", "chat_id")
        if user not in chat.participants:
            raise ApiError(403, "not_participant", "you are not a participant of this chat")
        return chat

    def leave(self, user: str, chat_id: uuid.UUID) -> ChatRow:
        """Remove the caller from the chat: 404 unknown, 410 deleted, 403 not a participant.
        Other gateways' and readers' chat caches see it within their TTL (2 s); live delivery
        at once."""
        chat = self._authorized(user, chat_id, self.chats.get(chat_id))
        try:
            left = self.chats.leave(chat_id, user)
        except MembershipRefused as exc:
            raise ApiError(409, "last_participant", str(exc), "path.chat_id") from None
        return left if left is not None else chat

    # --- attachments -------------------------------------------------------------------------

    async def upload(
        self,
        user: str,
        chat_id: uuid.UUID,
        content_type: str | None,
        declared_size: int | None,
        body: AsyncIterator[bytes],
    ) -> AttachmentRow:
        """Store the file `body` streams as a new attachment of the chat, sent by `user`;
        returns its row (`file_id` from this gateway's leased ids, `created_at` its time).

        `ApiError`s: 404 `unknown_chat`, 410 `gone`, 403 `not_participant` (as for posts);
        415 `unsupported_content_type` (`content_type`, the header's value, missing or not in
        `AttachmentSettings.content_types`; the media type is stored lower case, without
        parameters); 413 `attachment_too_large` when `declared_size` (Content-Length) is over
        `max_bytes` (the body is then not read) or the body passes it. `StoreUnavailable` or
        another retriable error (-> 503) when Postgres, Cassandra, the object store or the KMS
        is down; `UploadAborted` when the body ends early. Whatever fails, nothing of the file
        remains (no row, no object, no open multipart upload). 429 `too_many_uploads` when
        `user` already has `AttachmentSettings.uploads_per_user` uploads under way here (the
        body is then not read)."""
        chat = self._cached_chat(chat_id, ())
        if chat is None:
            await self._in_thread(self.authorize, user, chat_id)
        else:
            self._authorized(user, chat_id, chat)
        media = media_type(content_type, self.attachment_settings.content_types)
        limit = self.attachment_settings.max_bytes
        if declared_size is not None and declared_size > limit:
            raise too_large(limit)
        files = self.attachments
        if files is None:
            raise StoreUnavailable("this gateway has no attachment store")
        under_way = self._uploads_of.get(user, 0)
        most = self.attachment_settings.uploads_per_user
        if under_way >= most:
            raise ApiError(
                429,
                "too_many_uploads",
                f"at most {most} uploads of one user at once "
                "(AttachmentSettings.uploads_per_user); retry when one has finished",
            )
        self._uploads_of[user] = under_way + 1
        file_id = self.ids.next_id()
        try:
            row = await store_streamed(
                lambda chunks: files.store(chat_id, file_id, user, media, chunks, limit),
                body,
                self._upload_threads,
            )
        except AttachmentTooLarge:
            raise too_large(limit) from None
        finally:
            left = self._uploads_of.pop(user) - 1
            if left:
                self._uploads_of[user] = left
        UPLOADS.inc()
        UPLOAD_BYTES.inc(row.size)
        return row

    # --- messages ----------------------------------------------------------------------------

    async def post(
        self,
        user: str,
        chat_id: uuid.UUID,
        items: Sequence[NewMessage],
        *,
        batch: bool | None = None,
    ) -> list[Accepted]:
        """Validate, claim client ids, publish; return once Kafka acknowledged every record.

        Postgres work (participant check, claims) runs in a worker thread (none is needed when
        the chat row is cached and no item has a client id); waiting for Kafka
        does not hold one, so a Kafka outage cannot starve requests that do not need Kafka.
        `batch` only changes how fields are named in errors (`messages.3.text` rather than
        `text`); by default a request of one message is not a batch.
        """
        fields = self._check(items, batch)
        cached = self._cached_chat(chat_id, items)
        if any(item.attachments for item in items):
            # The caller's right to the chat first (404/410/403 before 422), then every
            # reference, before a client id is claimed: a refused post claims nothing.
            if cached is None:
                await self._in_thread(self.authorize, user, chat_id)
            else:
                self._authorized(user, chat_id, cached)
            await self._check_references(user, chat_id, items, fields)
        if cached is not None:  # no Postgres work at all: no hop to a worker thread and back
            plan = self._plan(user, chat_id, items, fields, cached)
        else:
            plan = await self._in_thread(self._plan, user, chat_id, items, fields)
        if plan.records:
            await self.publisher.publish(self.topic, plan.records)
        if plan.claimed:
            try:
                await self._in_thread(self._acknowledge, chat_id, user, plan.claimed)
            except StoreUnavailable:  # published already: the answer is still 202
                log.warning("idempotency claims not marked acknowledged in time")
        # Only what moved: each `inc` takes the metric's lock.
        if len(plan.records) > plan.republished:
            _NEW.inc(len(plan.records) - plan.republished)
        if plan.republished:
            _REPUBLISHED.inc(plan.republished)
        if len(plan.accepted) > len(plan.records):
            _DUPLICATE.inc(len(plan.accepted) - len(plan.records))
        BATCH_SIZE.observe(len(items))
        return plan.accepted

    async def change(
        self, user: str, chat_id: uuid.UUID, message_id: int, text: str | None = None
    ) -> Change:
        """Publish an edit (`text` given) or a deletion (`text` None) of `user`'s own message;
        return once Kafka acknowledged it (acks=all).

        `ApiError`s: 422 invalid text (as for posts: `text`); 404 `unknown_chat`, 410 `gone`,
        403 `not_participant` (as for posts); 404 `message_not_found` (no row: never posted, or
        not stored by the encryptor yet), 403 `not_sender`, 410 `message_deleted`, 422
        `edit_window_passed` (older than `edit_window` by its id's time). `StoreUnavailable`
        (-> 503) when Postgres, Cassandra or Kafka does not answer within its deadline. A retry
        after a 503 may publish the change twice: an edit then makes one more revision of the
        same text, a deletion is applied once.
        """
        kind: ChangeKind = "delete" if text is None else "edit"
        if text is not None:
            check_text(text, "text")
        chat = self._cached_chat(chat_id, ())
        if chat is None:
            chat = await self._in_thread(self.authorize, user, chat_id)
        else:
            chat = self._authorized(user, chat_id, chat)
        row = await self._stored(chat_id, message_id)
        self._check_change(user, message_id, row)
        event_id = self.ids.next_id()
        if event_id <= message_id:
            # The message's id came from a process whose clock is ahead of ours (ids are
            # time-ordered); a change must sort after its message, so this one is not made.
            log.warning(
                "clock behind a message id",
                extra={"ahead_ms": id_millis(message_id) - id_millis(event_id)},
            )
            raise StoreUnavailable("this gateway's clock is behind the message's id")
        record = MessageRecord(
            kind=kind,
            message_id=message_id,
            event_id=event_id,
            chat_id=chat_id,
            tenant_id=chat.tenant_id,
            sender_id=user,
            text=text,
            sent_at=self._now(),
        )
        await self.publisher.publish(self.topic, [record])
        CHANGES.labels(kind).inc()
        return Change(kind, message_id, event_id)

    async def _stored(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        """The message's row, read in a thread of the Cassandra lookups' own, within the
        Cassandra budget (the wait for a thread included)."""
        if self.messages is None:
            raise StoreUnavailable("this gateway has no message store for edits and deletions")
        return await self._in_cassandra(self.messages.get, chat_id, message_id)

    async def _in_cassandra(self, work: Callable[..., _T], *args: object) -> _T:
        """`work(*args)` (blocking Cassandra reads) in a thread of the Cassandra lookups' own,
        within the Cassandra budget (the wait for a thread included)."""
        limiter = self._cassandra_threads
        if self.cassandra_budget is None:
            return await to_thread.run_sync(work, *args, limiter=limiter)
        try:
            with anyio.fail_after(self.cassandra_budget):
                return await to_thread.run_sync(
                    work, *args, abandon_on_cancel=True, limiter=limiter
                )
        except TimeoutError:
            raise StoreUnavailable(
                f"Cassandra read not done within {self.cassandra_budget:.1f}s"
            ) from None

    async def _check_references(
        self, user: str, chat_id: uuid.UUID, items: Sequence[NewMessage], fields: list[str]
    ) -> None:
        """Every attachment id of every item is a live attachment of this chat uploaded by
        `user`; else 422 `unknown_attachment` naming the first that is not (`attachments[i]`).
        One answer for unknown, deleted, another chat's and another sender's: a reference
        reveals nothing about files the caller did not upload. Once all pass, the files not
        shared yet are marked shared (`AttachmentFiles.share`): readable by the chat."""
        files = self.attachments
        if files is None:
            raise StoreUnavailable("this gateway has no attachment store")
        wanted = [
            (f"{prefix}attachments[{i}]", file_id)
            for item, prefix in zip(items, fields, strict=True)
            for i, file_id in enumerate(item.attachments)
        ]

        def first_unknown() -> tuple[str, int] | None:
            unshared = []
            for field, file_id in wanted:
                row = files.get(chat_id, file_id)
                if row is None or row.sender_id != user:
                    return field, file_id
                if row.shared_at is None:
                    unshared.append(file_id)
            # Sent: the chat may read them from now on (before the record is published, so
            # a participant who sees the message can fetch its files). A post that then fails
            # leaves them readable, as the sender meant them to be.
            files.share(chat_id, unshared)
            return None

        unknown = await self._in_cassandra(first_unknown)
        if unknown is not None:
            field, file_id = unknown
            raise ApiError(
                422,
                "unknown_attachment",
                f"{field}: {file_id} is not an attachment you uploaded to this chat",
                field,
            )

    def _check_change(self, user: str, message_id: int, row: StoredMessage | None) -> None:
        """The stored row allows `user` to change the message now; `ApiError` otherwise."""
        if row is None:
            raise ApiError(
                404,
                "message_not_found",
                f"message {message_id} is not stored in this chat: it does not exist, or it "
                "was posted moments ago and is not stored yet (retry shortly)",
                "message_id",
            )
        if row.sender_id != user:
            raise ApiError(
                403, "not_sender", "only the sender may edit or delete a message", "message_id"
            )
        if row.deleted_at is not None:
            raise ApiError(410, "message_deleted", "this message was deleted", "message_id")
        age = self._now() - id_time(message_id)
        if age > self.edit_window:
            raise ApiError(
                422,
                "edit_window_passed",
                f"message_id: a message may be edited or deleted by its sender for "
                f"{int(self.edit_window.total_seconds())} s after it was sent; this one was "
                f"sent {math.ceil(age.total_seconds())} s ago",
                "message_id",
            )

    async def _in_thread(self, work: Callable[..., _T], *args: object) -> _T:
        """`work(*args)` (blocking Postgres work) in a worker thread, within the budget.

        The budget covers the wait for a free thread: when Postgres hangs, every thread is
        held for its deadline and a burst of posts would otherwise queue behind them for many
        deadlines. Past the budget the thread is abandoned (it ends at its own deadline) and
        the post is a 503 with an unknown outcome: a claim it still writes makes the retry
        re-publish under the same message id."""
        if self.postgres_budget is None:
            return await to_thread.run_sync(work, *args)
        try:
            with anyio.fail_after(self.postgres_budget):
                return await to_thread.run_sync(work, *args, abandon_on_cancel=True)
        except TimeoutError:
            raise StoreUnavailable(
                f"Postgres work not done within {self.postgres_budget:.1f}s (outcome unknown)"
            ) from None

    def _cached_chat(self, chat_id: uuid.UUID, items: Sequence[NewMessage]) -> ChatRow | None:
        """The chat's row when a post needs nothing of Postgres: no client id to claim and
        the chat row in the in-process cache. None: the plan runs in a worker thread."""
        if not isinstance(self.chats, CachedChats):
            return None
        if any(item.client_message_id is not None for item in items):
            return None
        return self.chats.cached(chat_id)

    def _check(self, items: Sequence[NewMessage], batch: bool | None) -> list[str]:
        """The field prefix of each item (`messages.3.` in a batch) once all are valid."""
        if not 1 <= len(items) <= MAX_BATCH:
            raise ApiError(
                422,
                "invalid_request",
                f"messages: 1..{MAX_BATCH} per request (got {len(items)})",
                "messages",
            )
        in_batch = len(items) != 1 if batch is None else batch
        fields = [f"messages.{i}." if in_batch else "" for i in range(len(items))]
        for item, prefix in zip(items, fields, strict=True):
            check_text(item.text, f"{prefix}text")
            if item.client_message_id is not None:
                check_id(item.client_message_id, f"{prefix}client_message_id")
            if item.attachments:
                self._check_attachment_list(item.attachments, f"{prefix}attachments")
        return fields

    def _check_attachment_list(self, attachments: Sequence[int], field: str) -> None:
        """At most `max_per_message` ids, distinct, each a 64-bit id."""
        most = self.attachment_settings.max_per_message
        if len(attachments) > most:
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: at most {most} attachments per message (got {len(attachments)})",
                field,
            )
        seen: set[int] = set()
        for i, file_id in enumerate(attachments):
            if not 1 <= file_id < 2**63:
                raise ApiError(
                    422, "invalid_request", f"{field}[{i}]: must be a 64-bit id", f"{field}[{i}]"
                )
            if file_id in seen:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"{field}[{i}]: repeats an earlier attachment id (ids must be distinct)",
                    f"{field}[{i}]",
                )
            seen.add(file_id)

    def _plan(
        self,
        user: str,
        chat_id: uuid.UUID,
        items: Sequence[NewMessage],
        fields: list[str],
        cached: ChatRow | None = None,
    ) -> _Plan:
        """Check the caller, assign ids and claim the client ids (blocking: Postgres, unless
        the chat row is given as `cached` and there is no client id).

        A client id claimed earlier with the same text stands for that earlier message: it is
        published again under its first id unless Kafka is known to have acknowledged it."""
        chat = (
            self.authorize(user, chat_id)
            if cached is None
            else self._authorized(user, chat_id, cached)
        )
        sent_at = self._now()
        message_ids = [self.ids.next_id() for _ in items]
        first: dict[str, int] = {}  # client id -> its first item (the same id twice: one message)
        for index, item in enumerate(items):
            client_id = item.client_message_id
            if client_id is None:
                continue
            if client_id not in first:
                first[client_id] = index
            elif (items[first[client_id]].text, items[first[client_id]].attachments) != (
                item.text,
                item.attachments,
            ):
                raise _conflict(fields[index])
        granted = self._claim(
            chat_id,
            user,
            [
                Claim(
                    client_id,
                    message_ids[i],
                    # Bound to the claim: equal texts of other claims must not show.
                    self.fingerprints.of(items[i].text, _claim_context(chat_id, user, items[i])),
                    sent_at,
                )
                for client_id, i in first.items()
            ],
            [fields[i] for i in first.values()],
        )

        plan = _Plan()
        for index, item in enumerate(items):
            client_id = item.client_message_id
            grant = granted.get(client_id) if client_id is not None else None
            if grant is not None and (grant.acknowledged or index != first[grant.client_id]):
                plan.accepted.append(Accepted(grant.message_id, client_id, duplicate=True))
                continue
            message_id, at = (
                (grant.message_id, grant.sent_at) if grant else (message_ids[index], sent_at)
            )
            if grant is not None:
                plan.claimed.append(grant)
                plan.republished += grant.earlier
            plan.records.append(
                MessageRecord(
                    message_id=message_id,
                    chat_id=chat_id,
                    tenant_id=chat.tenant_id,
                    sender_id=user,
                    text=item.text,
                    client_message_id=client_id,
                    sent_at=at,
                    attachment_ids=item.attachments,
                )
            )
            plan.accepted.append(Accepted(message_id, client_id, duplicate=False))
        return plan

    def _claim(
        self, chat_id: uuid.UUID, user: str, wanted: list[Claim], fields: list[str]
    ) -> dict[str, Granted]:
        if not wanted:
            return {}
        try:
            granted = self.claims.claim(chat_id, user, wanted)
        except ClaimConflict as conflict:
            raise _conflict(fields[conflict.index]) from None
        return {g.client_id: g for g in granted}

    def _acknowledge(self, chat_id: uuid.UUID, user: str, claimed: list[Granted]) -> None:
        try:
            self.claims.acknowledge(chat_id, user, claimed)
        except Exception as exc:  # noqa: BLE001 - published already: the answer is still 202
            # Harmless: a retry then publishes the same record again under the same id.
            log.warning(
                "idempotency claims not marked acknowledged",
                extra={"chat_id": str(chat_id), "error": type(exc).__name__},
            )


def _claim_context(chat_id: uuid.UUID, user: str, item: NewMessage) -> str:
    """What a claim's fingerprint binds besides the text: chat, sender, client id and, when
    the message references any, its attachment ids in order (so the same client id with other
    attachments is a conflict). A message without attachments has the context it had before
    attachments existed, so claims made then still match their retries; a client id holds no
    NUL (`check_id`), so the two forms cannot collide."""
    context = f"{chat_id}\0{user}\0{item.client_message_id}"
    if item.attachments:
        context += "\0attachments=" + ",".join(str(a) for a in item.attachments)
    return context


def _conflict(prefix: str) -> ApiError:
    field = f"{prefix}client_message_id"
    return ApiError(
        409,
        "idempotency_conflict",
        f"{field}: already used for a message with another text or other attachments; use a "
        "new id for a new message",
        field,
    )
