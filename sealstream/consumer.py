"""The consumer library: read the sealed message topic as validated `MessageRecord`s, in batches.

For downstream consumers (ML teams, analytics): a `MessageConsumer` reads the message topic in a
consumer group of the caller's own, opens each sealed value (`sealstream.record_seal.RecordOpener`),
validates it into a `schemas.events.MessageRecord` (the rules the encryptor and indexer apply,
`schemas.events.decode_record`) and hands the caller one `MessageBatch` at a time.

Commit rule (at least once): a batch's offsets are committed only when the caller calls
`batch.commit()` after it is done with the batch; asking for the next batch before that raises
`BatchNotCommitted`. A process that dies (or stops, or raises) before `commit()` gets the same
records again from its group's last commit, in this process or another one of the group. So the
caller's processing must be idempotent by `message_id` (and `event_id` for edits and deletions):
a record can arrive twice (a producer's retry publishes the same id again; redelivery after a crash).

Records that cannot be used are never dropped silently: each one is in `batch.refused` as a
`Refusal` (partition, offset, reason naming the field and rule, or why the seal did not open;
never a value) and is committed with the batch. They are not dead-lettered here: the pipeline's
own workers dead-letter the same records to the dead-letter topic with their reasons, and a
consumer's principal is read-only on the broker (docs/security.md).

A retriable failure while opening (the KMS or Postgres down: `StoreUnavailable`) holds the batch:
the consumer pauses its partitions, keeps polling so it stays in its group, and retries with
backoff until the record opens or `stop()` is called; it never skips a record.

Usage (README.md, "Reading the stream (ML consumers)")::

    with MessageConsumer(Settings(), group="sealstream-ml-acme-features") as consumer:
        for batch in consumer.batches():
            for record in batch.records:
                ...                    # MessageRecord: kind, message_id, chat_id, text, ...
            for refusal in batch.refused:
                ...                    # count or log (partition, offset, reason)
            batch.commit()             # after the batch's results are stored
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from schemas.events import MessageRecord, decode_record
from sealstream.errors import SealRefused, SealstreamError, StoreUnavailable
from sealstream.kafka_principals import ML_CONSUMER
from sealstream.record_seal import header_pairs, is_sealed, record_opener, sealed_event_id
from sealstream.settings import KafkaSettings, Settings
from sealstream.streaming import consumer_config as worker_consumer_config

log = logging.getLogger(__name__)

NO_VALUE = "record has no value (the message topic has no tombstones or deletion records)"
# Longest wait between two attempts at opening a record while the KMS or Postgres is down.
MAX_BACKOFF_S = 5.0
# How long one poll() waits while a batch is held, or while waiting for a first record.
POLL_S = 0.2
# Errors of a commit that mean the partitions moved to another member: its records will be
# delivered there again (at least once), so this is no failure of the caller's.
_MOVED = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError._NO_OFFSET,
}


class Opener(Protocol):
    """Opens one sealed record (`sealstream.record_seal.RecordOpener`): returns the plaintext
    value, raises `SealRefused` (permanent) or `StoreUnavailable` (retriable)."""

    def open(
        self,
        topic: str,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        value: bytes,
    ) -> bytes: ...


class BatchNotCommitted(SealstreamError):
    """The next batch was asked for while the previous one was neither committed nor dropped:
    call `batch.commit()` once its results are stored (or stop the consumer to have it again)."""


@dataclass(frozen=True)
class Refusal:
    """A record of the topic that cannot be used, and why. `reason` names the field and rule
    (`invalid record: sender_id: ...`), the key problem, or `sealed value refused: <why>` when
    its seal does not open (tampered, wrong topic or key, key id unknown or destroyed); it never
    holds a value."""

    topic: str
    partition: int
    offset: int
    reason: str


@dataclass
class MessageBatch:
    """One batch: the valid records in topic order per partition, the refused ones, and what to
    commit. `commit()` once done (see the module docstring); committing twice is harmless."""

    records: list[MessageRecord]
    refused: list[Refusal]
    _next_offsets: dict[tuple[str, int], int] = field(repr=False)
    _consumer: MessageConsumer = field(repr=False)
    committed: bool = False

    def __len__(self) -> int:
        return len(self.records) + len(self.refused)

    def commit(self) -> None:
        """Commit every record of this batch (synchronously), refused ones included.

        Partitions that moved to another member of the group meanwhile are left out: their
        records are delivered there again. Raises `StoreUnavailable` when Kafka does not take the
        commit (retry `commit()`, or stop: the batch is then delivered again)."""
        self._consumer._commit(self)


@dataclass(frozen=True)
class _Raw:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]] | None
    value: bytes | None


def open_message(
    opener: Opener,
    topic: str,
    key: bytes | None,
    headers: Sequence[tuple[str, bytes]] | None,
    value: bytes | None,
    *,
    sealed_only: bool = True,
) -> MessageRecord | str:
    """One record of the message topic as a validated `MessageRecord`, or the reason it cannot
    be used (names the header, field and rule; never a value). The one opening path of the
    consumer library and of the Faust topic (`sealstream.faust_records`).

    A sealed record (header `sealstream.key_id`) is opened with `opener`; an unsealed one is
    refused when `sealed_only` (setting `kafka.seal_records`, on by default) and read as
    plaintext JSON otherwise. Then the workers' rules (`schemas.events.decode_record`: schema,
    key is the chat id) and the seal's: the record is the event its `sealstream.event_id`
    header names. Raises `StoreUnavailable` (retriable: the KMS or Postgres is down; try again,
    never skip)."""
    if value is None:
        return NO_VALUE
    sealed = is_sealed(headers)
    if sealed or sealed_only:
        try:
            plain = opener.open(topic, key, headers, value)
        except SealRefused as refused:
            return refused.reason
    else:
        plain = value
    # A sealed record must be the very event its seal bound (the `sealstream.event_id` header).
    decoded = decode_record(plain, key, sealed_event_id(headers) if sealed else None)
    return decoded


def _headers(message: Message) -> list[tuple[str, bytes]] | None:
    """A record's headers read as every stage reads them (`record_seal.header_pairs`)."""
    return header_pairs(message.headers()) or None


