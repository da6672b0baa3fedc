"""Turn a batch of raw message records into sealed Cassandra rows (plain functions, no I/O setup).

Permanent problems (bad schema, unknown chat, a tenant other than the chat's, a key the KMS
refuses for good, a row Cassandra refuses) reject one record; anything
else raised fails the whole batch so the runtime retries it (see sealstream.streaming). Records of
a deleted chat, or past their chat's retention, are skipped, not dead-lettered
(sealstream.deletion_state).

Edits and sender deletions (docs/operations.md, "Edits and sender deletion") are applied after
the batch's posts are written, in record order, each checked against its message's row: it must
exist (else dead letter), be the same sender's (else dead letter), be made inside the edit window
(else dead letter) and not be deleted or already superseded (else skipped: a replay or a stale
change is not an error); an edit's row must also open with its own columns (else dead letter:
a new revision is never sealed onto a tampered row).

A sender's deletion also deletes the message's attachments (docs/operations.md, "Deletion
guarantees"): each row is marked deleted (downloads answer 404 from then on) and its object is
deleted from the object store, before the message's own marker, so a store outage fails the
batch (retried, never dropped: `ObjectStoreError` propagates like `StoreUnavailable`) and the
retry finds the message still live and does it all again.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter as Tally
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import Counter

from schemas.changes import ChangeEvent
from schemas.events import MessageKind, MessageRecord, decode_record
from schemas.ids import id_millis, id_time
from sealstream.adapters.cassandra import EditWrite, RefusedRow, RowForChange, StoredMessage
from sealstream.attachments import object_key
from sealstream.crypto import ChatKey, MessageContext, open_envelope, seal
from sealstream.deletion_state import CHAT_DELETED, ChatStates, DeletionCheck, deletion_check
from sealstream.errors import (
    DecryptionError,
    KeyDestroyed,
    KeyNotFound,
    KmsKeyUnusable,
    StoreUnavailable,
)
from sealstream.settings import EditSettings
from sealstream.streaming import RawRecord, Rejected


class KeySource(Protocol):
    def current_key(self, chat_id: uuid.UUID) -> ChatKey: ...

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey: ...

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]: ...


class MessageSink(Protocol):
    def write_many(self, messages: Sequence[StoredMessage]) -> list[RefusedRow]: ...

    def rows_for_change(
        self, messages: set[tuple[uuid.UUID, int]]
    ) -> dict[tuple[uuid.UUID, int], RowForChange]: ...

    def write_edits(self, edits: Sequence[EditWrite]) -> dict[int, str]: ...

    def mark_deleted(self, chat_id: uuid.UUID, message_id: int, when: datetime) -> None: ...

    def mark_attachment_deleted(self, chat_id: uuid.UUID, file_id: int, when: datetime) -> None: ...

    def share_attachments(
        self, chat_id: uuid.UUID, file_ids: Iterable[int], when: datetime, message_id: int
    ) -> int: ...

    def release_attachment(self, chat_id: uuid.UUID, file_id: int, message_id: int) -> bool: ...


class AttachmentObjects(Protocol):
    """Where attachment files are (`sealstream.adapters.object_store.ObjectStore`): a sender's
    deletion deletes the objects of the message's attachments."""

    def delete(self, key: str) -> None: ...


def decode(record: RawRecord) -> MessageRecord | Rejected:
    decoded = decode_record(record.value, record.key, record.event_id)
    return Rejected(record, decoded) if isinstance(decoded, str) else decoded


# Where the encryptor's time goes (the benchmark reads these from /metrics).
PHASE_SECONDS = Counter("sealstream_encryptor_seconds", "Encryptor time by phase", ["phase"])
_KEY_LOOKUP = PHASE_SECONDS.labels("key_lookup")
_CRYPTO = PHASE_SECONDS.labels("crypto")
_STORE = PHASE_SECONDS.labels("store")

CHANGES_SKIPPED = Counter(
    "sealstream_changes_skipped_total",
    "Edits and sender deletions not applied, not dead-lettered: stale or replayed (an edit no "
    "newer than the row's last), or of a deleted message",
    ["kind", "reason"],
)
STALE = "stale"
MESSAGE_DELETED = "message_deleted"

_DEFAULT_WINDOW = EditSettings().window_seconds

