"""The reader's view of a message once decrypted (what every read answers with)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ReadMessage:
    """One decrypted message as the API returns it (the DEK version stays internal)."""

    message_id: str  # decimal: 64-bit ids exceed JavaScript's safe integers
    chat_id: uuid.UUID
    sender_id: str
    text: str
    sent_at: datetime
    revision: int = 1  # 1 as posted, +1 per edit (the envelope is bound to it)
    edited_at: datetime | None = None  # the last edit's time; None if never edited
    # Attachment ids the message references, decimal strings, in the sender's order.
    attachments: tuple[str, ...] = ()
