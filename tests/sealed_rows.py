"""Test data builder: message rows sealed the way the encryptor seals them (envelope v2)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from schemas.ids import id_time
from sealstream.adapters.cassandra import StoredMessage
from sealstream.crypto import ChatKey, seal


def sealed_row(
    chat_id: uuid.UUID,
    message_id: int,
    sender_id: str,
    key: ChatKey,
    text: str,
    created_at: datetime | None = None,
    revision: int = 1,
) -> StoredMessage:
    """A row whose envelope is bound to the row's own chat, id, sender, revision and creation
    time (default: the id's clock, as the encryptor writes it), so a reader opens it."""
    created = created_at if created_at is not None else id_time(message_id)
    row = StoredMessage(
        chat_id, message_id, sender_id, key.version, b"", created, revision=revision
    )
    return replace(row, envelope=seal(text.encode("utf-8"), key, row.context()))