NO_SUCH_MESSAGE = "message_id: no such message in this chat"
NOT_SENDER = "sender_id: not the sender of this message"
# An edit never seals a new revision onto a row whose envelope does not open with its own
# columns: the new envelope would bind what an attacker wrote there (e.g. another sender_id,
# whom the gateway and the sender check would then take for the sender) and open again.
STORED_ROW_TAMPERED = "message_id: the stored row failed its integrity check (not changed)"


@dataclass(frozen=True)
class Source:
    """Where a sealed row came from: its record, and the tenant it names (its chat's)."""

    record: RawRecord
    tenant_id: str


@dataclass(frozen=True)
class PendingChange:
    """An edit or sender deletion admitted by the batch's checks, applied after the posts."""

    position: int  # in the batch: change events go out in record order
    record: RawRecord
    message: MessageRecord


class BatchKeys:
    """The chats' current keys as one batch looks them up (posts and edits alike): a chat whose
    key the KMS refuses is asked once per batch, a shredded chat's records are skipped."""

    def __init__(self, keys: KeySource, deletion: DeletionCheck) -> None:
        self.keys = keys
        self.deletion = deletion
        self.unusable: dict[uuid.UUID, str] = {}
        self.lookup_seconds = 0.0  # summed here, published once per batch

    def current(self, record: RawRecord, message: MessageRecord) -> ChatKey | Rejected | None:
        """The chat's current key; a dead letter for this record; or None: skip it (shredded)."""
        if message.chat_id in self.unusable:
            return Rejected(record, self.unusable[message.chat_id])
        started = time.perf_counter()
        try:
            return self.keys.current_key(message.chat_id)
        except KeyDestroyed:
            # Deleted after the state was read: skipped like the others. Not a dead letter, which
            # would keep the deleted chat's plaintext on the dead-letter topic for days.
            self.deletion.skip(CHAT_DELETED)
            return None
        except KeyNotFound:
            return Rejected(record, f"unknown chat {message.chat_id}")
        except KmsKeyUnusable:
            # One tenant's master key gone, or one wrapped DEK corrupt: the other chats of the
            # batch are sealed; these records wait on the dead-letter topic (no KMS detail in
            # the reason: it goes into a Kafka header).
            self.unusable[message.chat_id] = (
                "the KMS refused this chat's key (master key missing or wrapped DEK invalid)"
            )
            return Rejected(record, self.unusable[message.chat_id])
        finally:
            self.lookup_seconds += time.perf_counter() - started

    def row_problem(self, message: MessageRecord, row: StoredMessage) -> str | None:
        """Why the row's current envelope cannot take an edit (a dead-letter reason), or None:
        it must open with the row's own columns (chat, message id, sender, revision, creation
        time and DEK version: `row.context()`), as the reader opens it. Its DEK version gone,
        unknown or refused by the KMS is a reason too; a KMS outage raises (the batch waits)."""
        started = time.perf_counter()
        try:
            key = self.keys.key(message.chat_id, row.dek_version)
            open_envelope(row.envelope, key, row.context())
            return None
        except KmsKeyUnusable:
            return "the KMS refused the key of the message's stored revision"
        except (DecryptionError, KeyDestroyed, KeyNotFound, ValueError, TypeError):
            return STORED_ROW_TAMPERED
        finally:
            self.lookup_seconds += time.perf_counter() - started


@dataclass
class SealedPosts:
    """The posts of a batch sealed (not written yet), its dead letters so far, and its edits
    and deletions still to apply."""

    stored: list[StoredMessage]
    rejected: list[Rejected]
    source: dict[int, Source]  # by message id
    position: dict[int, int]  # by message id
    changes: list[PendingChange]
    keys: BatchKeys


