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

Edits and sender deletions (docs/operations.md, "Edits and sender deletion") are applied after the
batch's posts, each checked against the document the index holds for its message (the indexer
has no Cassandra): it must be the same chat's, not deleted, of the same sender, and the change
inside the edit window; otherwise the change is skipped and counted, not dead-lettered (the
encryptor, which checks the same against the row, dead-letters it once). An edit replaces the
document at its event id as external version, so a stale edit or a replayed post never replaces
a newer text; a deletion writes the admin deletion's tombstone, which always wins.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client import Counter

from schemas.events import MessageRecord
from sealstream.adapters.opensearch import (
    IndexedDocument,
    IndexedMessage,
    RefusedDocument,
)
from sealstream.deletion_state import ChatStates, admitted_records
from sealstream.errors import KmsKeyUnusable
from sealstream.settings import EditSettings
from sealstream.streaming import RawRecord, Rejected

CHANGES_NOT_INDEXED = Counter(
    "sealstream_indexer_changes_skipped_total",
    "Edits and sender deletions the indexer did not apply: no such document (of this chat), "
    "deleted, another sender's, or outside the edit window (the encryptor dead-letters those)",
    ["kind", "reason"],
)
_DEFAULT_WINDOW = EditSettings().window_seconds

_KEY_REFUSED = "the KMS refused this tenant's index key (master key missing or wrapped key invalid)"


class DocumentSink(Protocol):
    def analyze_terms(self, texts: list[str]) -> list[list[str]]: ...

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]: ...

    def current_documents(self, message_ids: list[int]) -> dict[int, IndexedDocument]: ...

    def delete_message(self, chat_id: uuid.UUID, message_id: int) -> None: ...


class TermKeys(Protocol):
    """The blind index's keys (`IndexKeys`): a document's terms as stored (keyed under the
    tenant's current key, or as they are for a plain tenant)."""

    def document_tokens(self, tenant_id: str, terms: list[str]) -> tuple[list[str], int | None]: ...


def _refusal_of_change(
    message: MessageRecord, document: IndexedDocument | None, window_seconds: int
) -> str | None:
    """Why the index must not apply this edit or deletion (a metric label), or None."""
    if document is None or document.chat_id != str(message.chat_id):
        return "no_such_message"
    if document.deleted:
        return "message_deleted"
    # Only the message's sender may change it: a direct producer naming someone else leaves
    # the index alone (the document's sender_id is the post's, never changed by an edit).
    if document.sender_id != message.sender_id:
        return "not_sender"
    if message.change_timing_problem(window_seconds, int(time.time() * 1000)):
        return "timing"  # past the edit window or made in the future
    return None


def index_batch(
    records: Sequence[RawRecord],
    sink: DocumentSink,
    states: ChatStates | None = None,
    keys: TermKeys | None = None,
    edit_window_seconds: int = _DEFAULT_WINDOW,
) -> list[Rejected]:
    """Index a batch: its posts, then its edits and sender deletions in record order. With
    `keys`, a document's terms are keyed when its tenant has the blind index on. The tenant is
    the chat's as Postgres knows it: with `states`, a record claiming another tenant (which could
    put a blind tenant's words in plain) is dead-lettered by `admitted_records`. A KMS or
    Postgres outage while getting a key raises (retriable): the batch waits, nothing is dropped;
    a key the KMS refuses for good dead-letters the tenant's records of the batch."""
    admitted, rejected = admitted_records("indexer", records, states)
    posts = [(record, decoded) for record, decoded in admitted if decoded.kind == "post"]
    changes = [(record, decoded) for record, decoded in admitted if decoded.kind != "post"]
    # Document id = message id at external version 1: a redelivered record conflicts (done), and
    # a deleted message's tombstone (a higher version) or an edit (its event id) is never
    # overwritten.
    rejected += _index_texts(posts, sink, keys)
    if changes:
        # After the posts: an edit of a message posted earlier in the batch finds its document.
        documents = sink.current_documents([decoded.message_id for _, decoded in changes])
        edits: list[tuple[RawRecord, MessageRecord]] = []
        for record, decoded in changes:
            document = documents.get(decoded.message_id)
            if reason := _refusal_of_change(decoded, document, edit_window_seconds):
                CHANGES_NOT_INDEXED.labels(decoded.kind, reason).inc()
                continue
            assert document is not None
            if decoded.kind == "delete":
                # The admin deletion's tombstone (DELETION_VERSION): nothing indexes it again.
                sink.delete_message(decoded.chat_id, decoded.message_id)
                documents[decoded.message_id] = IndexedDocument(
                    decoded.message_id, document.chat_id, None, None, None, True, 0
                )
            else:
                edits.append((record, decoded))
        rejected += _index_texts(edits, sink, keys, documents)
    return rejected


def _index_texts(
    admitted: list[tuple[RawRecord, MessageRecord]],
    sink: DocumentSink,
    keys: TermKeys | None,
    edited: dict[int, IndexedDocument] | None = None,
) -> list[Rejected]:
    """Analyse and index posts (`edited` None) or edits (the documents they replace: an edit's
    document keeps its post's time and is written at its event id as version)."""
    rejected: list[Rejected] = []
    source = {decoded.change_id: record for record, decoded in admitted}
    # One `_analyze` pass for the whole batch (the adapter splits it into requests).
    texts = [decoded.text or "" for _, decoded in admitted]  # posts and edits: never None
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
        sent_at = decoded.sent_at
        if edited is not None and (posted := edited[decoded.message_id].sent_at) is not None:
            sent_at = datetime.fromisoformat(posted)
        documents.append(
            IndexedMessage(
                message_id=decoded.message_id,
                chat_id=decoded.chat_id,
                tenant_id=tenant,
                sender_id=decoded.sender_id,
                sent_at=sent_at,
                tokens=terms,
                index_key_version=version,
                version=None if edited is None else decoded.event_id,
            )
        )
    by_message = {d.message_id: d for d in documents}
    for refused in sink.index_many(documents):
        document = by_message[refused.message_id]
        key = document.message_id if document.version is None else document.version
        rejected.append(Rejected(source[key], refused.reason))
    return rejected
