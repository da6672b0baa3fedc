"""What the gateway needs from the outside world, as small protocols (fakes in unit tests)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from sealstream.adapters.postgres import ChatRow


class ChatDirectory(Protocol):
    def get(self, chat_id: uuid.UUID) -> ChatRow | None: ...

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow: ...


class RecordPublisher(Protocol):
    def publish(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Return only once the broker acknowledged every record; raise otherwise."""


class IdempotencyStore(Protocol):
    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        """Record `message_id` for this client id; return the id already recorded, if any."""

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str) -> None: ...