def seal_batch(
    records: Sequence[RawRecord], keys: KeySource, states: ChatStates | None = None
) -> SealedPosts:
    """Seal the batch's posts; check every record's schema, tenant and deletion state."""
    deletion = deletion_check("encryptor", records, states)
    batch_keys = BatchKeys(keys, deletion)
    sealed = SealedPosts([], [], {}, {}, [], batch_keys)
    crypto_seconds = 0.0
    for position, record in enumerate(records):
        decoded = decode(record)
        if isinstance(decoded, Rejected):
            sealed.rejected.append(decoded)
            continue
        if reason := deletion.wrong_tenant(decoded):
            sealed.rejected.append(Rejected(record, reason))
            continue
        # Edits and deletions too: one of a deleted chat or past retention is never applied.
        if deletion.refuses(decoded.chat_id, decoded.message_id):
            continue
        if decoded.kind != "post":
            sealed.changes.append(PendingChange(position, record, decoded))
            continue
        assert decoded.text is not None  # a post always has text (MessageRecord._fields_of_kind)
        key = batch_keys.current(record, decoded)
        if key is None:
            continue
        if isinstance(key, Rejected):
            sealed.rejected.append(key)
            continue
        started = time.perf_counter()
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
        crypto_seconds += time.perf_counter() - started
        sealed.source[decoded.message_id] = Source(record, decoded.tenant_id)
        sealed.position[decoded.message_id] = position
        sealed.stored.append(
            StoredMessage(
                chat_id=decoded.chat_id,
                message_id=decoded.message_id,
                sender_id=decoded.sender_id,
                dek_version=key.version,
                envelope=envelope,
                # The id's time, the one clock of record; sent_at is the producer's clock.
                created_at=id_time(decoded.message_id),
                attachment_ids=decoded.attachment_ids,
            )
        )
    _CRYPTO.inc(crypto_seconds)
    return sealed


def change_event(
    kind: MessageKind, row: StoredMessage, event_id: int, tenant_id: str
) -> ChangeEvent:
    """The change event of `row` as the change left it (schemas/changes.py); a deletion carries
    no envelope (it is gone)."""
    sealed = kind != "delete"
    return ChangeEvent(
        kind=kind,
        event_id=event_id,
        chat_id=row.chat_id,
        tenant_id=tenant_id,
        message_id=row.message_id,
        sender_id=row.sender_id,
        revision=row.revision,
        dek_version=row.dek_version if sealed else None,
        envelope=row.envelope if sealed else None,
        created_at=row.created_at,
        edited_at=row.edited_at,
        deleted_at=row.deleted_at,
        attachment_ids=row.attachment_ids,
    )


def post_change(row: StoredMessage, tenant_id: str) -> ChangeEvent:
    return change_event("post", row, row.message_id, tenant_id)


def edit_change(row: StoredMessage, event_id: int, tenant_id: str) -> ChangeEvent:
    return change_event("edit", row, event_id, tenant_id)


def delete_change(row: StoredMessage, event_id: int, tenant_id: str) -> ChangeEvent:
    return change_event("delete", row, event_id, tenant_id)


@dataclass(frozen=True)
class StoredBatch:
    """What one batch came to: the dead letters, and the change events of what was stored, in
    record order (published before the batch is committed: schemas/changes.py)."""

    rejected: list[Rejected]
    changes: list[ChangeEvent]


@dataclass
class _Applied:
    """The edits and deletions of a batch once checked: what to write and what to publish."""

    edits: list[tuple[PendingChange, EditWrite, StoredMessage]]
    deletes: list[tuple[PendingChange, StoredMessage]]
    events: list[tuple[int, ChangeEvent]]  # re-published changes (already applied)
    rejected: list[Rejected]


