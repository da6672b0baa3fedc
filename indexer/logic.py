"""Turn a batch of raw message records into search documents and bulk-index them.

Records of a deleted chat, or past their chat's retention, are skipped (sealstream.deletion_state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from schemas.events import decode_record
from sealstream.adapters.opensearch import IndexedMessage
from sealstream.deletion_state import ChatStates, deletion_check
from sealstream.streaming import RawRecord, Rejected


class DocumentSink(Protocol):
    def index_many(self, messages: list[IndexedMessage]) -> None: ...


def index_batch(
    records: Sequence[RawRecord], sink: DocumentSink, states: ChatStates | None = None
) -> list[Rejected]:
    deletion = deletion_check("indexer", records, states)
    documents: list[IndexedMessage] = []
    rejected: list[Rejected] = []
    for record in records:
        decoded = decode_record(record.value, record.key)
        if isinstance(decoded, str):
            rejected.append(Rejected(record, decoded))
            continue
        if deletion.refuses(decoded.chat_id, decoded.message_id):
            continue
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
    sink.index_many(documents)
    return rejected
