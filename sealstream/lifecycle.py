"""Key and data lifecycle operations: chat deletion (crypto-shredding), message deletion,
rewrapping every DEK after a master-key rotation, policy rotation, retention and re-encryption
of a chat's history to its newest DEK version.

Chat deletion works across every store, in the order that makes the chat unreadable first.

1. Crypto-shred: destroy every DEK version (Postgres), evict it from Redis and from every process.
   From here on the chat's envelopes cannot be opened by anyone, whatever else survives, and both
   workers refuse the chat's records (sealstream.deletion_state). The message topic's end
   offsets at this moment are the deletion point.
2. Delete the chat's documents from the search index (tokens are not encrypted).
3. Delete the chat's Cassandra partitions (the ciphertext, now useless, is also removed), with
   tombstones no later write can overwrite (adapters/cassandra.py), so rows in flight vanish too.
4. Delete the chat's attachments: their rows (partition tombstones, like the messages), every
   object under the chat's prefix in the object store (listed, so an object whose row was never
   written goes too) and every incomplete multipart upload under it.
5. Sweep: wait until both workers committed past the deletion point, then delete the chat's
   documents again (what a worker indexed after reading the chat's state just before the shred),
   and the chat's objects and incomplete uploads again (an upload that completed meanwhile).
Each step is idempotent, so a failed deletion is finished by running it again.

An upload in flight during the deletion (the gateway encrypts under a DEK it read before the
shred) is settled by `settle_upload`, which the upload path calls after `AttachmentFiles.store`
returned: its row is already shadowed by the partition tombstones, and the check of the chat's
state comes after its object was complete. The deletion marks the chat deleted (step 1) before
it lists the prefix (steps 4 and 5), so either the listing sees the object, or the upload's
check sees the chat deleted and deletes the object itself. Both lose nothing if the other also
ran. Even an object that survived both (the store failed) cannot be decrypted: its DEK version
was destroyed in step 1, and `delete_chat` run again removes it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from schemas.ids import first_id_at, id_millis
from sealstream.adapters.cassandra import AttachmentRow, MessageStore, StoredMessage
from sealstream.adapters.object_store import ObjectNotFound, ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import AuditRecord
from sealstream.adapters.redis import WrappedDek
from sealstream.adapters.vault import TransitKms
from sealstream.attachments import chat_prefix, object_key
from sealstream.crypto import FORMAT_VERSION, envelope_format, open_envelope, seal
from sealstream.errors import KeyNotFound
from sealstream.keys.service import KeyService, kms_context

# Rows may carry a timestamp a little ahead of the chat's creation (clock skew between gateways).
_SKEW = timedelta(minutes=10)


def _chat_span(created_at: datetime) -> tuple[int, int]:
    """The times (ms) a chat's rows can carry: from its creation to now, widened by clock skew."""
    return (
        int((created_at - _SKEW).timestamp() * 1000),
        int((datetime.now(UTC) + _SKEW).timestamp() * 1000),
    )


def policy_cutoff(max_age_days: float | None) -> datetime:
    """The `rotate_due` cutoff for a maximum DEK age: 0 rotates every chat, None none by age
    (only by message count)."""
    if max_age_days is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return datetime.now(UTC) - timedelta(days=max_age_days)


class WorkerProgress(Protocol):
    """How far the workers got: a position on the message topic, and whether every worker group
    has committed past one (adapters/kafka.py `ConsumerGroupsProgress`)."""

    def position(self) -> dict[int, int]: ...

    def passed(self, position: dict[int, int]) -> bool: ...


@dataclass(frozen=True)
class ShredReceipt:
    chat_id: uuid.UUID
    dek_versions_destroyed: list[int]
    index_documents_deleted: int  # both passes: before and after the workers' sweep point
    rows_deleted: int
    seconds: float
    # True once both workers were seen past the deletion point and the sweep ran after that;
    # False: a worker group did not get there in time (or none was given): run the deletion
    # again once the workers have caught up, it is idempotent.
    sweep_completed: bool = False
    attachment_rows_deleted: int = 0  # attachment metadata rows (deleted ones included)
    # Objects removed from the store under the chat's prefix (both passes; 0 without a store),
    # and the incomplete multipart uploads under it aborted (uploads cut off or in flight).
    attachment_objects_deleted: int = 0
    incomplete_uploads_aborted: int = 0