def _check_changes(
    changes: Sequence[PendingChange],
    rows: dict[tuple[uuid.UUID, int], RowForChange],
    keys: BatchKeys,
    window_seconds: int,
    now_ms: int,
) -> _Applied:
    """Apply the rules to each change in record order, on the rows as the batch's earlier
    changes left them (two edits of one message in a batch: the second seals revision r+2)."""
    applied = _Applied([], [], [], [])
    crypto_seconds = 0.0
    for change in changes:
        m, record = change.message, change.record
        assert m.event_id is not None  # edits and deletions always carry one (MessageRecord)
        pair = (m.chat_id, m.message_id)
        current = rows.get(pair)
        if current is None:
            applied.rejected.append(Rejected(record, NO_SUCH_MESSAGE))
            continue
        row = current.row
        if row.sender_id != m.sender_id:
            applied.rejected.append(Rejected(record, NOT_SENDER))
            continue
        if row.deleted_at is not None:
            if m.kind == "delete" and row.deleted_at == id_time(m.event_id):
                # This deletion, already applied (a batch retried after a crash before its
                # events went out): published again so delivery never misses it.
                applied.events.append(
                    (change.position, delete_change(row, m.event_id, m.tenant_id))
                )
            else:
                CHANGES_SKIPPED.labels(m.kind, MESSAGE_DELETED).inc()
            continue
        if m.kind == "edit" and row.last_event_id is not None and m.event_id <= row.last_event_id:
            if m.event_id == row.last_event_id:  # applied already: publish its event again
                applied.events.append((change.position, edit_change(row, m.event_id, m.tenant_id)))
            else:
                CHANGES_SKIPPED.labels(m.kind, STALE).inc()
            continue
        if reason := m.change_timing_problem(window_seconds, now_ms):
            applied.rejected.append(Rejected(record, reason))
            continue
        changed_at = id_time(m.event_id)
        if m.kind == "delete":
            deleted = replace(row, deleted_at=changed_at, envelope=b"")
            rows[pair] = RowForChange(deleted, None)
            applied.deletes.append((change, deleted))
            continue
        assert m.text is not None  # an edit always has text (MessageRecord._fields_of_kind)
        key = keys.current(record, m)
        if key is None:
            continue
        if isinstance(key, Rejected):
            applied.rejected.append(key)
            continue
        # The row as the previous change left it (an earlier edit of this batch: its envelope,
        # sealed above, opens). A sender's deletion is not checked: it removes the row.
        if problem := keys.row_problem(m, row):
            applied.rejected.append(Rejected(record, problem))
            continue
        started = time.perf_counter()
        revision = row.revision + 1
        # The row's own sender (checked equal above) and the message id's time: only the
        # revision changes, so the new envelope opens with the edited row's context and an
        # older revision's envelope written back into the row does not.
        envelope = seal(
            m.text.encode("utf-8"),
            key,
            MessageContext(
                m.chat_id, m.message_id, row.sender_id, revision, id_millis(m.message_id)
            ),
        )
        crypto_seconds += time.perf_counter() - started
        write = EditWrite(
            chat_id=m.chat_id,
            message_id=m.message_id,
            envelope=envelope,
            dek_version=key.version,
            revision=revision,
            edited_at=changed_at,
            event_id=m.event_id,
            timestamp=current.edit_timestamp(m.event_id),
        )
        edited = replace(
            row,
            envelope=envelope,
            dek_version=key.version,
            revision=revision,
            edited_at=changed_at,
            last_event_id=m.event_id,
        )
        rows[pair] = RowForChange(edited, write.timestamp)
        applied.edits.append((change, write, edited))
    _CRYPTO.inc(crypto_seconds)
    return applied


_SHADOW_ROUNDS = 3  # a history re-encryption job landing again between read and rewrite


def _rewrite_shadowed_edits(
    sink: MessageSink, writes: Sequence[EditWrite], refused: dict[int, str]
) -> None:
    """Write again, just above, each edit that a conditional write of history re-encryption
    shadowed: one made between the edit's read of the row and its write lands at Cassandra's
    clock, above the edit's timestamp (its id's time when the record waited in Kafka), and its
    envelope (the previous revision, re-sealed) would win over the edit's while the revision
    column stays the edit's: a row that opens no more. Read back, such a row holds this edit's
    `last_event_id` (the job writes no such column) but another envelope. Raises
    `StoreUnavailable` (retriable) if the job keeps landing in between."""
    last = {(w.chat_id, w.message_id): w for w in writes if w.event_id not in refused}
    for _ in range(_SHADOW_ROUNDS):
        if not last:
            return
        rows = sink.rows_for_change(set(last))
        again = []
        for pair, write in last.items():
            current = rows.get(pair)
            if (
                current is not None
                and current.row.deleted_at is None
                and current.row.last_event_id == write.event_id
                and current.row.envelope != write.envelope
                and current.envelope_written is not None
            ):
                again.append(replace(write, timestamp=current.envelope_written + 1))
        if not again:
            return
        still = sink.write_edits(again)
        last = {(w.chat_id, w.message_id): w for w in again if w.event_id not in still}
    raise StoreUnavailable("an edited row kept being re-sealed by history re-encryption")


