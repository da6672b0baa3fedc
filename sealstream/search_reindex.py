"""The blind index's re-index: re-key every search document of a tenant under its newest index
key, after the blind index was turned on (documents hold plain words) or the key was rotated.

`sealstream search reindex --tenant T` (or the admin API, which starts it after the change).
The texts come from Cassandra (opened with the chats' DEKs, in memory only), are analysed like
the indexer does, keyed under the target version and written over the old document at external
version `reindex_version(target)`: above the indexer's 1 and any earlier re-index, below the
deletion tombstone's 2^62, so a message deleted meanwhile stays deleted. An edited message's
document is at its last edit's event id (indexer/logic.py): it is written at the row's
`last_event_id` with `external_gte`, replacing that edit's document but never a newer edit's. Search keeps working
throughout: queries use every live key version (and plain words while turning on).

Steps, each resumable (progress in Postgres, `search_reindex`):
1. every active chat of the tenant in chat-id order; after each chat its id is saved, so a
   restarted job goes on from the next chat (a chat half done is redone: idempotent);
2. wait until every process uses the target version (twice the index-key cache TTL after the
   change), then sweep: the index is asked for the tenant's documents not yet keyed with the
   target (written by an indexer still on the old key, or of chats made meanwhile) and each is
   re-keyed from its row;
3. in one transaction with its audit row: destroy the older key versions (wrapped key erased),
   set the tenant's blind index 'on', mark the job done;
4. purge the overwritten versions from the data folder: OpenSearch keeps each old document
   (plain words, or tokens of the old key) as a soft delete, in segments and translog, until
   its shard's retention lease moves past it (~30 s); then a flush and an expunge-deletes
   merge drop them (`SearchIndex.purge_history`). Without this a leak of the data folder
   taken soon after turning the blind index on would still show the words indexed before.
One process at a time per tenant (a Postgres advisory lock held by the job's connection).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from schemas.ids import id_time
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import (
    IndexedMessage,
    SearchIndex,
    document_terms,
    reindex_version,
)
from sealstream.adapters.postgres import AuditRecord
from sealstream.crypto import IndexKey, open_envelope
from sealstream.errors import DecryptionError, KeyDestroyed, SealstreamError
from sealstream.keys.index_keys import IndexKeys, keyed_terms
from sealstream.keys.service import KeyService
from sealstream.lifecycle import _chat_span

log = logging.getLogger(__name__)

Progress = Callable[..., None]


class ReindexBusy(SealstreamError):
    """Another process is re-indexing this tenant right now."""


@dataclass(frozen=True)
class ReindexReport:
    tenant_id: str
    target_version: int
    completed: bool  # False: documents of messages not (yet) in the store block it; run again
    chats: int
    messages: int
    swept: int
    orphans_removed: int
    index_key_versions_destroyed: list[int]
    history_purged: bool  # False: old versions may still be in the data folder; run it again
    seconds: float


def reindex_tenant(
    index_keys: IndexKeys,
    keys: KeyService,
    store: MessageStore,
    index: SearchIndex,
    tenant_id: str,
    batch_size: int = 200,
    progress: Progress | None = None,
    orphan_age: timedelta = timedelta(hours=1),
    sweep_rounds: int = 30,
    purge_seconds: float = 300.0,
) -> ReindexReport:
    """Run (or resume) the tenant's re-index to completion; see the module docstring.

    `progress(**counters)` is called after each chat and sweep round. Raises `ReindexBusy` if
    another process holds the tenant's job, retriable errors (`StoreUnavailable`,
    `KmsUnavailable`) when a server is down (run it again: it resumes)."""
    started = time.monotonic()
    repo = index_keys.repo
    with repo.reindex_lock(tenant_id) as taken:
        if not taken:
            raise ReindexBusy(f"tenant '{tenant_id}' is being re-indexed by another process")
        job = repo.reindex_job(tenant_id)
        if job is None or job.state == "done":
            # Done before: only the purge may be left (a run that stopped while waiting for it).
            version = job.target_version if job else 0
            purged = _purge(index, index.history_point(), purge_seconds, progress)
            return ReindexReport(tenant_id, version, True, 0, 0, 0, 0, [], purged, 0.0)
        target = job.target_version
        key = index_keys.key(tenant_id, target)
        writer = _Writer(keys, store, index, key, batch_size)
        chats = messages = 0
        after = job.after_chat
        while page := repo.tenant_chats(tenant_id, after, 100):
            for chat_id, created_at in page:
                done = writer.chat(chat_id, created_at)
                after = chat_id
                chats += 1
                messages += done
                if not repo.record_progress(tenant_id, target, chat_id, 1, done, 0):
                    raise SealstreamError(f"tenant '{tenant_id}': the re-index target changed")
                if progress is not None:
                    progress(phase="chats", chats=job.chats_done + chats, messages=messages)
        # Every process must be keying with the target before the sweep can be the last word.
        settle_until = job.requested_at + timedelta(seconds=2 * index_keys.ttl_seconds)
        while (now := keys.repo.db_now()) < settle_until:
            if progress is not None:
                progress(phase="settling", seconds_left=(settle_until - now).total_seconds())
            time.sleep(min(1.0, (settle_until - now).total_seconds()))
        swept, orphans, complete = _sweep(
            writer, index, tenant_id, target, orphan_age, sweep_rounds, progress
        )
        repo.record_progress(tenant_id, target, after, 0, 0, swept)
        destroyed: list[int] = []
        if complete:
            reason = (
                f"tenant {tenant_id}: re-indexed under index key v{target} "
                f"({chats} chats, {messages} messages, {swept} swept)"
            )
            destroyed = repo.finish_reindex(
                tenant_id, target, AuditRecord(index_keys.actor, "index_key_destroyed", reason)
            )
            index_keys.forget(tenant_id)
        purged = complete and _purge(index, index.history_point(), purge_seconds, progress)
        return ReindexReport(
            tenant_id,
            target,
            complete,
            chats,
            messages,
            swept,
            orphans,
            destroyed,
            purged,
            time.monotonic() - started,
        )


def _purge(index: SearchIndex, point: int, seconds: float, progress: Progress | None) -> bool:
    """`purge_history(point)`, waiting up to `seconds` for the retention leases to move."""
    deadline = time.monotonic() + seconds
    while not index.purge_history(point):
        if time.monotonic() >= deadline:
            return False
        if progress is not None:
            progress(phase="purge", waiting_for_retention_lease=True)
        time.sleep(2.0)
    return True


def _sweep(
    writer: _Writer,
    index: SearchIndex,
    tenant_id: str,
    target: int,
    orphan_age: timedelta,
    rounds: int,
    progress: Progress | None,
) -> tuple[int, int, bool]:
    """Re-key the tenant's documents the chat pass missed; (swept, orphans removed, complete).

    A document whose message is not in the store is an orphan: one older than `orphan_age`
    (the encryptor refused its record: nobody can read it) is removed from the index, as is one
    whose row does not open (integrity check failed, key shredded); a younger
    one may be a message the encryptor has not written yet, so the sweep waits for it (one
    second per round) and reports the job incomplete after `rounds` rounds."""
    swept = orphans = 0
    waiting = 0
    previous: set[tuple[uuid.UUID, int]] = set()
    while True:
        stale = index.stale_documents(tenant_id, target)
        if not stale:
            return swept, orphans, True
        if set(stale) == previous:
            # Nothing moved since the last round (messages not stored yet, or documents the
            # index refuses): wait a second per round, then leave it to a later run.
            waiting += 1
            if waiting >= rounds:
                return swept, orphans, False
            time.sleep(1.0)
        previous = set(stale)
        rows: list[StoredMessage] = []
        young = 0
        for chat_id, message_id in stale:
            row = writer.store.get(chat_id, message_id)
            if row is not None and row.deleted_at is None:
                rows.append(row)
            elif datetime.now(UTC) - id_time(message_id) > orphan_age or row is not None:
                index.delete_message(chat_id, message_id)  # deleted or refused: unreadable
                orphans += 1
            else:
                young += 1
        unreadable: list[StoredMessage] = []
        swept += writer.rows(rows, unreadable)
        for row in unreadable:
            # Its row does not open (integrity check failed, key shredded): nobody can read it,
            # so nobody can search it either. Left alone, its document would keep the words it
            # was indexed with (plain, while turning on) and the job would never complete.
            index.delete_message(row.chat_id, row.message_id)
            orphans += 1
        if progress is not None:
            progress(phase="sweep", swept=swept, waiting_for_store=young)


class _Writer:
    """Opens rows, analyses, keys and writes them over the old documents."""

    def __init__(
        self,
        keys: KeyService,
        store: MessageStore,
        index: SearchIndex,
        key: IndexKey,
        batch_size: int,
    ) -> None:
        self.keys = keys
        self.store = store
        self.index = index
        self.key = key
        self.batch_size = batch_size
        self.version = reindex_version(key.version)

    def chat(self, chat_id: uuid.UUID, created_at: datetime) -> int:
        """Re-key every live message of one chat; returns how many were written."""
        done = 0
        batch: list[StoredMessage] = []
        for row in self.store.scan_chat(chat_id, *_chat_span(created_at)):
            batch.append(row)
            if len(batch) >= self.batch_size:
                done += self.rows(batch)
                batch = []
        done += self.rows(batch)
        return done

    def rows(self, rows: list[StoredMessage], unreadable: list[StoredMessage] | None = None) -> int:
        """Re-key `rows`; returns how many were written. Rows that do not open are skipped and
        appended to `unreadable` when given."""
        opened: list[tuple[StoredMessage, str]] = []
        for row in rows:
            try:
                key = self.keys.key(row.chat_id, row.dek_version)
                text = open_envelope(row.envelope, key, row.context()).decode("utf-8")
            except (KeyDestroyed, DecryptionError, UnicodeDecodeError, ValueError, TypeError):
                # Shredded or expired meanwhile, or not genuine: nothing readable to index.
                log.warning(
                    "re-index skipped a message that does not open",
                    extra={"chat_id": str(row.chat_id), "message_id": row.message_id},
                )
                if unreadable is not None:
                    unreadable.append(row)
                continue
            opened.append((row, text))
        if not opened:
            return 0
        analysed = self.index.analyze([text for _, text in opened])
        documents = [
            IndexedMessage(
                message_id=row.message_id,
                chat_id=row.chat_id,
                tenant_id=self.key.tenant_id,
                sender_id=row.sender_id,
                sent_at=row.created_at,
                tokens=keyed_terms(self.key, document_terms(tokens)),
                index_key_version=self.key.version,
                version=row.last_event_id,
            )
            for (row, _), tokens in zip(opened, analysed, strict=True)
        ]
        # An edited message's document is at its last edit's event id (indexer/logic.py), above
        # the re-index's version: it is written at that same version with `external_gte`, which
        # replaces the document of that edit (same text, re-keyed) but never a newer edit's.
        edited = [d for d in documents if d.version is not None]
        refused = self.index.index_many([d for d in documents if d.version is None], self.version)
        refused += self.index.index_many(edited, version_type="external_gte")
        # A chat deleted while we were writing (its rows read before the deletion, its index
        # documents cleared before our write): take back what we wrote. Every write path of the
        # job (chat pass and sweep) comes through here.
        for chat_id in sorted({row.chat_id for row, _ in opened}):
            chat = self.keys.chat(chat_id)
            if chat is not None and chat.state == "deleted":
                self.index.delete_chat(chat_id)
        for item in refused:
            log.warning(
                "re-index: the search index refused a document",
                extra={"message_id": item.message_id, "reason": item.reason},
            )
        return len(documents) - len(refused)
