"""Turn a batch of raw message records into search documents and bulk-index them.

A record the schema refuses, and a document the index refuses for itself, are dead-lettered with
the reason; anything the sink raises fails the whole batch so the runtime retries it. The batch's
texts are analysed in one pass by the index's `_analyze` API (in OpenSearch's memory, never
stored), and only each message's index terms are indexed (`document_terms` of its tokens, taken
straight from the answer by `analyze_terms`; sealstream/tokens.py), keyed with the tenant's
current index key for a blind-index tenant (sealstream/keys/index_keys.py). A tenant whose index
key the KMS refuses for good has its records dead-lettered; a KMS outage fails the batch
(retried).
Records of a deleted chat, or past their chat's retention, are skipped (sealstream.deletion_state);
a record of a chat Postgres does not know is dead-lettered, as the encryptor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sealstream.adapters.opensearch import (
    IndexedMessage,
    RefusedDocument,
)
from sealstream.deletion_state import ChatStates, admitted_records
from sealstream.errors import KmsKeyUnusable
from sealstream.streaming import RawRecord, Rejected

_KEY_REFUSED = "the KMS refused this tenant's index key (master key missing or wrapped key invalid)"


class DocumentSink(Protocol):
    def analyze_terms(self, texts: list[str]) -> list[list[str]]: ...

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]: ...


class TermKeys(Protocol):
    """The blind index's keys (`IndexKeys`): a document's terms as stored (keyed under the
    tenant's current key, or as they are for a plain tenant)."""

    def document_tokens(self, tenant_id: str, terms: list[str]) -> tuple[list[str], int | None]: ...


def index_batch(
    records: Sequence[RawRecord],
    sink: DocumentSink,
    states: ChatStates | None = None,
    keys: TermKeys | None = None,
) -> list[Rejected]:
    """Index a batch. With `keys`, a document's terms are keyed when its tenant has the blind
    index on. The tenant is the chat's as Postgres knows it: with `states`, a record claiming
    another tenant (which could put a blind tenant's words in plain) is dead-lettered by
    `admitted_records`. A KMS or Postgres outage while getting a key raises (retriable): the
    batch waits, nothing is dropped; a key the KMS refuses for good dead-letters the tenant's
    records of the batch."""
    admitted, rejected = admitted_records("indexer", records, states)
    rejected += [
        Rejected(record, f"kind: {decoded.kind} is not handled yet")
        for record, decoded in admitted
        if decoded.kind != "post"
    ]
    admitted = [(record, decoded) for record, decoded in admitted if decoded.kind == "post"]
    source = {decoded.message_id: record for record, decoded in admitted}
    # One `_analyze` pass for the whole batch (the adapter splits it into requests).
    texts = [decoded.text or "" for _, decoded in admitted]  # posts: never None
    analysed = sink.analyze_terms(texts) if admitted else []
    documents: list[IndexedMessage] = []
    unusable: set[str] = set()  # tenants whose index key the KMS refused, asked once per batch
    for (record, decoded), terms in zip(admitted, analysed, strict=True):
        # The record's tenant is its chat's: `admitted_records` dead-letters any other claim.
        tenant = decoded.tenant_id
        version: int | None = None
        if keys is not None and tenant not in unusable:
            try:
                terms, version = keys.document_tokens(tenant, terms)
            except KmsKeyUnusable:
                unusable.add(tenant)
        if tenant in unusable:
            rejected.append(Rejected(record, _KEY_REFUSED))
            continue
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