def store_batch(
    records: Sequence[RawRecord],
    keys: KeySource,
    sink: MessageSink,
    states: ChatStates | None = None,
    edit_window_seconds: int = _DEFAULT_WINDOW,
    objects: AttachmentObjects | None = None,
) -> StoredBatch:
    """One batch: seal every valid post and write them all, then apply the batch's edits and
    sender deletions in record order (one row read per message changed).

    Once the rows are written, the messages sealed per DEK version (posts and edits) are
    counted, which rotates a chat whose current version reached the rotation policy's message
    limit. Raises `StoreUnavailable` / KMS outages / `ObjectStoreError` (retriable: the whole
    batch is retried, and every write in it is idempotent). Without `objects`, a sender's
    deletion marks its attachments deleted but leaves their objects (tests of the logic alone).
    """
    sealed = seal_batch(records, keys, states)
    started = time.perf_counter()
    refused = sink.write_many(sealed.stored)
    store_seconds = time.perf_counter() - started
    rejected = sealed.rejected
    rejected += [Rejected(sealed.source[r.message_id].record, r.reason) for r in refused]
    refused_ids = {r.message_id for r in refused}
    written_rows = [m for m in sealed.stored if m.message_id not in refused_ids]
    events = [
        (sealed.position[m.message_id], post_change(m, sealed.source[m.message_id].tenant_id))
        for m in written_rows
    ]
    usage = Tally((m.chat_id, m.dek_version) for m in written_rows)
    shared_at = datetime.now(UTC)
    for m in written_rows:
        if m.attachment_ids:
            # Sent: readable by the chat and never swept as a draft. The gateway did it before
            # publishing; a direct producer's post only gets it here. Idempotent (redelivery).
            sink.share_attachments(m.chat_id, m.attachment_ids, shared_at, m.message_id)
    if sealed.changes:
        # After the posts: an edit of a message posted earlier in this batch finds its row.
        rows = sink.rows_for_change(
            {(c.message.chat_id, c.message.message_id) for c in sealed.changes}
        )
        applied = _check_changes(
            sealed.changes,
            rows,
            sealed.keys,
            edit_window_seconds,
            int(datetime.now(UTC).timestamp() * 1000),
        )
        rejected += applied.rejected
        events += applied.events
        started = time.perf_counter()
        refused_edits = sink.write_edits([write for _, write, _ in applied.edits])
        _rewrite_shadowed_edits(sink, [w for _, w, _ in applied.edits], refused_edits)
        for _, deleted in applied.deletes:
            # The admin deletion's marker (envelope dropped at DELETION_TIMESTAMP: no replay of
            # the post or of an edit brings it back), dated with the deletion's id time.
            assert deleted.deleted_at is not None
            for file_id in deleted.attachment_ids:  # first: a failure leaves the message live
                if not sink.release_attachment(deleted.chat_id, file_id, deleted.message_id):
                    continue  # another message still names the file: it stays
                sink.mark_attachment_deleted(deleted.chat_id, file_id, deleted.deleted_at)
                if objects is not None:
                    objects.delete(object_key(deleted.chat_id, file_id))
            sink.mark_deleted(deleted.chat_id, deleted.message_id, deleted.deleted_at)
        store_seconds += time.perf_counter() - started
        # A refused edit (Cassandra will not take the row) leaves the row as it was; a later
        # edit of the same message in this batch was sealed on top of it and still applies.
        for change, write, edited in applied.edits:
            if write.event_id in refused_edits:
                rejected.append(Rejected(change.record, refused_edits[write.event_id]))
                continue
            usage[(write.chat_id, write.dek_version)] += 1
            events.append(
                (change.position, edit_change(edited, write.event_id, change.message.tenant_id))
            )
        for change, deleted in applied.deletes:
            assert change.message.event_id is not None
            events.append(
                (
                    change.position,
                    delete_change(deleted, change.message.event_id, change.message.tenant_id),
                )
            )
    _STORE.inc(store_seconds)
    _KEY_LOOKUP.inc(sealed.keys.lookup_seconds)
    if usage:
        keys.record_usage(dict(usage))
    events.sort(key=lambda event: event[0])
    return StoredBatch(rejected, [event for _, event in events])


def encrypt_and_store(
    records: Sequence[RawRecord],
    keys: KeySource,
    sink: MessageSink,
    states: ChatStates | None = None,
    edit_window_seconds: int = _DEFAULT_WINDOW,
) -> list[Rejected]:
    """`store_batch` for callers that publish no change events: the dead letters only."""
    return store_batch(records, keys, sink, states, edit_window_seconds).rejected