def _remove_chat_objects(objects: ObjectStore, chat_id: uuid.UUID) -> tuple[int, int]:
    """Delete every object and abort every multipart upload under the chat's prefix; returns
    (objects deleted, uploads aborted). Uploads of any age: the chat is gone, so an upload
    still running can only produce an object that must not exist (its next part or its
    completion fails; its parts sent after the abort are removed by its own failure path)."""
    prefix = chat_prefix(chat_id)
    deleted = objects.delete_prefix(prefix)
    # `now` ahead by the skew allowance: S3Proxy's clock may run ahead of ours.
    aborted = objects.abort_incomplete(timedelta(0), prefix=prefix, now=datetime.now(UTC) + _SKEW)
    return deleted, len(aborted)


class ChatStateSource(Protocol):
    """The chat's key state (`KeyService.chat`)."""

    def chat(self, chat_id: uuid.UUID) -> Any: ...


def settle_upload(keys: ChatStateSource, objects: ObjectStore, row: AttachmentRow) -> bool:
    """The upload path's half of chat deletion (module docstring): call it after
    `AttachmentFiles.store` returned `row`. If the chat was deleted meanwhile (or is unknown
    now), delete the object just written and return False: the upload must then answer as for a
    deleted chat (410), not 201. True: the chat is live, the file stands.

    Reads the state from Postgres (the source of truth, not a cache) so that a deletion which
    marked the chat deleted before this read is always seen. Raises `ObjectStoreError` if the
    object cannot be deleted (the row is shadowed and the DEK destroyed anyway; the deletion's
    next run removes it), `StoreUnavailable` if Postgres cannot be read.
    """
    chat = keys.chat(row.chat_id)
    if chat is not None and chat.state != "deleted":
        return True
    objects.delete(row.object_key)
    return False


def delete_chat(
    keys: KeyService,
    index: SearchIndex,
    store: MessageStore,
    chat_id: uuid.UUID,
    reason: str,
    workers: WorkerProgress | None = None,
    sweep_seconds: float = 60.0,
    objects: ObjectStore | None = None,
) -> ShredReceipt:
    """Crypto-shred a chat and remove its documents, rows and attachments (metadata rows; with
    `objects`, every object and incomplete upload under the chat's prefix), including those in
    flight.

    With `workers`, waits (at most `sweep_seconds`) until both worker groups committed past the
    topic position taken right after the shred, then deletes the chat's documents once more:
    every record below that position was written (or refused) before the commit, and every
    batch read after the shred refuses the chat. Cassandra needs no second pass: rows written
    after its deletion are shadowed by it. The object store gets one (after the wait, or at
    once without `workers`): objects of uploads that completed meanwhile.

    Raises `KeyNotFound` (no such chat), `StoreUnavailable`, `ObjectStoreError`: run it again.
    """
    started = time.monotonic()
    chat = keys.chat(chat_id)
    if chat is None:
        raise KeyNotFound(f"chat {chat_id} does not exist")
    destroyed = keys.delete_chat(chat_id, reason)
    point = workers.position() if workers is not None else None
    documents = index.delete_chat(chat_id)
    span = _chat_span(chat.created_at)
    rows = store.delete_chat(chat_id, *span)
    attachment_rows = store.delete_chat_attachments(chat_id, *span)
    deleted = aborted = 0
    if objects is not None:
        deleted, aborted = _remove_chat_objects(objects, chat_id)
    swept = False
    if workers is not None and point is not None:
        deadline = time.monotonic() + sweep_seconds
        while not (swept := workers.passed(point)) and time.monotonic() < deadline:
            time.sleep(0.25)
        documents += index.delete_chat(chat_id)  # also when not passed: removes what it can
    if objects is not None:
        more_deleted, more_aborted = _remove_chat_objects(objects, chat_id)
        deleted, aborted = deleted + more_deleted, aborted + more_aborted
    return ShredReceipt(
        chat_id,
        destroyed,
        documents,
        rows,
        time.monotonic() - started,
        sweep_completed=swept,
        attachment_rows_deleted=attachment_rows,
        attachment_objects_deleted=deleted,
        incomplete_uploads_aborted=aborted,
    )


@dataclass(frozen=True)
class RewrapReport:
    kms_key_name: str
    master_key_version: int
    examined: int
    rewrapped: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.rewrapped / self.seconds if self.seconds else 0.0


