"""What live delivery needs from the outside world, as small protocols (the adapters satisfy
them)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Protocol

from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.postgres import ChatRow


class ChatLookup(Protocol):
    def __call__(self, chat_id: uuid.UUID) -> ChatRow | None:
        """The chat as Postgres has it now (never cached: a removal counts at once)."""
        ...


class ChangeRows(Protocol):
    """Rows of the message store for resume (`MessageStore.rows_after`) and for checking an
    edit or deletion against its row (`MessageStore.get`)."""

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None: ...

    def rows_after(
        self, chat_id: uuid.UUID, after_id: int, until_ms: int, page_size: int = 500
    ) -> Iterator[StoredMessage]: ...


class RowOpener(Protocol):
    """Opens a row's envelope (`reader.service.EnvelopeOpener`); returns something with `.text`."""

    def open(self, row: StoredMessage) -> _HasText: ...


class _HasText(Protocol):
    @property
    def text(self) -> str: ...
