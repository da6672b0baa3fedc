"""What the gateway needs from the outside world, as small protocols (fakes in unit tests)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from schemas.events import MessageRecord
from sealstream.adapters.cassandra import AttachmentRow, StoredMessage
from sealstream.adapters.postgres import ChatRow


class ChatDirectory(Protocol):
    """Chat metadata in Postgres (`sealstream.keys.service.KeyService` behind an adapter)."""

    def get(self, chat_id: uuid.UUID) -> ChatRow | None: ...

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        """Create the chat (with its first DEK) or return the existing chat of that id as is.

        Raises `sealstream.errors.KeyNotFound` for an unknown tenant.
        """
        ...

    def leave(self, chat_id: uuid.UUID, user_id: str) -> ChatRow | None:
        """Remove `user_id` from the chat's participants (audited, announced to live delivery);
        the chat after it, None for an unknown chat."""
        ...


class MessageLookup(Protocol):
    """Read-only view of the message store (Cassandra): the gateway checks an edit or a
    sender's deletion against the stored row, and never writes one (the encryptor does)."""

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        """The message's row, deletion marker included (`deleted_at` set); None when no row
        exists (never posted, not written by the encryptor yet, or removed with its chat or by
        retention). Blocking; raises `StoreUnavailable` when the store does not answer."""
        ...


class AttachmentStore(Protocol):
    """Attachment files (`sealstream.attachments.AttachmentFiles`): blocking calls, run in a
    worker thread."""

    def store(
        self,
        chat_id: uuid.UUID,
        file_id: int,
        sender_id: str,
        content_type: str,
        chunks: Iterable[bytes],
        max_bytes: int,
    ) -> AttachmentRow:
        """Encrypt and store the concatenation of `chunks`, then write its row; nothing is
        left on any failure. Raises `AttachmentTooLarge` past `max_bytes`, a retriable
        `SealstreamError` when the object store, Cassandra or the key service is down, and
        whatever `chunks` raises."""
        ...

    def get(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        """A live attachment of the chat; None if unknown or deleted. Raises
        `StoreUnavailable` when Cassandra does not answer."""
        ...

    def share(self, chat_id: uuid.UUID, file_ids: Iterable[int]) -> None:
        """Record that a message references these attachments (then every participant may
        read them). Raises `StoreUnavailable`."""
        ...


class RecordPublisher(Protocol):
    async def publish(self, topic: str, records: Sequence[MessageRecord]) -> None:
        """Publish the records (sealed, unless sealing is off: docs/format.md "Sealed Kafka
        records"); return once the broker acknowledged every one of them.

        Raises `StoreUnavailable` (retriable) when they were not acknowledged within the
        publish deadline (an *unknown* outcome, since the broker may still get them later), or
        when the topic key could not be had (Postgres or the KMS did not answer)."""


@dataclass(frozen=True)
class Claim:
    """What a request asks for a client message id."""

    client_id: str
    message_id: int  # the id this request would give the message
    fingerprint: bytes  # keyed fingerprint of the text (sealstream.crypto.TextFingerprints)
    sent_at: datetime


@dataclass(frozen=True)
class Granted:
    """The message a client message id stands for, and whether an earlier request made it."""

    client_id: str
    message_id: int
    sent_at: datetime
    earlier: bool = False  # claimed by an earlier request (same text)
    acknowledged: bool = False  # ... and Kafka acknowledged that request's message


class ClaimConflict(Exception):
    """The client message id at `index` was claimed earlier for another text."""

    def __init__(self, index: int) -> None:
        super().__init__("client message id already used for another text")
        self.index = index


class ClaimStore(Protocol):
    """Client message id -> message id, per (chat, sender), for the idempotency window.

    Claims are durable and never released: a request whose outcome is unknown (timeout,
    crash) leaves its claim, and the retry re-publishes the same record under the same id.
    """

    def claim(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Claim]) -> list[Granted]:
        """Claim every client id (distinct) at once, in order; an id claimed earlier yields
        the earlier message. Raises `ClaimConflict` (and claims nothing) when one was claimed
        for another text, `StoreUnavailable` when the store does not answer in time."""
        ...

    def acknowledge(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Granted]) -> None:
        """Kafka acknowledged these messages: a later retry publishes nothing."""
