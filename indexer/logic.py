"""Turn a batch of raw message records into search documents and bulk-index them.

A record the schema refuses, and a document the index refuses for itself, are dead-lettered with
the reason; anything the sink raises fails the whole batch so the runtime retries it. The text is
handed to the index adapter, which sends only its tokens (sealstream/tokens.py).
Records of a deleted chat, or past their chat's retention, are skipped (sealstream.deletion_state);
a record of a chat Postgres does not know is dead-lettered, as the encryptor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from schemas.events import decode_record
from sealstream.adapters.opensearch import IndexedMessage, RefusedDocument
from sealstream.deletion_state import ChatStates, deletion_check
from sealstream.streaming import RawRecord, Rejected


class DocumentSink(Protocol):
    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]: ...


def index_batch(
    records: Sequence[RawRecord], sink: DocumentSink, states: ChatStates | None = None
) -> list[Rejected]:
    deletion = deletion_check("indexer", records, states)
    documents: list[IndexedMessage] = []
    rejected: list[Rejected] = []
    source: dict[int, RawRecord] = {}
    for record in records:
        decoded = decode_record(record.value, record.key)
        if isinstance(decoded, str):
            rejected.append(Rejected(record, decoded))
            continue
        if deletion.unknown(decoded.chat_id):
            # The encryptor dead-letters it (no key); its words must not outlive it in the index,
            # where no chat deletion or retention would ever find them.
            rejected.append(Rejected(record, f"unknown chat {decoded.chat_id}"))
            continue
        if deletion.refuses(decoded.chat_id, decoded.message_id):
            continue
        source[decoded.message_id] = record
        documents.append(
            IndexedMessage(
                message_id=decoded.message_id,
                chat_id=decoded.chat_id,
                tenant_id=decoded.tenant_id,
                sender_id=decoded.sender_id,
                sent_at=decoded.sent_at,
                text=decoded.text,
            )
        )
    # Document id = message id at external version 1: a redelivered record conflicts (done), and a
    # deleted message's tombstone (a higher version) is never overwritten.
    for refused in sink.index_many(documents):
        rejected.append(Rejected(source[refused.message_id], refused.reason))
    return rejected
