"""Cassandra adapter: the primary message store of sealed envelopes.

Rows hold the envelope (never plaintext) and the DEK version. Writes are idempotent by
(chat, bucket, message id), so a redelivered record rewrites the same row. A post is written at
its id's time as write timestamp and an edit strictly above the row's (`RowForChange`), so a
replayed post never overwrites a later edit (docs/operations.md, "Edits and sender deletion"). Driver errors that can
heal (no host, timeouts, unavailable replicas) become the retriable `StoreUnavailable`.

Every deletion (a message's marker, a chat's partitions, retention's ranges) is written with the
write timestamp `DELETION_TIMESTAMP`, far above any real clock, so it wins over every write of a
message ever made later with a normal timestamp: a replayed or in-flight record cannot bring an
envelope back, whatever the order in which the writes arrive (docs/operations.md, "Deletion
guarantees", for the limit: tombstones are purged after the table's gc_grace_seconds).
"""

from __future__ import annotations

import struct
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from cassandra import (
    ConsistencyLevel,
    InvalidRequest,
    OperationTimedOut,
    ReadTimeout,
    Unavailable,
    WriteTimeout,
)
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    Session,
    default_lbp_factory,
)
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from schemas.ids import bucket_at, bucket_of, id_millis
from sealstream.crypto import MessageContext
from sealstream.errors import StoreUnavailable
from sealstream.settings import CassandraSettings

_BATCH_ROWS = 100  # rows per single-partition batch (~30 KiB of 200-byte messages)
_DELETED_SLACK = 5  # extra rows per history query, so a few deleted ones need no second query
_TRANSIENT = (NoHostAvailable, OperationTimedOut, ReadTimeout, WriteTimeout, Unavailable)
# Write timestamp (µs) of every deletion: 2^62 µs is year ~148,000, so no clock ever writes
# above it, and still far below Cassandra's limit (2^63 - 1, measured: Cassandra 5 accepts both).
# On equal timestamps a deletion wins over data, so deletions at this timestamp also compose
# (a chat deletion shadows an earlier message deletion's marker).
DELETION_TIMESTAMP = 1 << 62
# Every statement that changes data runs under this execution profile, i.e. at the configured
# write consistency: a write is acknowledged (and the encryptor commits its offsets) only once
# that many replicas have it in their commit log (docs/operations.md, "Durability").
_WRITE = "write"
_REQUEST_TIMEOUT = 10.0
# What makes one row unwritable for good: the server calls the request invalid, or the driver
# cannot encode a value. Anything else (timeouts, overload, lost connections, a permission or
# schema problem) is about the store, not the row, and is retried.
_ROW_REFUSED = (InvalidRequest, TypeError, ValueError, OverflowError, struct.error)


@dataclass(frozen=True)
class RefusedRow:
    """A row Cassandra refused for itself (a retry will not help); `reason` holds no value."""

    message_id: int
    reason: str


def _refusal(exc: BaseException) -> str:
    # Cassandra only ever sees ids and envelopes, so its message cannot quote message text.
    return f"the message store refused the row ({type(exc).__name__}: {str(exc)[:200]})"


@dataclass(frozen=True)
class StoredMessage:
    chat_id: uuid.UUID
    message_id: int
    sender_id: str
    dek_version: int
    envelope: bytes
    created_at: datetime
    edited_at: datetime | None = None
    deleted_at: datetime | None = None
    revision: int = 1  # which revision of the message the envelope holds (1 = as first sent)
    last_event_id: int | None = None  # event id of the last edit applied (None: never edited)
    # Ids of the attachments the message references (schemas/cassandra/005; same chat).
    attachment_ids: tuple[int, ...] = ()

    def context(self) -> MessageContext:
        """What this row says its envelope is bound to (docs/format.md, envelope v2): chat,
        message id, sender, revision and creation time (Unix ms, exact). An envelope opened
        with it fails unless the row's columns are the ones it was sealed for. Raises
        `ValueError` / `TypeError` for a value no envelope can bind (e.g. an empty sender)."""
        return MessageContext(
            chat_id=self.chat_id,
            message_id=self.message_id,
            sender_id=self.sender_id,
            revision=self.revision,
            created_at_ms=(self.created_at - _UNIX_EPOCH) // _MILLISECOND,
        )


_COLUMNS = (
    "chat_id, message_id, sender_id, dek_version, envelope, created_at, edited_at, deleted_at,"
    " revision, last_event_id, attachment_ids"
)


