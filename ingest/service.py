"""The gateway's logic: who may post where, what a valid message is, ids, idempotency, publishing.

Plain code over the ports in `ingest.ports`; the HTTP layer only turns requests into these calls.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Counter, Histogram

from ingest.ports import ChatDirectory, IdempotencyStore, RecordPublisher
from schemas.events import MAX_ID_LEN, MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.postgres import ChatRow
from sealstream.http import ApiError

MAX_BATCH = 500
MAX_PARTICIPANTS = 1000

MESSAGES = Counter("sealstream_ingest_messages", "Messages accepted by the gateway", ["kind"])
BATCH_SIZE = Histogram(
    "sealstream_ingest_batch_size", "Messages per request", buckets=(1, 5, 10, 50, 100, 250, 500)
)


@dataclass(frozen=True)
class NewMessage:
    text: str
    client_message_id: str | None = None


@dataclass(frozen=True)
class Accepted:
    message_id: int
    client_message_id: str | None
    duplicate: bool


def check_text(text: str, field: str) -> None:
    """Non-blank, valid UTF-8 (no lone surrogates), within the byte limit. Never echoes the text."""
    if not text.strip():
        raise ApiError(
            422, "invalid_message", f"{field}: must contain a non-blank character", field
        )
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ApiError(
            422, "invalid_message", f"{field}: is not valid UTF-8 (lone surrogate)", field
        ) from None
    if size > MAX_TEXT_BYTES:
        raise ApiError(
            422,
            "message_too_large",
            f"{field}: is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}",
            field,
        )


class CachedChats:
    """A short-lived in-process cache in front of the chat directory (participant checks)."""

    def __init__(
        self,
        directory: ChatDirectory,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.ttl = ttl
        self._clock = clock
        self._items: dict[uuid.UUID, tuple[float, ChatRow]] = {}
        self._lock = threading.Lock()

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        with self._lock:
            hit = self._items.get(chat_id)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        chat = self.directory.get(chat_id)
        if chat is not None:
            with self._lock:
                if len(self._items) > 100_000:
                    self._items.clear()
                self._items[chat_id] = (self._clock() + self.ttl, chat)
        return chat

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        return self.directory.create(chat_id, participants, tenant_id)


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

    def create_chat(
        self,
        user: str,
        participants: Sequence[str],
        tenant_id: str | None = None,
        chat_id: uuid.UUID | None = None,
    ) -> ChatRow:
        members = tuple(dict.fromkeys([user, *participants]))  # creator first, no duplicates
        for i, member in enumerate(members):
            if not 0 < len(member) <= MAX_ID_LEN or not member.strip():
                raise ApiError(
                    422,
                    "invalid_request",
                    f"participants.{i}: must be 1..{MAX_ID_LEN} characters",
                    f"participants.{i}",
                )
        if len(members) > MAX_PARTICIPANTS:
            raise ApiError(
                422,
                "invalid_request",
                f"participants: at most {MAX_PARTICIPANTS} (got {len(members)})",
                "participants",
            )
        return self.chats.create(chat_id or uuid.uuid4(), members, tenant_id)

    def authorize(self, user: str, chat_id: uuid.UUID) -> ChatRow:
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ApiError(404, "unknown_chat", f"chat {chat_id} does not exist", "chat_id")
        if chat.state != "active":
            raise ApiError(410, "gone", f"chat {chat_id} was deleted", "chat_id")
        if user not in chat.participants:
            raise ApiError(403, "not_participant", "you are not a participant of this chat")
        return chat

    def post(self, user: str, chat_id: uuid.UUID, items: Sequence[NewMessage]) -> list[Accepted]:
        """Validate, assign ids, publish; return once Kafka acknowledged every new record."""
        if not 1 <= len(items) <= MAX_BATCH:
            raise ApiError(
                422,
                "invalid_request",
                f"messages: 1..{MAX_BATCH} per request (got {len(items)})",
                "messages",
            )
        prefix = "text" if len(items) == 1 else "messages.{i}.text"
        for i, item in enumerate(items):
            check_text(item.text, prefix.format(i=i))
        chat = self.authorize(user, chat_id)

        accepted: list[Accepted] = []
        fresh: list[MessageRecord] = []
        claimed: list[str] = []
        for item in items:
            message_id = self.ids.next_id()
            if item.client_message_id is not None:
                earlier = self.idempotency.claim(chat_id, user, item.client_message_id, message_id)
                if earlier is not None:
                    accepted.append(Accepted(earlier, item.client_message_id, duplicate=True))
                    continue
                claimed.append(item.client_message_id)
            fresh.append(
                MessageRecord(
                    message_id=message_id,
                    chat_id=chat_id,
                    tenant_id=chat.tenant_id,
                    sender_id=user,
                    text=item.text,
                    client_message_id=item.client_message_id,
                    sent_at=self._now(),
                )
            )
            accepted.append(Accepted(message_id, item.client_message_id, duplicate=False))
        try:
            if fresh:
                self.publisher.publish(self.topic, [(r.key(), r.value()) for r in fresh])
        except Exception:
            # Not acknowledged: forget the claims so the client's retry publishes again.
            for client_id in claimed:
                self.idempotency.release(chat_id, user, client_id)
            raise
        MESSAGES.labels("new").inc(len(fresh))
        MESSAGES.labels("duplicate").inc(len(accepted) - len(fresh))
        BATCH_SIZE.observe(len(items))
        return accepted
