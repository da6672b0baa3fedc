"""Turn a batch of raw message records into search documents and bulk-index them.

A record the schema refuses, and a document the index refuses for itself, are dead-lettered with
the reason; anything the sink raises fails the whole batch so the runtime retries it. The batch's
texts are analysed in one pass by the index's `_analyze` API (in OpenSearch's memory, never
stored), and only each message's index terms are indexed (`document_terms` of its tokens, taken
straight from the answer by `analyze_terms`; sealstream/tokens.py).
Records of a deleted chat, or past their chat's retention, are skipped (sealstream.deletion_state);
a record of a chat Postgres does not know is dead-lettered, as the encryptor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sealstream.adapters.opensearch import IndexedMessage, RefusedDocument
from sealstream.deletion_state import ChatStates, admitted_records
from sealstream.streaming import RawRecord, Rejected


class DocumentSink(Protocol):
    def analyze_terms(self, texts: list[str]) -> list[list[str]]: ...

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]: ...


def index_batch(
    records: Sequence[RawRecord], sink: DocumentSink, states: ChatStates | None = None
) -> list[Rejected]:
    admitted, rejected = admitted_records("indexer", records, states)
    source = {decoded.message_id: record for record, decoded in admitted}
    # One `_analyze` pass for the whole batch (the adapter splits it into requests).
    terms = sink.analyze_terms([decoded.text for _, decoded in admitted]) if admitted else []
    documents = [
        IndexedMessage(
            message_id=decoded.message_id,
            chat_id=decoded.chat_id,
            tenant_id=decoded.tenant_id,
            sender_id=decoded.sender_id,
            sent_at=decoded.sent_at,
            tokens=tokens,
        )
        for (_, decoded), tokens in zip(admitted, terms, strict=True)
    ]
    # Document id = message id at external version 1: a redelivered record conflicts (done), and a
    # deleted message's tombstone (a higher version) is never overwritten.
    for refused in sink.index_many(documents):
        rejected.append(Rejected(source[refused.message_id], refused.reason))
    return rejected
