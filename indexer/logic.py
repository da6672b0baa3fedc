"""Turn a batch of raw message records into search documents and bulk-index them.

A record the schema refuses, and a document the index refuses for itself, are dead-lettered with
the reason; anything the sink raises fails the whole batch so the runtime retries it. The texts
are analysed (`analyze` -> `document_terms`) and only the terms reach the index: keyed with the
tenant's current index key for a blind-index tenant (sealstream/keys/index_keys.py).
Records of a deleted chat, or past their chat's retention, are skipped (sealstream.deletion_state);
a record of a chat Postgres does not know is dead-lettered, as the encryptor does.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from sealstream.adapters.opensearch import (
    IndexedMessage,
    RefusedDocument,
    TextToken,
    document_terms,
)
from sealstream.deletion_state import ChatStates, admitted_records
from sealstream.streaming import RawRecord, Rejected


class DocumentSink(Protocol):
    def analyze(self, texts: list[str]) -> list[list[TextToken]]: ...

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]: ...


class TermKeys(Protocol):
    """The blind index's keys (`IndexKeys`): the tenant of each chat, and a document's terms as
    stored (keyed under the tenant's current key, or as they are for a plain tenant)."""

    def tenants_of(self, chat_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]: ...

    def document_tokens(self, tenant_id: str, terms: list[str]) -> tuple[list[str], int | None]: ...


def index_batch(
    records: Sequence[RawRecord],
    sink: DocumentSink,
    states: ChatStates | None = None,
    keys: TermKeys | None = None,
) -> list[Rejected]:
    """Index a batch. With `keys`, each document's tenant is the chat's tenant as Postgres
    knows it (not the record's claim, which could name a plain tenant for a blind tenant's
    chat) and its terms are keyed when that tenant has the blind index on. A KMS or Postgres
    outage while getting a key raises (retriable): the batch waits, nothing is dropped."""
    admitted, rejected = admitted_records("indexer", records, states)
    source = {decoded.message_id: record for record, decoded in admitted}
    analysed = sink.analyze([decoded.text for _, decoded in admitted]) if admitted else []
    tenants = keys.tenants_of(list({d.chat_id for _, d in admitted})) if keys else {}
    documents: list[IndexedMessage] = []
    for (_, decoded), tokens in zip(admitted, analysed, strict=True):
        tenant = tenants.get(decoded.chat_id, decoded.tenant_id)
        terms = document_terms(tokens)
        version: int | None = None
        if keys is not None:
            terms, version = keys.document_tokens(tenant, terms)
        documents.append(
            IndexedMessage(
                message_id=decoded.message_id,
                chat_id=decoded.chat_id,
                tenant_id=tenant,
                sender_id=decoded.sender_id,
                sent_at=decoded.sent_at,
                tokens=terms,
                index_key_version=version,
            )
        )
    # Document id = message id at external version 1: a redelivered record conflicts (done), and a
    # deleted message's tombstone (a higher version) is never overwritten.
    for refused in sink.index_many(documents):
        rejected.append(Rejected(source[refused.message_id], refused.reason))
    return rejected