@dataclass(frozen=True)
class RowForChange:
    """A stored row as an edit or a sender's deletion reads it: the row, and the write
    timestamp (µs) of its envelope (None once deleted: the envelope is gone)."""

    row: StoredMessage
    envelope_written: int | None

    def edit_timestamp(self, event_id: int) -> int:
        """The write timestamp (µs) of an edit with id `event_id`: its id's time, or just above
        the envelope's current one if that is later (a row written before posts were written at
        their id's time, or re-encrypted since), so the edit always wins over what it read and
        over any replay of the post, and loses to a deletion (DELETION_TIMESTAMP)."""
        return max(id_millis(event_id) * 1000, (self.envelope_written or 0) + 1)


@dataclass(frozen=True)
class EditWrite:
    """One edit to write: the row's new envelope, DEK version and revision, when it was edited
    (the edit id's time) and the edit's id, at write timestamp `timestamp` (µs)."""

    chat_id: uuid.UUID
    message_id: int
    envelope: bytes
    dek_version: int
    revision: int
    edited_at: datetime
    event_id: int
    timestamp: int


_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def _row(row: Any) -> StoredMessage:
    return StoredMessage(
        chat_id=row.chat_id,
        message_id=row.message_id,
        sender_id=row.sender_id,
        dek_version=row.dek_version,
        envelope=bytes(row.envelope or b""),
        created_at=row.created_at.replace(tzinfo=UTC),
        edited_at=row.edited_at.replace(tzinfo=UTC) if row.edited_at else None,
        deleted_at=row.deleted_at.replace(tzinfo=UTC) if row.deleted_at else None,
        # Rows written before the revision column (schemas/cassandra/002) are revision 1.
        revision=1 if row.revision is None else row.revision,
        last_event_id=row.last_event_id,
        # A row read with a column list that lacks it (or written before it) has none.
        attachment_ids=tuple(getattr(row, "attachment_ids", None) or ()),
    )


@dataclass(frozen=True)
class AttachmentRow:
    """Metadata of one encrypted attachment file (table `attachments`, schemas/cassandra/005).

    `size` is the plaintext size in bytes, `ciphertext_size` what the object store holds
    (`FileLayout(segment_size).ciphertext_size(size)`); `object_key` is where; `dek_version`
    the chat DEK version the file key derives from. `shared_at`: when a message first
    referenced it (None: not sent yet, its uploader's alone; schemas/cassandra/006). Nothing
    here reveals the content."""

    chat_id: uuid.UUID
    file_id: int
    sender_id: str
    size: int
    ciphertext_size: int
    content_type: str
    dek_version: int
    segment_size: int
    object_key: str
    created_at: datetime
    deleted_at: datetime | None = None
    shared_at: datetime | None = None
    # The stored posts that reference it (schemas/cassandra/006); empty for a draft.
    message_ids: frozenset[int] = frozenset()


def _attachment(row: Any) -> AttachmentRow:
    return AttachmentRow(
        chat_id=row.chat_id,
        file_id=row.file_id,
        sender_id=row.sender_id,
        size=row.size,
        ciphertext_size=row.ciphertext_size,
        content_type=row.content_type,
        dek_version=row.dek_version,
        segment_size=row.segment_size,
        object_key=row.object_key,
        created_at=row.created_at.replace(tzinfo=UTC),
        deleted_at=row.deleted_at.replace(tzinfo=UTC) if row.deleted_at else None,
        shared_at=row.shared_at.replace(tzinfo=UTC) if row.shared_at else None,
        message_ids=frozenset(row.message_ids or ()),
    )