def rewrap_all(
    keys: KeyService,
    kms: TransitKms,
    kms_key_name: str,
    batch_size: int = 200,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapReport:
    """Rewrap every live DEK of a master key to its newest version (after `rotate_master_key`).

    Uses Transit's batch rewrap: plaintext DEKs never leave the KMS. Idempotent and resumable:
    a DEK already wrapped by the newest version is skipped, and a DEK shredded meanwhile is left
    alone (the update is conditional on the old value). Redis gets the new wrapped values so that
    old master-key versions can then be retired without breaking cached entries.
    """
    started = time.monotonic()
    latest = kms.latest_version(kms_key_name)
    current_prefix = f"vault:v{latest}:"
    examined = rewrapped = 0
    after = 0
    while True:
        page = keys.repo.wrapped_page(kms_key_name, after, batch_size)
        if not page:
            break
        after = page[-1][0]
        examined += len(page)
        todo = [row for row in page if not row[3].startswith(current_prefix)]
        if todo:
            fresh = kms.rewrap_batch(
                kms_key_name, [(wrapped, kms_context(chat, v)) for _, chat, v, wrapped in todo]
            )
            rewrapped += keys.repo.replace_wrapped(
                [(row_id, old, new) for (row_id, _, _, old), new in zip(todo, fresh, strict=True)],
                AuditRecord(keys.actor, "dek_rewrapped", f"master key v{latest}"),
            )
            for (_, chat, version, _), new in zip(todo, fresh, strict=True):
                if keys.redis is not None:
                    keys.redis.set_wrapped(chat, version, WrappedDek(new, kms_key_name))
        if progress is not None:
            progress(examined, rewrapped)
    return RewrapReport(kms_key_name, latest, examined, rewrapped, time.monotonic() - started)


@dataclass(frozen=True)
class MasterKeyReport:
    tenant_id: str
    kms_key_name: str
    master_key_version: int
    examined: int
    rewrapped: int
    old_versions_retired: bool
    seconds: float


def rotate_master_key(
    keys: KeyService,
    tenant_id: str,
    retire_old: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MasterKeyReport:
    """Rotate a tenant's master key on its own KMS, rewrap every stored DEK to the new version,
    and (with `retire_old`) stop the old versions from decrypting. Resumable: run it again and
    the rewrap finishes what is left (a second rotation is harmless too)."""
    started = time.monotonic()
    tenant = keys.repo.tenant(tenant_id)
    if tenant is None:
        raise KeyNotFound(f"unknown tenant '{tenant_id}'")
    kms = keys.kms_for(tenant.region, tenant_id)
    assert isinstance(kms, TransitKms)  # rotation and rewrap are Transit operations
    version = kms.rotate_master_key(tenant.kms_key_name)
    report = rewrap_all(keys, kms, tenant.kms_key_name, progress=progress)
    if retire_old:
        kms.set_min_decryption_version(tenant.kms_key_name, version)
    return MasterKeyReport(
        tenant_id,
        tenant.kms_key_name,
        version,
        report.examined,
        report.rewrapped,
        retire_old,
        time.monotonic() - started,
    )


@dataclass(frozen=True)
class MessageDeletion:
    """What `delete_message` did. `found`: the message was live and is deleted now (False: not
    stored, or deleted before). `attachments_deleted`: attachment rows it references (and no
    other message does) marked deleted by this call; `attachment_objects_deleted`: their objects found and deleted (also
    when the message was deleted before: a failed call's objects are finished)."""

    found: bool
    attachments_deleted: int = 0
    attachment_objects_deleted: int = 0


def delete_attachments(
    store: MessageStore,
    objects: ObjectStore | None,
    chat_id: uuid.UUID,
    file_ids: tuple[int, ...],
    when: datetime,
    message_id: int,
) -> tuple[int, int]:
    """Mark a deleted message's attachments deleted (the reader answers 404 from then on) and,
    with `objects`, delete their objects; returns (rows marked, objects deleted). Idempotent: a
    row already marked keeps its first date, a missing object is skipped. Raises
    `StoreUnavailable`, `ObjectStoreError`. A file another message (than `message_id`, being
    deleted) still references is left alone."""
    marked = removed = 0
    for file_id in file_ids:
        if not store.release_attachment(chat_id, file_id, message_id):
            continue
        row = store.attachment(chat_id, file_id)
        if row is not None and row.deleted_at is None:
            store.mark_attachment_deleted(chat_id, file_id, when)
            marked += 1
        if objects is not None:
            key = object_key(chat_id, file_id)
            try:
                objects.head(key)
            except ObjectNotFound:
                continue
            objects.delete(key)
            removed += 1
    return marked, removed


def delete_message(
    store: MessageStore,
    index: SearchIndex,
    chat_id: uuid.UUID,
    message_id: int,
    announce: Callable[[StoredMessage, datetime], None] | None = None,
    objects: ObjectStore | None = None,
) -> MessageDeletion:
    """Hide a message from reads at once, drop its envelope and replace its search document by a
    tombstone; both writes win over any later redelivery of the message's record. The
    attachments it references are marked deleted and (with `objects`) their objects deleted,
    before the message's own marker, so a failure leaves the message to delete again (this
    function, run again, finishes the attachments of a message already deleted too).
    `found` is False for a message not stored (unknown, or not yet written by the encryptor)
    or already deleted.

    `announce(row, deleted_at)` is called after the deletion was written (the admin API publishes
    a delete change event with it, for live delivery); its failure propagates (the deletion
    stands; a client that missed the event finds it on resume by `deleted_at`).
    """
    row = store.get(chat_id, message_id)
    if row is None:
        return MessageDeletion(False)
    found = row.deleted_at is None
    when = datetime.now(UTC)
    marked, removed = delete_attachments(
        store, objects, chat_id, row.attachment_ids, when, message_id
    )
    if found:
        store.mark_deleted(chat_id, message_id, when)
    index.delete_message(chat_id, message_id)  # again if already deleted: finishes a failed call
    if found and announce is not None:
        announce(row, when)
    return MessageDeletion(found, marked, removed)


@dataclass(frozen=True)
class RotationReport:
    cutoff: datetime
    rotated: int
    seconds: float


def rotate_due(
    keys: KeyService,
    cutoff: datetime,
    rate_per_second: float = 50.0,
    reason: str = "policy",
    progress: Callable[[int], None] | None = None,
    tenant_id: str | None = None,
    max_messages: int | None = None,
) -> RotationReport:
    """Rotate every active chat whose current DEK became valid before `cutoff`, or (with
    `max_messages`) has sealed that many messages.

    The seed's "batch key rotation": `cutoff = now - max_age` rotates by age; `cutoff = now`
    rotates every chat. Rate-limited so the KMS is not flooded. Resumable and idempotent: run it
    again with the same cutoff and the chats already rotated (their new DEK is newer than the
    cutoff) are skipped.
    """
    started = time.monotonic()
    interval = 1.0 / rate_per_second if rate_per_second > 0 else 0.0
    next_at = time.monotonic()
    rotated = 0
    after: uuid.UUID | None = None
    while True:
        page = keys.repo.chats_due(cutoff, after, 200, tenant_id, max_messages)
        if not page:
            break
        after = page[-1][0]
        for chat_id, version in page:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())
            if keys.rotate(chat_id, reason, only_if_version=version) != version:
                rotated += 1
            if progress is not None:
                progress(rotated)
    return RotationReport(cutoff, rotated, time.monotonic() - started)


@dataclass(frozen=True)
class RetentionReport:
    chats: int
    rows_deleted: int
    index_documents_deleted: int
    dek_versions_destroyed: int
    seconds: float
    attachment_rows_deleted: int = 0
    attachment_objects_deleted: int = 0  # 0 without an object store


def _live_attachment_versions(
    store: MessageStore, chat_id: uuid.UUID, created_at: datetime
) -> set[int]:
    """The DEK versions the chat's live (not deleted) attachments are encrypted under."""
    return {
        row.dek_version
        for row in store.chat_attachments(chat_id, *_chat_span(created_at))
        if row.deleted_at is None
    }


def _expired_file(prefix: str, first_kept: int) -> Callable[[str], bool]:
    """Whether an object key under `prefix` is a file whose id is below `first_kept`; keys that
    are not `<prefix><decimal id>` are never taken for expired."""

    def expired(key: str) -> bool:
        name = key[len(prefix) :]
        return name.isdigit() and int(name) < first_kept

    return expired


def apply_retention(
    keys: KeyService,
    index: SearchIndex,
    store: MessageStore,
    now: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    objects: ObjectStore | None = None,
) -> RetentionReport:
    """Remove messages and attachments past their chat's retention, then destroy DEK versions
    no message and no live attachment uses.

    A message's time is in its id, the one clock of record: expired rows are one range deletion
    per partition, and expired documents those with a smaller message id (never by the producer's
    `sent_at`, which can be days off either way, so history and search always agree). A DEK
    version is destroyed only if it was retired well before the cutoff (clock skew and the
    encryptors' pointer TTL allowed for), so that no remaining message can depend on it (seed 5.3).

    Attachments expire by their file id's time in the same way: rows by range deletions, and
    (with `objects`) every object under the chat's prefix whose file id is expired, listed, so an
    object whose row was never written (an upload cut off between object and row) goes too. The
    time rule holds for a file as for a message (its key is the chat's current one when its id
    is assigned), and as a second guard no version a live attachment is encrypted under is
    destroyed. Raises `StoreUnavailable`, `ObjectStoreError`: run it again (idempotent).
    """
    started = time.monotonic()
    now = now or datetime.now(UTC)
    margin = _SKEW + timedelta(seconds=keys.settings.pointer_ttl_seconds)
    chats = rows = documents = versions = attachment_rows = attachment_objects = 0
    for chat_id, days, created_at in keys.repo.chats_with_retention():
        cutoff = now - timedelta(days=days)
        cutoff_ms = int(cutoff.timestamp() * 1000)
        oldest_ms, _ = _chat_span(created_at)
        chat_rows = chat_files = chat_objects = 0
        first_kept = first_id_at(cutoff_ms)
        if cutoff_ms > oldest_ms:
            chat_rows = store.delete_older_than(chat_id, oldest_ms, cutoff_ms, first_kept)
            chat_files = store.delete_attachments_older_than(
                chat_id, oldest_ms, cutoff_ms, first_kept
            )
        if objects is not None:  # rows first: the reader answers 404 before the bytes go
            prefix = chat_prefix(chat_id)
            chat_objects = objects.delete_prefix(
                prefix, keep=_not(_expired_file(prefix, first_kept))
            )
        chat_documents = index.delete_chat(chat_id, before_id=first_kept)
        in_use = _live_attachment_versions(store, chat_id, created_at)
        # Audited with the destruction, in one transaction; also when only data was removed.
        destroyed = keys.destroy_retired(
            chat_id,
            cutoff - margin,
            "retention",
            f"{days} days: {chat_rows} rows, {chat_documents} documents, "
            f"{chat_files} attachments, {chat_objects} objects",
            below_version=min(in_use) if in_use else None,
            audit_if_none=bool(chat_rows or chat_documents or chat_files or chat_objects),
        )
        chats += 1
        if progress is not None:
            progress(chats)
        rows += chat_rows
        documents += chat_documents
        versions += len(destroyed)
        attachment_rows += chat_files
        attachment_objects += chat_objects
    return RetentionReport(
        chats,
        rows,
        documents,
        versions,
        time.monotonic() - started,
        attachment_rows,
        attachment_objects,
    )


@dataclass(frozen=True)
class DraftSweep:
    """What `sweep_drafts` did: chats looked at, unsent uploads marked deleted, their objects
    deleted."""

    chats: int
    drafts_deleted: int
    objects_deleted: int


def sweep_drafts(
    keys: KeyService,
    store: MessageStore,
    objects: ObjectStore,
    older_than: timedelta,
    chats: Collection[uuid.UUID] | None = None,
    now: datetime | None = None,
) -> DraftSweep:
    """Delete attachments no message referenced (`shared_at` unset) whose id is older than
    `older_than`: an upload is a draft until sent, and one never sent would otherwise stay
    until its chat's deletion or retention. Each is marked deleted (the reader answers 404)
    before its object is deleted. Every active chat, or only `chats`. Idempotent; raises
    `StoreUnavailable`, `ObjectStoreError` (run it again).

    A message accepted by the gateway in the instant between its reference check and this
    sweep's mark may name a file the sweep removes (then a 404 for that file): only files
    unsent for `older_than` are at stake."""
    now = now or datetime.now(UTC)
    cutoff_ms = int((now - older_than).timestamp() * 1000)
    wanted = None if chats is None else set(chats)
    looked = drafts = removed = 0
    for chat_id, created_at in keys.repo.active_chats():
        if wanted is not None and chat_id not in wanted:
            continue
        looked += 1
        oldest_ms, _ = _chat_span(created_at)
        if cutoff_ms <= oldest_ms:
            continue
        for row in list(store.chat_attachments(chat_id, oldest_ms, cutoff_ms)):
            if row.deleted_at is not None or row.shared_at is not None:
                continue
            if id_millis(row.file_id) >= cutoff_ms:
                continue  # the scan covers whole buckets: newer files come with it
            store.mark_attachment_deleted(chat_id, row.file_id, now)
            drafts += 1
            try:
                objects.head(row.object_key)
            except ObjectNotFound:
                continue
            objects.delete(row.object_key)
            removed += 1
    return DraftSweep(looked, drafts, removed)


def _not(predicate: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda value: not predicate(value)


@dataclass(frozen=True)
class ReencryptReport:
    chat_id: uuid.UUID
    dek_version: int
    rows_examined: int
    rows_reencrypted: int
    dek_versions_destroyed: list[int]
    seconds: float
    # Old versions kept because live attachments are encrypted under them (files are not
    # re-encrypted: their versions stay until the files are deleted or expire).
    dek_versions_kept_for_attachments: list[int] = field(default_factory=list)


def reencrypt_chat(
    keys: KeyService,
    store: MessageStore,
    chat_id: uuid.UUID,
    retire: bool = True,
    batch_size: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> ReencryptReport:
    """Re-seal every message of a chat still under an older DEK version, or still in an older
    envelope format (v1), with the active version in the current format (v2).

    The v1 -> v2 upgrade binds what the row holds when the job runs (sender, revision, creation
    time): v1 never bound them, so the job cannot tell a sender rewritten before the upgrade.
    Each row is replaced in place by a conditional write (same message id, new envelope and
    version, only if the row still holds the envelope that was opened), so readers see either the
    old or the new envelope, never a missing message, and a message deleted or changed meanwhile
    is left alone. Idempotent and resumable: rows already at the active version and format are
    skipped, so an interrupted job is finished by running it again.

    Attachment files are not re-encrypted (a file can be hundreds of MiB, and its object would
    have to be rewritten): the old versions a live attachment of the chat is encrypted under are
    kept (`dek_versions_kept_for_attachments`), so every file stays readable; they go once
    their files are deleted or expire, by retention or by this job run again.

    With `retire`, the old versions are then destroyed, provided no row still uses them and they
    were retired long enough before the scan began that no encryptor can still be writing with
    them (twice the pointer TTL: one to learn of the rotation, one for a write in flight), by
    the database's clock. A version retired more recently is kept: run the job again later.
    """
    started = time.monotonic()
    scan_started = keys.repo.db_now()
    chat = keys.chat(chat_id)
    active = keys.repo.active_dek(chat_id)
    if chat is None or active is None:
        raise KeyNotFound(f"chat {chat_id} does not exist or has no active DEK")
    target = keys.key(chat_id, active.dek_version)
    examined = changed = left = 0
    pending: list[tuple[StoredMessage, int, bytes]] = []

    def flush() -> None:
        nonlocal changed, left
        done = store.reseal_many(pending)
        changed += done
        left += len(pending) - done
        pending.clear()
        if progress is not None:
            progress(examined, changed)

    for row in store.scan_chat(chat_id, *_chat_span(chat.created_at)):
        examined += 1
        if row.dek_version >= target.version and envelope_format(row.envelope) == FORMAT_VERSION:
            continue
        context = row.context()  # opened and re-sealed for the same sender, revision and time
        plaintext = open_envelope(row.envelope, keys.key(chat_id, row.dek_version), context)
        pending.append((row, target.version, seal(plaintext, target, context)))
        if len(pending) >= batch_size:
            flush()
    flush()
    destroyed: list[int] = []
    reason = f"{changed} of {examined} rows re-sealed"
    in_use = _live_attachment_versions(store, chat_id, chat.created_at)
    kept = sorted(v for v in in_use if v < target.version)
    if retire and left == 0:
        margin = timedelta(seconds=2 * keys.settings.pointer_ttl_seconds)
        # The old versions' destruction and its audit row commit together.
        destroyed = keys.destroy_retired(
            chat_id,
            scan_started - margin,
            "history_reencrypted",
            reason + (f"; versions {kept} kept for attachments" if kept else ""),
            below_version=min([target.version, *kept]),
        )
    else:
        keys.repo.audit(keys.actor, "history_reencrypted", chat_id, target.version, reason)
    return ReencryptReport(
        chat_id,
        target.version,
        examined,
        changed,
        destroyed,
        time.monotonic() - started,
        dek_versions_kept_for_attachments=kept,
    )
