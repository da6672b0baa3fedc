"""Turn a batch of raw message records into sealed Cassandra rows (plain functions, no I/O setup).

Permanent problems (bad schema, unknown chat, a tenant other than the chat's, a key the KMS
refuses for good, a row Cassandra refuses) reject one record; anything
else raised fails the whole batch so the runtime retries it (see sealstream.streaming). Records of
a deleted chat, or past their chat's retention, are skipped, not dead-lettered
(sealstream.deletion_state).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from schemas.changes import ChangeEvent
from schemas.events import MessageRecord, decode_record
from schemas.ids import id_millis, id_time
from sealstream.adapters.cassandra import RefusedRow, StoredMessage
from sealstream.crypto import ChatKey, MessageContext, seal
from sealstream.deletion_state import CHAT_DELETED, ChatStates, deletion_check
from sealstream.errors import KeyDestroyed, KeyNotFound, KmsKeyUnusable
from sealstream.streaming import RawRecord, Rejected


class KeySource(Protocol):
    def current_key(self, chat_id: uuid.UUID) -> ChatKey: ...

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]: ...


class MessageSink(Protocol):
    def write_many(self, messages: Sequence[StoredMessage]) -> list[RefusedRow]: ...


def decode(record: RawRecord) -> MessageRecord | Rejected:
    decoded = decode_record(record.value, record.key)
    return Rejected(record, decoded) if isinstance(decoded, str) else decoded


# Where the encryptor's time goes (the benchmark reads these from /metrics).
PHASE_SECONDS = Counter("sealstream_encryptor_seconds", "Encryptor time by phase", ["phase"])
_KEY_LOOKUP = PHASE_SECONDS.labels("key_lookup")
_CRYPTO = PHASE_SECONDS.labels("crypto")
_STORE = PHASE_SECONDS.labels("store")


@dataclass(frozen=True)
class Source:
    """Where a sealed row came from: its record, and the tenant it names (its chat's)."""

    record: RawRecord
    tenant_id: str


def seal_batch(
    records: Sequence[RawRecord], keys: KeySource, states: ChatStates | None = None
) -> tuple[list[StoredMessage], list[Rejected], dict[int, Source]]:
    """Sealed rows, rejected records, and where each row came from (by message id)."""
    deletion = deletion_check("encryptor", records, states)
    stored: list[StoredMessage] = []
    source: dict[int, Source] = {}
    rejected: list[Rejected] = []
    lookup_seconds = crypto_seconds = 0.0  # summed here, published once per batch
    unusable: dict[uuid.UUID, str] = {}  # chats whose key the KMS refused, asked once per batch
    for record in records:
        decoded = decode(record)
        if isinstance(decoded, Rejected):
            rejected.append(decoded)
            continue
        if reason := deletion.wrong_tenant(decoded):
            rejected.append(Rejected(record, reason))
            continue
        if decoded.kind != "post":
            rejected.append(Rejected(record, f"kind: {decoded.kind} is not handled yet"))
            continue
        assert decoded.text is not None  # a post always has text (MessageRecord._fields_of_kind)
        if deletion.refuses(decoded.chat_id, decoded.message_id):
            continue
        if decoded.chat_id in unusable:
            rejected.append(Rejected(record, unusable[decoded.chat_id]))
            continue
        started = time.perf_counter()
        try:
            key = keys.current_key(decoded.chat_id)
        except KeyDestroyed:
            # Deleted after the state was read: skipped like the others. Not a dead letter, which
            # would keep the deleted chat's plaintext on the dead-letter topic for days.
            deletion.skip(CHAT_DELETED)
            continue
        except KeyNotFound:
            rejected.append(Rejected(record, f"unknown chat {decoded.chat_id}"))
            continue
        except KmsKeyUnusable:
            # One tenant's master key gone, or one wrapped DEK corrupt: the other chats of the
            # batch are sealed; these records wait on the dead-letter topic (no KMS detail in
            # the reason: it goes into a Kafka header).
            unusable[decoded.chat_id] = (
                "the KMS refused this chat's key (master key missing or wrapped DEK invalid)"
            )
            rejected.append(Rejected(record, unusable[decoded.chat_id]))
            continue
        looked_up = time.perf_counter()
        # Envelope v2 binds the sender, the revision (1: as first sent) and the creation time
        # from the id's clock, the same values the row stores, so none can be changed alone.
        envelope = seal(
            decoded.text.encode("utf-8"),
            key,
            MessageContext(
                decoded.chat_id,
                decoded.message_id,
                decoded.sender_id,
                1,
                id_millis(decoded.message_id),
            ),
        )
        lookup_seconds += looked_up - started
        crypto_seconds += time.perf_counter() - looked_up
        source[decoded.message_id] = Source(record, decoded.tenant_id)
        stored.append(
            StoredMessage(
                chat_id=decoded.chat_id,
                message_id=decoded.message_id,
                sender_id=decoded.sender_id,
                dek_version=key.version,
                envelope=envelope,
                # The id's time, the one clock of record; sent_at is the producer's clock.
                created_at=id_time(decoded.message_id),
            )
        )
    _KEY_LOOKUP.inc(lookup_seconds)
    _CRYPTO.inc(crypto_seconds)
    return stored, rejected, source


def post_change(row: StoredMessage, tenant_id: str) -> ChangeEvent:
    """The change event of a stored post (schemas/changes.py)."""
    return ChangeEvent(
        kind="post",
        event_id=row.message_id,
        chat_id=row.chat_id,
        tenant_id=tenant_id,
        message_id=row.message_id,
        sender_id=row.sender_id,
        revision=row.revision,
        dek_version=row.dek_version,
        envelope=row.envelope,
        created_at=row.created_at,
    )


@dataclass(frozen=True)
class StoredBatch:
    """What one batch came to: the dead letters, and the change events of what was stored, in
    record order (published before the batch is committed: schemas/changes.py)."""

    rejected: list[Rejected]
    changes: list[ChangeEvent]


def store_batch(
    records: Sequence[RawRecord],
    keys: KeySource,
    sink: MessageSink,
    states: ChatStates | None = None,
) -> StoredBatch:
    """One batch: seal every valid record and write them all.

    Once the rows are written, the messages sealed per DEK version are counted, which rotates
    a chat whose current version reached the rotation policy's message limit.
    """
    stored, rejected, source = seal_batch(records, keys, states)
    started = time.perf_counter()
    refused = sink.write_many(stored)
    _STORE.inc(time.perf_counter() - started)
    rejected += [Rejected(source[r.message_id].record, r.reason) for r in refused]
    refused_ids = {r.message_id for r in refused}
    written_rows = [m for m in stored if m.message_id not in refused_ids]
    if written_rows:
        keys.record_usage(dict(Tally((m.chat_id, m.dek_version) for m in written_rows)))
    changes = [post_change(m, source[m.message_id].tenant_id) for m in written_rows]
    return StoredBatch(rejected, changes)


def encrypt_and_store(
    records: Sequence[RawRecord],
    keys: KeySource,
    sink: MessageSink,
    states: ChatStates | None = None,
) -> list[Rejected]:
    """`store_batch` for callers that publish no change events: the dead letters only."""
    return store_batch(records, keys, sink, states).rejected