def consumer_config(kafka: KafkaSettings, group: str, client_id: str) -> dict[str, Any]:
    """The librdkafka configuration of a library consumer: the workers' own
    (`sealstream.streaming.consumer_config`: explicit commits after the batch, cooperative-sticky
    rebalances, bounded prefetch)."""
    return worker_consumer_config(kafka, group, client_id)


class MessageConsumer:
    """Batches of validated `MessageRecord`s from the sealed message topic, committed by the
    caller. A context manager: entering it builds the opener (KMS, Postgres, Redis) and joins
    `group`; leaving it leaves the group (an uncommitted batch is delivered again).

    `group`: the Kafka consumer group, the caller's own (never the encryptor's or indexer's:
    refused with `ValueError`, since records it took would never be stored). The consumer
    authenticates as the read-only ML consumer principal (`sealstream-ml`) unless
    `settings.kafka.username` names another; as that principal, a group not starting with
    `settings.kafka.ml_group_prefix` is refused with `ValueError` (the broker would refuse it
    at the first poll, with a less clear error). `batch_size`: most
    records per batch (1..10000). `max_wait_seconds`: how long a batch waits for more records
    after its first one. `topic`: `settings.kafka.messages_topic` by default. Not thread-safe
    (one thread iterates), except `stop()`.
    """

    def __init__(
        self,
        settings: Settings,
        group: str,
        *,
        batch_size: int = 500,
        max_wait_seconds: float = 1.0,
        topic: str | None = None,
        client_id: str | None = None,
        opener: Opener | None = None,
    ) -> None:
        kafka = settings.kafka
        if not group or group in {kafka.encryptor_group, kafka.indexer_group}:
            raise ValueError(
                "group must be a consumer group of the caller's own, not empty and not the "
                "encryptor's or the indexer's (their records would never be stored)"
            )
        # The read-only ML consumer principal unless this process configured its own
        # (`SEALSTREAM_KAFKA__USERNAME`); that principal may join only groups of its prefix.
        kafka = kafka.acting_as(ML_CONSUMER)
        if kafka.principal == ML_CONSUMER and not group.startswith(kafka.ml_group_prefix):
            raise ValueError(
                f"group must start with kafka.ml_group_prefix ({kafka.ml_group_prefix!r}): the "
                f"consumer runs as the Kafka principal {ML_CONSUMER!r}, whose ACL allows only "
                "those groups (docs/operations.md, 'Broker authentication and ACLs')"
            )
        if not 1 <= batch_size <= 10_000:
            raise ValueError("batch_size must be between 1 and 10000")
        if max_wait_seconds < 0:
            raise ValueError("max_wait_seconds must be >= 0")
        self.settings = settings
        self.kafka = kafka  # the principal this consumer authenticates as
        self.group = group
        self.topic = topic or kafka.messages_topic
        self.batch_size = batch_size
        self.max_wait = max_wait_seconds
        self.client_id = client_id or f"{group}-consumer"
        self._opener = opener
        self._stack = ExitStack()
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._owned: set[tuple[str, int]] = set()
        self._carry: list[_Raw] = []  # records polled while a batch was held
        self._pending: MessageBatch | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> MessageConsumer:
        try:
            if self._opener is None:
                opener = record_opener(self.settings)
                self._stack.callback(opener.close)
                self._opener = opener
            consumer = Consumer(consumer_config(self.kafka, self.group, self.client_id))
            self._stack.callback(consumer.close)  # leaves the group: partitions move at once
            consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            self._consumer = consumer
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Leave the group (nothing more is committed) and close the opener (idempotent)."""
        self._stop.set()
        self._consumer = None
        self._stack.close()

    def stop(self) -> None:
        """Ask `batches()` to end (thread-safe; for example from a signal handler). A batch not
        yet handed out is dropped uncommitted (delivered again later)."""
        self._stop.set()

    # --- reading ---------------------------------------------------------------------------------

    def batches(self, idle_seconds: float | None = None) -> Iterator[MessageBatch]:
        """Batches until `stop()` (or, with `idle_seconds`, until no record came for that long).

        Each batch holds 1..`batch_size` records (valid ones and refusals). Raises
        `BatchNotCommitted` if the previous batch was not committed when the next is asked for,
        and `KafkaException` for a fatal Kafka error (bad configuration, authorisation).
        """
        while not self._stop.is_set():
            batch = self.poll_batch(idle_seconds if idle_seconds is not None else POLL_S * 5)
            if batch is not None:
                yield batch
            elif idle_seconds is not None:
                return

    def poll_batch(self, timeout: float) -> MessageBatch | None:
        """The next batch, or None if no record came within `timeout` seconds (or on `stop()`).

        Waits up to `timeout` for a first record, then up to `max_wait_seconds` more to fill the
        batch. Same errors as `batches()`."""
        consumer = self._require()
        if self._pending is not None and not self._pending.committed:
            raise BatchNotCommitted(
                "the previous batch was not committed: call batch.commit() when done with it"
            )
        self._pending = None
        raws = self._collect(consumer, timeout)
        if not raws:
            return None
        batch = self._open_all(consumer, raws)
        if batch is None:
            return None
        self._pending = batch
        return batch

    def _require(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("MessageConsumer is used outside its `with` block")
        return self._consumer

    def _collect(self, consumer: Consumer, timeout: float) -> list[_Raw]:
        raws, self._carry = self._carry, []
        deadline = time.monotonic() + timeout
        while not raws and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            # poll() returns at the first record; consume() would wait for a full batch.
            self._accept([m] if (m := consumer.poll(min(left, POLL_S))) else [], raws)
        first_at = time.monotonic()
        while len(raws) < self.batch_size and not self._stop.is_set():
            left = first_at + self.max_wait - time.monotonic()
            if left <= 0:
                break
            self._accept(consumer.consume(self.batch_size - len(raws), left), raws)
        if self._stop.is_set():
            return []
        # Records polled while an earlier batch was held can make more than one batch: the rest
        # waits, in order, for the next one.
        raws, rest = raws[: self.batch_size], raws[self.batch_size :]
        self._carry = rest + self._carry
        return raws

    def _accept(self, messages: list[Message], into: list[_Raw]) -> None:
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal() or error.code() in {
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    KafkaError.GROUP_AUTHORIZATION_FAILED,
                }:
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    # Transient (a broker down): librdkafka retries by itself.
                    log.warning("consumer error", extra={"error": error.name()})
                continue
            where = (m.topic() or "", m.partition() or 0)
            if where not in self._owned:
                continue  # taken before a revocation the same call ran: the new owner has it
            into.append(
                _Raw(
                    where[0],
                    where[1],
                    m.offset() or 0,
                    m.key(),
                    _headers(m),
                    m.value(),
                )
            )

    def _open_all(self, consumer: Consumer, raws: list[_Raw]) -> MessageBatch | None:
        """Open and validate every record, holding the batch while opening fails retriably.
        None when the consumer stopped meanwhile (nothing handed out, nothing committed)."""
        records: list[MessageRecord] = []
        refused: list[Refusal] = []
        offsets: dict[tuple[str, int], int] = {}
        for raw in raws:
            outcome = self._open_one(consumer, raw)
            if outcome is None:
                return None  # stopping
            where = (raw.topic, raw.partition)
            if where not in self._owned:
                continue  # revoked while held: the new owner reads it from the last commit
            if isinstance(outcome, MessageRecord):
                records.append(outcome)
            else:
                refused.append(Refusal(raw.topic, raw.partition, raw.offset, outcome))
            offsets[where] = max(offsets.get(where, 0), raw.offset + 1)
        if not offsets:
            return None
        return MessageBatch(records, refused, offsets, self)

    def _open_one(self, consumer: Consumer, raw: _Raw) -> MessageRecord | str | None:
        """The record, the reason it is refused, or None once stopping."""
        assert self._opener is not None
        delay, paused = 0.1, False
        try:
            while True:
                try:
                    return open_message(
                        self._opener,
                        raw.topic,
                        raw.key,
                        raw.headers,
                        raw.value,
                        sealed_only=self.settings.kafka.seal_records,
                    )
                except SealstreamError as exc:
                    if not exc.retriable:
                        raise
                    log.warning(
                        "cannot open records now; holding the batch and retrying",
                        extra={"error": type(exc).__name__, "retry_in_s": delay},
                    )
                    if not paused:
                        consumer.pause(self._assignment(consumer))
                        paused = True
                    if not self._hold(consumer, delay):
                        return None
                    delay = min(delay * 2, MAX_BACKOFF_S)
        finally:
            if paused and self._consumer is not None:
                consumer.resume(self._assignment(consumer))

    def _hold(self, consumer: Consumer, seconds: float) -> bool:
        """Wait `seconds` while polling (paused: no records, but the group and rebalance
        callbacks are served); False once stopping."""
        until = time.monotonic() + seconds
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return True
            message = consumer.poll(min(left, POLL_S))
            if message is not None:
                self._accept([message], self._carry)
        return False

    @staticmethod
    def _assignment(consumer: Consumer) -> list[TopicPartition]:
        return list(consumer.assignment())

    # --- group membership and commits ------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._owned |= {(tp.topic, tp.partition) for tp in partitions}
        if partitions:
            consumer.incremental_assign(partitions)
            # librdkafka keeps a pause flag across unassign and re-assign.
            consumer.resume(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._owned -= gone
        self._carry = [r for r in self._carry if (r.topic, r.partition) not in gone]

    def _commit(self, batch: MessageBatch) -> None:
        if batch.committed:
            return
        consumer = self._require()
        offsets = [
            TopicPartition(topic, partition, offset)
            for (topic, partition), offset in sorted(batch._next_offsets.items())
            if (topic, partition) in self._owned
        ]
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() not in _MOVED:
                    raise StoreUnavailable(
                        f"Kafka did not take the commit: {error.name()}"
                    ) from None
                log.info("batch's partitions moved before its commit; delivered again there")
        batch.committed = True