class MessageStore:
    def __init__(self, settings: CassandraSettings, concurrency: int = 64) -> None:
        self.settings = settings
        self.keyspace = settings.keyspace
        self.concurrency = concurrency
        self._cluster: Cluster | None = None
        self._session: Session | None = None
        self._prepared: dict[str, PreparedStatement] = {}

    def connect(self) -> None:
        try:
            profiles = {
                EXEC_PROFILE_DEFAULT: ExecutionProfile(
                    consistency_level=ConsistencyLevel.name_to_value[
                        self.settings.read_consistency
                    ],
                    request_timeout=_REQUEST_TIMEOUT,
                    load_balancing_policy=default_lbp_factory(),
                ),
                _WRITE: ExecutionProfile(
                    consistency_level=ConsistencyLevel.name_to_value[
                        self.settings.write_consistency
                    ],
                    request_timeout=_REQUEST_TIMEOUT,
                    load_balancing_policy=default_lbp_factory(),
                ),
            }
            self._cluster = Cluster(
                list(self.settings.hosts),
                port=self.settings.port,
                protocol_version=5,
                connect_timeout=5,
                execution_profiles=profiles,
            )
            self._session = self._cluster.connect()
        except _TRANSIENT as exc:
            raise StoreUnavailable(
                f"Cassandra at {self.settings.hosts}:{self.settings.port} unavailable "
                f"({type(exc).__name__}); is the stack up? `sealstream stack up`"
            ) from None

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("MessageStore.connect() was not called")
        return self._session

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
            self._session = None

    def migrate(self) -> None:
        """Apply every schemas/cassandra/*.cql file in name order; each statement is idempotent
        (IF NOT EXISTS), so running it again, or on an older keyspace, only adds what is new."""
        files = sorted(
            (f for f in resources.files("schemas").joinpath("cassandra").iterdir()),
            key=lambda f: f.name,
        )
        for file in files:
            if not file.name.endswith(".cql"):
                continue
            text = "\n".join(line.split("--", 1)[0] for line in file.read_text().splitlines())
            for statement in text.format(
                keyspace=self.keyspace, replication=self.settings.replication
            ).split(";"):
                if statement.strip():
                    self._run(lambda s=statement: self.session.execute(s, timeout=60))
        self._prepare()

    def _prepare(self) -> None:
        ks = self.keyspace
        queries = {
            # Written at the message id's time (µs), not the writer's clock: a replayed post then
            # never wins over a later edit, written strictly above it (`edit`), nor over a
            # deletion (DELETION_TIMESTAMP). `stored_at` keeps the server's clock of the write
            # (benchmarks: post -> stored), since the write timestamp no longer tells it.
            # A replay writes at the same timestamp as the first write, where Cassandra keeps the
            # greater value of each cell: the envelope starts with its format byte and
            # BE32(dek_version) (docs/format.md), so the envelope kept is one of the greater DEK
            # version, as is the `dek_version` kept: the row stays consistent (both open).
            "insert": f"INSERT INTO {ks}.messages (chat_id, bucket, message_id, sender_id,"
            " dek_version, envelope, created_at, revision, stored_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, toTimestamp(now())) USING TIMESTAMP ?",
            # A post that references attachments. A separate statement: writing an empty list
            # would leave a tombstone in every other row.
            "insert_attached": f"INSERT INTO {ks}.messages (chat_id, bucket, message_id,"
            " sender_id, dek_version, envelope, created_at, revision, stored_at, attachment_ids)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, toTimestamp(now()), ?) USING TIMESTAMP ?",
            "get": f"SELECT * FROM {ks}.messages WHERE chat_id = ? AND bucket = ?"
            " AND message_id = ?",
            # A row as an edit or a sender's deletion needs it: with the write timestamp of its
            # envelope, which the edit's write must exceed.
            "get_for_change": f"SELECT {_COLUMNS}, WRITETIME(envelope) AS envelope_written"
            f" FROM {ks}.messages WHERE chat_id = ? AND bucket = ? AND message_id = ?",
            # An edit: the new revision's envelope, at a write timestamp above the row's
            # (`RowForChange.edit_timestamp`), below DELETION_TIMESTAMP.
            "edit": f"UPDATE {ks}.messages USING TIMESTAMP ?"
            " SET envelope = ?, dek_version = ?, revision = ?, edited_at = ?, last_event_id = ?"
            " WHERE chat_id = ? AND bucket = ? AND message_id = ?",
            "envelope_of": f"SELECT envelope FROM {ks}.messages WHERE chat_id = ? AND bucket = ?"
            " AND message_id = ?",
            "page": f"SELECT * FROM {ks}.messages WHERE chat_id = ? AND bucket = ?"
            " AND message_id < ? LIMIT ?",
            # Deleting a message keeps a marker row but drops its ciphertext.
            # Written at DELETION_TIMESTAMP: a replayed INSERT of the message (normal timestamp)
            # can set its other columns again but never the envelope, nor clear deleted_at.
            "delete_mark": f"UPDATE {ks}.messages USING TIMESTAMP {DELETION_TIMESTAMP}"
            " SET deleted_at = ?, envelope = null"
            " WHERE chat_id = ? AND bucket = ? AND message_id = ?",
            "scan": f"SELECT * FROM {ks}.messages WHERE chat_id = ? AND bucket = ?",
            "after": f"SELECT * FROM {ks}.messages WHERE chat_id = ? AND bucket = ?"
            " AND message_id > ? ORDER BY message_id ASC",
            # Re-encryption: a lightweight transaction, so a row deleted, re-encrypted or given
            # another envelope by someone else meanwhile is left alone rather than resurrected or
            # overwritten (the envelope itself is compared: a v1 -> v2 upgrade keeps the version).
            "reseal": f"UPDATE {ks}.messages SET envelope = ?, dek_version = ?"
            " WHERE chat_id = ? AND bucket = ? AND message_id = ?"
            " IF dek_version = ? AND envelope = ? AND deleted_at = null",
            # Attachments (schemas/cassandra/005): written at the file id's time, so that every
            # deletion (DELETION_TIMESTAMP) wins over a late or repeated write of the row.
            "attachment_insert": f"INSERT INTO {ks}.attachments (chat_id, bucket, file_id,"
            " sender_id, size, ciphertext_size, content_type, dek_version, segment_size,"
            " object_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "attachment_get": f"SELECT * FROM {ks}.attachments WHERE chat_id = ? AND bucket = ?"
            " AND file_id = ?",
            "attachment_delete_mark": f"UPDATE {ks}.attachments USING TIMESTAMP"
            f" {DELETION_TIMESTAMP} SET deleted_at = ? WHERE chat_id = ? AND bucket = ?"
            " AND file_id = ?",
            "attachment_scan": f"SELECT * FROM {ks}.attachments WHERE chat_id = ? AND bucket = ?",
            # At the current time, so a chat's or retention's deletion (DELETION_TIMESTAMP)
            # still shadows it; only set on a row the caller just read live.
            "attachment_share": f"UPDATE {ks}.attachments SET shared_at = ? WHERE chat_id = ?"
            " AND bucket = ? AND file_id = ?",
            "attachment_reference": f"UPDATE {ks}.attachments SET message_ids = message_ids + ?"
            " WHERE chat_id = ? AND bucket = ? AND file_id = ?",
            "attachment_unreference": f"UPDATE {ks}.attachments SET message_ids = message_ids - ?"
            " WHERE chat_id = ? AND bucket = ? AND file_id = ?",
        }
        for name, cql in queries.items():
            self._prepared[name] = self._run(lambda q=cql: self.session.prepare(q))

    def _stmt(self, name: str) -> PreparedStatement:
        if not self._prepared:
            self._prepare()
        return self._prepared[name]

    @staticmethod
    def _run(fn: Any) -> Any:
        try:
            return fn()
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"Cassandra unavailable: {type(exc).__name__}") from None

    def write_many(self, messages: Iterable[StoredMessage]) -> list[RefusedRow]:
        """Write rows, one unlogged batch per (chat, bucket) partition, batches concurrently;
        returns the rows Cassandra refused.

        A single-partition batch is applied atomically by one replica set and costs the driver one
        request instead of one per row, which is where the encryptor's CPU went. A batch the
        server refuses as invalid (it holds a row Cassandra will not take, e.g. one over
        `native_transport_max_message_size`) is written again row by row, so only the refused
        rows are returned and the others are stored. Raises `StoreUnavailable` if any write
        failed for a reason that can heal; the caller retries the whole set (writes are
        idempotent by message id).
        """
        groups: dict[tuple[uuid.UUID, int], list[StoredMessage]] = defaultdict(list)
        for m in messages:
            groups[(m.chat_id, bucket_of(m.message_id))].append(m)
        if not groups:
            return []
        insert, attached = self._stmt("insert"), self._stmt("insert_attached")
        batches: list[tuple[BatchStatement, None]] = []
        batch_rows: list[list[StoredMessage]] = []
        unencodable: list[RefusedRow] = []
        for rows in groups.values():
            for start in range(0, len(rows), _BATCH_ROWS):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                added: list[StoredMessage] = []
                for m in rows[start : start + _BATCH_ROWS]:
                    try:
                        if m.attachment_ids:
                            batch.add(attached, self._insert_values(m))
                        else:
                            batch.add(insert, self._insert_values(m))
                    except _ROW_REFUSED as exc:  # the driver cannot encode a value of this row
                        unencodable.append(RefusedRow(m.message_id, _refusal(exc)))
                        continue
                    added.append(m)
                if added:
                    batches.append((batch, None))
                    batch_rows.append(added)
        if not batches:
            return unencodable
        results = self._run(
            lambda: execute_concurrent(
                self.session,
                batches,
                concurrency=self.concurrency,
                raise_on_first_error=False,
                execution_profile=_WRITE,
            )
        )
        refused_batches = []
        for (ok, result), rows in zip(results, batch_rows, strict=True):
            if not ok:
                self._raise_unless_refused(result, len(batches))
                refused_batches.extend(rows)
        if refused_batches:
            return unencodable + self._write_one_by_one(refused_batches)
        return unencodable

    @staticmethod
    def _insert_values(m: StoredMessage) -> tuple[Any, ...]:
        """Values of "insert", or of "insert_attached" when the row references attachments."""
        values: tuple[Any, ...] = (
            m.chat_id,
            bucket_of(m.message_id),
            m.message_id,
            m.sender_id,
            m.dek_version,
            m.envelope,
            m.created_at,
            m.revision,
        )
        if m.attachment_ids:
            values += (list(m.attachment_ids),)
        return (*values, id_millis(m.message_id) * 1000)

    @staticmethod
    def _raise_unless_refused(error: BaseException, requests: int) -> None:
        if not isinstance(error, _ROW_REFUSED):
            raise StoreUnavailable(
                f"a write of {requests} Cassandra requests failed ({type(error).__name__})"
            )

    def _write_one_by_one(self, rows: list[StoredMessage]) -> list[RefusedRow]:
        insert, attached = self._stmt("insert"), self._stmt("insert_attached")
        results = self._run(
            lambda: execute_concurrent(
                self.session,
                [(attached if m.attachment_ids else insert, self._insert_values(m)) for m in rows],
                concurrency=self.concurrency,
                raise_on_first_error=False,
                execution_profile=_WRITE,
            )
        )
        refused: list[RefusedRow] = []
        for (ok, result), m in zip(results, rows, strict=True):
            if not ok:
                self._raise_unless_refused(result, len(rows))
                refused.append(RefusedRow(m.message_id, _refusal(result)))
        return refused

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        """The message's row, or None: no row, or one holding only a deletion marker (no
        message to show or change, as for `rows_for_change`)."""
        row = self._run(
            lambda: self.session.execute(
                self._stmt("get"), (chat_id, bucket_of(message_id), message_id)
            ).one()
        )
        return None if row is None or row.created_at is None else _row(row)

    def rows_for_change(
        self, messages: Collection[tuple[uuid.UUID, int]]
    ) -> dict[tuple[uuid.UUID, int], RowForChange]:
        """The rows of (chat id, message id) pairs with their envelope's write timestamp, read
        concurrently (one read each); a pair without a row is absent from the answer. Raises
        `StoreUnavailable` (retriable)."""
        if not messages:
            return {}
        pairs = list(messages)
        statement = self._stmt("get_for_change")
        results = self._run(
            lambda: execute_concurrent(
                self.session,
                [(statement, (chat, bucket_of(message), message)) for chat, message in pairs],
                concurrency=self.concurrency,
                raise_on_first_error=True,
            )
        )
        found: dict[tuple[uuid.UUID, int], RowForChange] = {}
        for pair, (_, result) in zip(pairs, results, strict=True):
            row = result.one()
            # A row holding only a deletion marker (deleted before its post was ever stored)
            # has no message to change: absent.
            if row is not None and row.created_at is not None:
                found[pair] = RowForChange(_row(row), row.envelope_written)
        return found

    def write_edits(self, edits: Sequence[EditWrite]) -> dict[int, str]:
        """Write edits concurrently (each at its own write timestamp, so several edits of one
        message end with the highest whatever the order they land in); returns the reasons of
        those Cassandra refused for good, by event id (no value in a reason). Raises
        `StoreUnavailable` if any failed for a reason that can heal (the caller retries: the
        writes are idempotent)."""
        if not edits:
            return {}
        statement = self._stmt("edit")
        params = [
            (
                e.timestamp,
                e.envelope,
                e.dek_version,
                e.revision,
                e.edited_at,
                e.event_id,
                e.chat_id,
                bucket_of(e.message_id),
                e.message_id,
            )
            for e in edits
        ]
        results = self._run(
            lambda: execute_concurrent(
                self.session,
                [(statement, p) for p in params],
                concurrency=self.concurrency,
                raise_on_first_error=False,
                execution_profile=_WRITE,
            )
        )
        refused: dict[int, str] = {}
        for (ok, result), e in zip(results, edits, strict=True):
            if not ok:
                self._raise_unless_refused(result, len(edits))
                refused[e.event_id] = _refusal(result)
        return refused

    def history(
        self, chat_id: uuid.UUID, before_id: int, oldest_ms: int, limit: int
    ) -> Iterator[StoredMessage]:
        """Messages older than `before_id`, newest first, walking back bucket by bucket until
        the chat's creation time; deleted rows are left out.

        Each query asks for what is still missing plus a few rows of slack for deleted ones, and
        a bucket is read on from the last row seen until it is exhausted, so many deleted rows in
        a row never hide older messages of the same bucket.
        """
        bucket = bucket_of(before_id)
        last_bucket = bucket_at(oldest_ms)
        produced = 0
        cursor = before_id
        while bucket >= last_bucket and produced < limit:
            fetch = limit - produced + _DELETED_SLACK
            rows = self._run(
                lambda b=bucket, c=cursor, n=fetch: list(
                    self.session.execute(self._stmt("page"), (chat_id, b, c, n))
                )
            )
            for row in rows:
                cursor = row.message_id
                if row.deleted_at is not None:
                    continue
                yield _row(row)
                produced += 1
                if produced >= limit:
                    return
            if len(rows) < fetch:  # this bucket is exhausted: go back in time
                bucket -= 1
                cursor = before_id

    def written_at(self, chat_id: uuid.UUID, message_id: int) -> float | None:
        """When a row was stored (seconds since the epoch, Cassandra's clock at the post's
        write: `stored_at`, ms precision), or None if there is no such row. For benchmarks.
        Rows stored before that column existed give their envelope's write timestamp."""
        row = self._run(
            lambda: self.session.execute(
                f"SELECT stored_at, writetime(envelope) FROM {self.keyspace}.messages"
                " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
                (chat_id, bucket_of(message_id), message_id),
            ).one()
        )
        if row is None:
            return None
        if row[0] is not None:
            return float(row[0].replace(tzinfo=UTC).timestamp())
        return None if row[1] is None else row[1] / 1_000_000

    def scan_chat(
        self, chat_id: uuid.UUID, oldest_ms: int, newest_ms: int, page_size: int = 500
    ) -> Iterator[StoredMessage]:
        """Every live row of a chat between two times, bucket by bucket (paged by the driver)."""
        for bucket in range(bucket_at(oldest_ms), bucket_at(newest_ms) + 1):
            statement = self._stmt("scan").bind((chat_id, bucket))
            statement.fetch_size = page_size
            for row in self._run(lambda s=statement: self.session.execute(s)):
                if row.deleted_at is None:
                    yield _row(row)

    def rows_after(
        self, chat_id: uuid.UUID, after_id: int, until_ms: int, page_size: int = 500
    ) -> Iterator[StoredMessage]:
        """Every row of a chat with a message id above `after_id`, deleted ones included (their
        `deleted_at` set, no envelope; not a bare deletion marker), oldest first, up to the bucket of `until_ms` (Unix ms);
        read-only (live delivery's resume, which also wants the rows' edits and deletions)."""
        for bucket in range(bucket_of(after_id), bucket_at(until_ms) + 1):
            statement = self._stmt("after").bind((chat_id, bucket, after_id))
            statement.fetch_size = page_size
            for row in self._run(lambda s=statement: self.session.execute(s)):
                if row.created_at is None:
                    continue  # only a deletion marker (deleted before it was ever stored)
                yield _row(row)

    def reseal_many(self, updates: Sequence[tuple[StoredMessage, int, bytes]]) -> int:
        """Replace (row, new DEK version, new envelope) where the row still has its old version
        and envelope and is not deleted; returns how many rows changed: applied, and holding
        the new envelope when read back (one read per applied row)."""
        statement = self._stmt("reseal")
        params = [
            (
                envelope,
                version,
                m.chat_id,
                bucket_of(m.message_id),
                m.message_id,
                m.dek_version,
                m.envelope,
            )
            for m, version, envelope in updates
        ]
        results = self._run(
            lambda: execute_concurrent(
                self.session,
                [(statement, p) for p in params],
                concurrency=16,
                raise_on_first_error=True,
                execution_profile=_WRITE,
            )
        )
        applied = [
            (m, envelope)
            for (ok, result), (m, _, envelope) in zip(results, updates, strict=True)
            if ok and result.one()[0]
        ]
        if not applied:
            return 0
        # A conditional write is timestamped with Cassandra's clock: below a row written at a
        # later write timestamp (a post or an edit whose id's time is ahead of that clock) it
        # is "applied" yet shadowed, and the row keeps its old envelope and DEK version. Only
        # rows read back with the new envelope count, since the job destroys old versions
        # when every row counted (a shadowed row is left for a later run).
        envelope_of = self._stmt("envelope_of")
        reads = self._run(
            lambda: execute_concurrent(
                self.session,
                [
                    (envelope_of, (m.chat_id, bucket_of(m.message_id), m.message_id))
                    for m, _ in applied
                ],
                concurrency=16,
                raise_on_first_error=True,
            )
        )
        changed = 0
        for (_, result), (_, envelope) in zip(reads, applied, strict=True):
            row = result.one()
            changed += row is not None and bytes(row.envelope or b"") == envelope
        return changed

    def mark_deleted(self, chat_id: uuid.UUID, message_id: int, when: datetime) -> None:
        self._run(
            lambda: self.session.execute(
                self._stmt("delete_mark"),
                (when, chat_id, bucket_of(message_id), message_id),
                execution_profile=_WRITE,
            )
        )

    def delete_chat(self, chat_id: uuid.UUID, oldest_ms: int, newest_ms: int) -> int:
        """Delete every partition of a chat between two times; returns the rows deleted.

        Rows written after this (a record in flight, a replay) are shadowed by the partition
        tombstones at once and are never visible, so they need no second deletion.
        """
        return self._delete_partitions("messages", chat_id, oldest_ms, newest_ms)

    def delete_older_than(
        self, chat_id: uuid.UUID, oldest_ms: int, cutoff_ms: int, first_id_after_cutoff: int
    ) -> int:
        """Delete a chat's rows older than `cutoff_ms` (ids below `first_id_after_cutoff`)."""
        return self._delete_before(
            "messages", "message_id", chat_id, oldest_ms, cutoff_ms, first_id_after_cutoff
        )

    # --- attachments ------------------------------------------------------------------------

    def write_attachment(self, row: AttachmentRow) -> None:
        """Write an attachment's metadata (after its object is complete in the object store).
        Idempotent by (chat, file id); a deleted or shredded one stays deleted."""
        values = (
            row.chat_id,
            bucket_of(row.file_id),
            row.file_id,
            row.sender_id,
            row.size,
            row.ciphertext_size,
            row.content_type,
            row.dek_version,
            row.segment_size,
            row.object_key,
            row.created_at,
            id_millis(row.file_id) * 1000,
        )
        self._run(
            lambda: self.session.execute(
                self._stmt("attachment_insert"), values, execution_profile=_WRITE
            )
        )

    def attachment(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        """The attachment's metadata, deletion marker included (`deleted_at` set); None when
        there is no row (never uploaded, another chat's id, removed with its chat)."""
        row = self._run(
            lambda: self.session.execute(
                self._stmt("attachment_get"), (chat_id, bucket_of(file_id), file_id)
            ).one()
        )
        return None if row is None or row.created_at is None else _attachment(row)

    def mark_attachment_deleted(self, chat_id: uuid.UUID, file_id: int, when: datetime) -> None:
        """Mark the attachment deleted (its object is deleted by the caller); a later write of
        its row cannot undo this (DELETION_TIMESTAMP)."""
        self._run(
            lambda: self.session.execute(
                self._stmt("attachment_delete_mark"),
                (when, chat_id, bucket_of(file_id), file_id),
                execution_profile=_WRITE,
            )
        )

    def mark_attachment_shared(self, chat_id: uuid.UUID, file_id: int, when: datetime) -> None:
        """Record that a message referenced the attachment (`AttachmentRow.shared_at`): from
        then on every participant may read it. Call only for a row read live just before."""
        self._run(
            lambda: self.session.execute(
                self._stmt("attachment_share"),
                (when, chat_id, bucket_of(file_id), file_id),
                execution_profile=_WRITE,
            )
        )

    def share_attachments(
        self, chat_id: uuid.UUID, file_ids: Iterable[int], when: datetime, message_id: int
    ) -> int:
        """Record that post `message_id` references each of `file_ids` that is a live
        attachment of the chat (read first: an id naming no file leaves no row behind): its id
        joins the file's `message_ids`, and a file not shared yet is marked shared (so a direct
        producer's references share files as the gateway's do). Returns how many files were
        newly shared. Idempotent (a redelivered post)."""
        marked = 0
        for file_id in file_ids:
            row = self.attachment(chat_id, file_id)
            if row is None or row.deleted_at is not None:
                continue
            key = (chat_id, bucket_of(file_id), file_id)
            self._run(
                lambda k=key: self.session.execute(
                    self._stmt("attachment_reference"), ({message_id}, *k), execution_profile=_WRITE
                )
            )
            if row.shared_at is None:
                self.mark_attachment_shared(chat_id, file_id, when)
                marked += 1
        return marked

    def release_attachment(self, chat_id: uuid.UUID, file_id: int, message_id: int) -> bool:
        """Remove deleted message `message_id` from the file's `message_ids`; True when no
        other message references the file any more (or it has no row): the caller then deletes
        it. Idempotent, so a deletion retried after a failure finishes the job."""
        self._run(
            lambda: self.session.execute(
                self._stmt("attachment_unreference"),
                ({message_id}, chat_id, bucket_of(file_id), file_id),
                execution_profile=_WRITE,
            )
        )
        row = self.attachment(chat_id, file_id)
        return row is None or not (row.message_ids - {message_id})

    def chat_attachments(
        self, chat_id: uuid.UUID, oldest_ms: int, newest_ms: int
    ) -> Iterator[AttachmentRow]:
        """Every attachment row of a chat whose id's time is between two times (deleted ones
        included), newest first within each bucket."""
        for bucket in range(bucket_at(oldest_ms), bucket_at(newest_ms) + 1):
            rows = self._run(
                lambda b=bucket: list(
                    self.session.execute(self._stmt("attachment_scan"), (chat_id, b))
                )
            )
            for row in rows:
                if row.created_at is not None:
                    yield _attachment(row)

    def delete_chat_attachments(self, chat_id: uuid.UUID, oldest_ms: int, newest_ms: int) -> int:
        """Delete every attachment partition of a chat between two times (file ids' times);
        returns the rows deleted (deletion markers included). Like `delete_chat`: partition
        tombstones at DELETION_TIMESTAMP, so a row an upload in flight writes later is shadowed
        at once. The objects are the caller's (`sealstream.lifecycle.delete_chat`)."""
        return self._delete_partitions("attachments", chat_id, oldest_ms, newest_ms)

    def delete_attachments_older_than(
        self, chat_id: uuid.UUID, oldest_ms: int, cutoff_ms: int, first_id_after_cutoff: int
    ) -> int:
        """Delete a chat's attachment rows whose file id is below `first_id_after_cutoff` (older
        than `cutoff_ms`, Unix ms): one range tombstone per partition at DELETION_TIMESTAMP, so
        a late upload of an expired id stays deleted. Returns the rows deleted."""
        return self._delete_before(
            "attachments", "file_id", chat_id, oldest_ms, cutoff_ms, first_id_after_cutoff
        )

    # --- deletions shared by the messages and attachments tables (same partitioning) -------

    def _delete_partitions(
        self, table: str, chat_id: uuid.UUID, oldest_ms: int, newest_ms: int
    ) -> int:
        """Partition tombstones at DELETION_TIMESTAMP on every (chat, bucket) of `table` between
        two times; returns the rows there were."""
        ks = self.keyspace
        deleted = 0
        for bucket in range(bucket_at(oldest_ms), bucket_at(newest_ms) + 1):
            row = self._run(
                lambda b=bucket: self.session.execute(
                    f"SELECT count(*) FROM {ks}.{table} WHERE chat_id = %s AND bucket = %s",
                    (chat_id, b),
                ).one()
            )
            deleted += int(row[0]) if row else 0
            # Every bucket, even one empty now: a writer (the encryptor, an upload) may still
            # be writing into it.
            self._run(
                lambda b=bucket: self.session.execute(
                    f"DELETE FROM {ks}.{table} USING TIMESTAMP {DELETION_TIMESTAMP}"
                    " WHERE chat_id = %s AND bucket = %s",
                    (chat_id, b),
                    execution_profile=_WRITE,
                )
            )
        return deleted

    def _delete_before(
        self,
        table: str,
        id_column: str,
        chat_id: uuid.UUID,
        oldest_ms: int,
        cutoff_ms: int,
        first_id_after_cutoff: int,
    ) -> int:
        """Rows of `table` whose `id_column` is below `first_id_after_cutoff`, one range
        tombstone per partition at DELETION_TIMESTAMP (a replayed expired record or a late
        write of an expired id stays deleted); returns the rows deleted."""
        ks = self.keyspace
        deleted = 0
        for bucket in range(bucket_at(oldest_ms), bucket_at(cutoff_ms) + 1):
            row = self._run(
                lambda b=bucket: self.session.execute(
                    f"SELECT count(*) FROM {ks}.{table} WHERE chat_id = %s AND bucket = %s"
                    f" AND {id_column} < %s",
                    (chat_id, b, first_id_after_cutoff),
                ).one()
            )
            if row and row[0]:
                deleted += int(row[0])
                self._run(
                    lambda b=bucket: self.session.execute(
                        f"DELETE FROM {ks}.{table} USING TIMESTAMP {DELETION_TIMESTAMP}"
                        f" WHERE chat_id = %s AND bucket = %s AND {id_column} < %s",
                        (chat_id, b, first_id_after_cutoff),
                        execution_profile=_WRITE,
                    )
                )
        return deleted

    def overwrite_envelope(self, chat_id: uuid.UUID, message_id: int, envelope: bytes) -> None:
        """Tests only: tamper with a stored row as an attacker with database access could."""
        self._run(
            lambda: self.session.execute(
                f"UPDATE {self.keyspace}.messages SET envelope = %s WHERE chat_id = %s"
                " AND bucket = %s AND message_id = %s",
                (envelope, chat_id, bucket_of(message_id), message_id),
                execution_profile=_WRITE,
            )
        )

    def scan_raw(self) -> Iterator[bytes]:
        """Every stored column of every row as bytes (the leak-scan tests search these)."""
        for row in self.session.execute(f"SELECT * FROM {self.keyspace}.messages"):
            yield repr(tuple(row)).encode() + bytes(row.envelope or b"")

    def count(self) -> int:
        row = self._run(
            lambda: self.session.execute(f"SELECT count(*) FROM {self.keyspace}.messages").one()
        )
        return int(row[0])

    def drop_keyspace(self) -> None:
        self._run(
            lambda: self.session.execute(f"DROP KEYSPACE IF EXISTS {self.keyspace}", timeout=60)
        )
