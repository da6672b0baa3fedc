"""What the gateway needs from the outside world, as small protocols (fakes in unit tests)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

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


class RecordPublisher(Protocol):
    def publish(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Publish (key, value) records; return only once the broker acknowledged every one of
        them, raise (`StoreUnavailable`, retriable) otherwise."""


class ClaimInFlight(Exception):
    """Another request claimed this client message id and is still waiting for Kafka's ack."""

    def __init__(self, message_id: int) -> None:
        super().__init__("client message id claimed by a request still in flight")
        self.message_id = message_id


class IdempotencyStore(Protocol):
    """Client message id -> message id, per (chat, sender), for about a day.

    A claim is *pending* until `confirm` (after Kafka's ack) and expires soon if never confirmed,
    so a crash between claim and publish cannot make a retry report an unpublished message as a
    duplicate.
    """

    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        """Claim the client id for `message_id`: None if claimed now, else the confirmed id of
        the earlier message. Raises `ClaimInFlight` while the earlier claim is still pending."""
        ...

    def confirm(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        """The message was acknowledged: keep the claim for the full idempotency window."""

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        """The message was not published: drop our pending claim (never someone else's)."""
