"""Chat deletion across every store, in the order that makes the chat unreadable first.

1. Crypto-shred: destroy every DEK version (Postgres), evict it from Redis and from every process.
   From here on the chat's envelopes cannot be opened by anyone, whatever else survives.
2. Delete the chat's documents from the search index (tokens are not encrypted).
3. Delete the chat's Cassandra partitions (the ciphertext, now useless, is also removed).
Each step is idempotent, so a failed deletion is finished by running it again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.errors import KeyNotFound
from sealstream.keys.service import KeyService

# Rows may carry a timestamp a little ahead of the chat's creation (clock skew between gateways).
_SKEW = timedelta(minutes=10)


@dataclass(frozen=True)
class ShredReceipt:
    chat_id: uuid.UUID
    dek_versions_destroyed: list[int]
    index_documents_deleted: int
    rows_deleted: int
    seconds: float


def delete_chat(
    keys: KeyService, index: SearchIndex, store: MessageStore, chat_id: uuid.UUID, reason: str
) -> ShredReceipt:
    started = time.monotonic()
    chat = keys.chat(chat_id)
    if chat is None:
        raise KeyNotFound(f"chat {chat_id} does not exist")
    destroyed = keys.delete_chat(chat_id, reason)
    documents = index.delete_chat(chat_id)
    oldest_ms = int((chat.created_at - _SKEW).timestamp() * 1000)
    newest_ms = int(time.time() * 1000 + _SKEW.total_seconds() * 1000)
    rows = store.delete_chat(chat_id, oldest_ms, newest_ms)
    return ShredReceipt(chat_id, destroyed, documents, rows, time.monotonic() - started)
