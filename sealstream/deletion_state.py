"""Deletion state as the workers see it: whether a record may still be written to a store.

Both workers (encryptor, indexer) ask once per batch, after the batch was assembled, and write
nothing for a record whose chat was deleted (crypto-shredded) or whose message is older, by the
clock in its id, than its chat's retention period. The state is read from Postgres, the source of
truth, not from a cache: the read happens after every record of the batch was produced, so a
chat deleted before the read is always seen, and one deleted after it is caught by the deletion's
second sweep, which waits until both workers committed past the deletion point
(`sealstream.lifecycle.delete_chat`). Single deleted messages need no check here: the stores'
versioned writes keep them deleted (adapters/cassandra.py, adapters/opensearch.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from prometheus_client import Counter

from schemas.events import MessageRecord, decode_record
from schemas.ids import id_millis
from sealstream.streaming import RawRecord, Rejected

SKIPPED = Counter(
    "sealstream_records_skipped_total",
    "Records not written because their chat was deleted or they are past retention",
    ["stage", "reason"],
)

_DAY_MS = 86_400_000
CHAT_DELETED = "chat_deleted"
PAST_RETENTION = "past_retention"


class ChatState(NamedTuple):
    """What a worker needs to know of a chat before writing one of its records."""

    state: str  # 'active' | 'deleted'
    retention_days: int | None  # the chat's own, else its tenant's; None = kept for ever
    tenant_id: str  # the chat's tenant: a record claiming another one is refused


class ChatStates(Protocol):
    """The `ChatState` of each known chat among `chat_ids`."""

    def chat_states(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, ChatState]: ...


class DeletionCheck:
    """One batch's answer: which of its records must not be written."""

    def __init__(
        self,
        stage: str,
        states: dict[uuid.UUID, ChatState],
        now: datetime,
        looked_up: bool = False,
    ) -> None:
        self.stage = stage
        self._states = states
        self._now_ms = int(now.timestamp() * 1000)
        self._looked_up = looked_up

    def unknown(self, chat_id: uuid.UUID) -> bool:
        """True if the chat states were read and `chat_id` is not among the known chats: its
        record can never be stored (the encryptor finds no key), so it is a dead letter."""
        return self._looked_up and chat_id not in self._states

    def wrong_tenant(self, record: MessageRecord) -> str | None:
        """The dead-letter reason if `record` names a tenant other than its chat's (only a
        direct producer can send one: the gateway takes the tenant from the chat). Every store
        files the message under its chat's tenant (the search index keys a blind-index tenant's
        words with that tenant's key), so such a record is refused, not silently re-filed."""
        state = self._states.get(record.chat_id)
        if state is None or state.tenant_id == record.tenant_id:
            return None
        return "tenant_id: not the tenant of this chat"

    def refuses(self, chat_id: uuid.UUID, message_id: int) -> bool:
        """True (and counted) if the record must not be written. An unknown chat is not refused
        here: the encryptor dead-letters it when it finds no key."""
        state = self._states.get(chat_id)
        if state is None:
            return False
        status, days, _ = state
        if status == "deleted":
            self.skip(CHAT_DELETED)
            return True
        if days is not None and id_millis(message_id) < self._now_ms - days * _DAY_MS:
            self.skip(PAST_RETENTION)
            return True
        return False

    def skip(self, reason: str) -> None:
        SKIPPED.labels(self.stage, reason).inc()


def deletion_check(
    stage: str, records: Sequence[RawRecord], states: ChatStates | None
) -> DeletionCheck:
    """Read the deletion state of the chats of a batch (by record key: the chat id) in one query.
    With `states` None nothing is refused (tests of the logic alone)."""
    chat_ids: set[uuid.UUID] = set()
    for record in records:
        if not record.key:
            # The record schema accepts a record without a key (the chat id is in the value), so
            # its chat must be checked too: take it from the value (a keyless replay of a deleted
            # chat's records would be written otherwise).
            decoded = decode_record(record.value, None)
            if not isinstance(decoded, str):
                chat_ids.add(decoded.chat_id)
            continue  # else invalid: dead-lettered when it is decoded
        try:
            chat_ids.add(uuid.UUID(record.key.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            continue  # a malformed key: the record is dead-lettered when it is decoded
    found = states.chat_states(chat_ids) if states is not None and chat_ids else {}
    return DeletionCheck(stage, found, datetime.now(UTC), looked_up=states is not None)


def admitted_records(
    stage: str, records: Sequence[RawRecord], states: ChatStates | None
) -> tuple[list[tuple[RawRecord, MessageRecord]], list[Rejected]]:
    """A batch decoded and checked against its chats' deletion state, for a stage that writes
    every record of a known chat (the indexer; the bench's plaintext writer): returns the
    records to write with their decoded values, and the dead letters (schema refusals, unknown
    chats). Records of deleted chats or past retention are in neither (skipped, counted)."""
    deletion = deletion_check(stage, records, states)
    admitted: list[tuple[RawRecord, MessageRecord]] = []
    rejected: list[Rejected] = []
    for record in records:
        decoded = decode_record(record.value, record.key, record.event_id)
        if isinstance(decoded, str):
            rejected.append(Rejected(record, decoded))
        elif deletion.unknown(decoded.chat_id):
            # The encryptor dead-letters it (no key); a record of it written elsewhere would
            # never be found by a chat deletion or retention.
            rejected.append(Rejected(record, f"unknown chat {decoded.chat_id}"))
        elif reason := deletion.wrong_tenant(decoded):
            rejected.append(Rejected(record, reason))
        elif not deletion.refuses(decoded.chat_id, decoded.message_id):
            admitted.append((record, decoded))
    return admitted, rejected
