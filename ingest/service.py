"""The gateway's logic: who may post where, what a valid message is, ids, idempotency, publishing.

Plain code over the ports in `ingest.ports`; the HTTP layer only turns requests into these calls.
Errors meant for the client are `ApiError`s naming the field and the rule, never echoing input.
`post` returns only once Kafka acknowledged every new record (acks=all), so an accepted message is
durable; if Kafka does not acknowledge, the client ids claimed by the request are released and the
retriable `StoreUnavailable` (-> 503) propagates. Message text is never logged nor put in errors.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Counter, Histogram

from ingest.ports import ChatDirectory, ClaimInFlight, IdempotencyStore, RecordPublisher
from schemas.events import MAX_ID_LEN, MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.postgres import ChatRow
from sealstream.errors import KeyNotFound
from sealstream.http import ApiError
from sealstream.keys.cache import TtlCache

log = logging.getLogger(__name__)

MAX_BATCH = 500
MAX_PARTICIPANTS = 1000
# How long a gateway may act on a stale chat row (participants, deleted state).
CHAT_CACHE_SECONDS = 2.0

MESSAGES = Counter(
    "sealstream_ingest_messages",
    "Messages accepted by the gateway (new: published; duplicate: retried client_message_id)",
    ["kind"],
)
BATCH_SIZE = Histogram(
    "sealstream_ingest_batch_size",
    "Messages per accepted post request",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
_NEW = MESSAGES.labels("new")
_DUPLICATE = MESSAGES.labels("duplicate")


@dataclass(frozen=True)
class NewMessage:
    text: str
    client_message_id: str | None = None


@dataclass(frozen=True)
class Accepted:
    message_id: int
    client_message_id: str | None
    duplicate: bool


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


class IngestService:
    def __init__(
        self,
        chats: ChatDirectory,
        publisher: RecordPublisher,
        ids: SnowflakeIds,
        idempotency: IdempotencyStore,
        topic: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.chats = chats
        self.publisher = publisher
        self.ids = ids
        self.idempotency = idempotency
        self.topic = topic
        self._now = clock

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
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ApiError(404, "unknown_chat", f"chat {chat_id} does not exist", "chat_id")
        if chat.state != "active":
            raise ApiError(410, "gone", "this chat was deleted", "chat_id")
        if user not in chat.participants:
            raise ApiError(403, "not_participant", "you are not a participant of this chat")
        return chat

    # --- messages ----------------------------------------------------------------------------

    def post(
        self,
        user: str,
        chat_id: uuid.UUID,
        items: Sequence[NewMessage],
        *,
        batch: bool | None = None,
    ) -> list[Accepted]:
        """Validate, assign ids, publish; return once Kafka acknowledged every new record.

        `batch` only changes how fields are named in errors (`messages.3.text` rather than
        `text`); by default a request of one message is not a batch.
        """
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
        chat = self.authorize(user, chat_id)

        sent_at = self._now()
        accepted: list[Accepted] = []
        fresh: list[MessageRecord] = []
        claimed: list[tuple[str, int]] = []
        seen: dict[str, int] = {}  # the same client id twice in one request: one message
        try:
            for item, prefix in zip(items, fields, strict=True):
                client_id = item.client_message_id
                if client_id is not None and client_id in seen:
                    accepted.append(Accepted(seen[client_id], client_id, duplicate=True))
                    continue
                message_id = self.ids.next_id()
                if client_id is not None:
                    earlier = self._claim(chat_id, user, client_id, message_id, prefix)
                    seen[client_id] = earlier or message_id
                    if earlier is not None:
                        accepted.append(Accepted(earlier, client_id, duplicate=True))
                        continue
                    claimed.append((client_id, message_id))
                fresh.append(
                    MessageRecord(
                        message_id=message_id,
                        chat_id=chat_id,
                        tenant_id=chat.tenant_id,
                        sender_id=user,
                        text=item.text,
                        client_message_id=client_id,
                        sent_at=sent_at,
                    )
                )
                accepted.append(Accepted(message_id, client_id, duplicate=False))
            if fresh:
                self.publisher.publish(self.topic, [(r.key(), r.value()) for r in fresh])
        except BaseException:
            # Not acknowledged: forget our claims so that the client's retry publishes again.
            self._release(chat_id, user, claimed)
            raise
        self._confirm(chat_id, user, claimed)
        _NEW.inc(len(fresh))
        _DUPLICATE.inc(len(accepted) - len(fresh))
        BATCH_SIZE.observe(len(items))
        return accepted

    def _claim(
        self, chat_id: uuid.UUID, user: str, client_id: str, message_id: int, prefix: str
    ) -> int | None:
        try:
            return self.idempotency.claim(chat_id, user, client_id, message_id)
        except ClaimInFlight:
            field = f"{prefix}client_message_id"
            raise ApiError(
                409,
                "in_flight",
                f"{field}: an earlier request with this id is still being published; retry shortly",
                field,
            ) from None

    def _confirm(self, chat_id: uuid.UUID, user: str, claimed: list[tuple[str, int]]) -> None:
        for client_id, message_id in claimed:
            try:
                self.idempotency.confirm(chat_id, user, client_id, message_id)
            except Exception as exc:  # noqa: BLE001 - published already: the answer is still 202
                # The pending claim expires on its own; a retry after that publishes again.
                log.warning(
                    "idempotency claim not confirmed",
                    extra={"chat_id": str(chat_id), "error": type(exc).__name__},
                )

    def _release(self, chat_id: uuid.UUID, user: str, claimed: list[tuple[str, int]]) -> None:
        for client_id, message_id in claimed:
            try:
                self.idempotency.release(chat_id, user, client_id, message_id)
            except Exception as exc:  # noqa: BLE001 - never hide the error being handled
                log.warning(
                    "idempotency claim not released (it expires on its own)",
                    extra={"chat_id": str(chat_id), "error": type(exc).__name__},
                )
