"""The consumer runtime shared by the encryptor and the indexer: batches read from the message topic
with confluent-kafka's batch API, an offset committed only after its batch was durably handled.

Commit rule: a batch is read with `Consumer.consume(max_size, timeout)` (full, or its oldest record
`max_wait` old), handed to `process` in a worker thread, its dead letters published, and only then
the next offset of each of its partitions is committed, synchronously and explicitly (never auto-
commit, never `enable.auto.offset.store`). A crash or SIGKILL at any point leads to redelivery (the
stages are idempotent by message id), never to loss.

`process` receives raw records and returns the dead letters among them: records that fail the
schema, and records a sink refused one by one (a bulk item error, a row the database refuses).
Anything `process` raises is a failure of the batch as a whole and is retried with backoff,
holding the batch: nothing is skipped. Dead letters go to the dead-letter topic with the reason;
one the topic refuses (too large) is replaced by a letter without the value.

Held batches: after `HOLD_AFTER_S` the main thread pauses every assigned partition and keeps
calling `poll()` until the batch is done, so a worker held by a sink that is down stays in its
group however long the hold lasts (`max.poll.interval.ms` counts from the last poll) and serves
rebalance callbacks meanwhile; records it is handed while paused are kept for the next batch.

Rebalances (cooperative-sticky, so only the partitions that move stop): on revocation, records of
the revoked partitions not yet handed to `process` are dropped uncommitted (the new owner reads
them from the committed offset); a batch in flight over them is waited for up to
`kafka.revoke_wait_ms` and committed if it finished, else those partitions' records are abandoned:
never committed, never dead-lettered by this worker, and left out of its next retries. A lost
assignment (session expired) abandons at once, since committing is no longer allowed. Either way a
moving partition's records are handled by exactly one owner from the last committed offset:
records a poll returns for a partition this worker does not own (taken before a revocation the
same call ran) are dropped, and every assigned partition is explicitly paused (while holding) or
resumed, since librdkafka keeps a pause flag across unassign and re-assign.

Shutdown: SIGTERM sets a stop signal that every retry loop checks, so a worker whose sink is down
stops within its grace period; the batch in hand is then left uncommitted and is redelivered.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from sealstream.adapters.kafka import (
    DeadLetter,
    Headers,
    Publisher,
    RecordRefused,
    dead_letter_headers,
    kafka_client_config,
)
from sealstream.errors import SealRefused
from sealstream.record_seal import (
    RecordOpener,
    has_sealed_format,
    header_pairs,
    is_sealed,
    record_opener,
)
from sealstream.settings import HttpSettings, KafkaSettings, Settings
from sealstream.worker_http import serve

log = logging.getLogger(__name__)

RECORDS = Counter("sealstream_consumer_records", "Records handled", ["stage", "outcome"])
BATCH_SIZE = Histogram(
    "sealstream_consumer_batch_size",
    "Records per batch",
    ["stage"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
BATCH_SECONDS = Histogram(
    "sealstream_consumer_batch_seconds",
    "Time to handle one batch",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter("sealstream_consumer_retries", "Batches retried after a failure", ["stage"])
LAG = Gauge("sealstream_consumer_lag", "Records behind the end of the partition", ["stage"])
REBALANCES = Counter(
    "sealstream_consumer_rebalances",
    "Partitions assigned, revoked or lost, and records of the batch in hand abandoned",
    ["stage", "event"],
)

# A batch not done after this long is held: the partitions are paused and polling goes on.
HOLD_AFTER_S = 1.0
# How long one poll() waits while holding or idle: bounds how late a stop signal is noticed.
POLL_S = 0.2
LAG_EVERY_S = 5.0


RecordHeaders = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class RawRecord:
    """A record as read from the message topic. Once opened by the runtime (sealed records,
    docs/format.md), `value` is the plaintext, `sealed_value` the value as it was read and
    `event_id` the `sealstream.event_id` its seal bound (the decoder checks the record's own);
    `headers` are the record's Kafka headers as read. Dead letters carry `original_value` and
    `headers`, never the opened value."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: RecordHeaders = ()
    sealed_value: bytes | None = None
    event_id: int | None = None

    @property
    def original_value(self) -> bytes:
        """The value exactly as it was read from Kafka (still sealed, if it was)."""
        return self.sealed_value if self.sealed_value is not None else self.value


@dataclass(frozen=True)
class Rejected:
    """A record that can never be processed, and why (names the field/rule; no message text)."""

    record: RawRecord
    reason: str
    # False for a record whose seal did not open and whose value is not sealed bytes (no seal
    # headers, or plaintext under copied ones) while sealing is required: it may be message
    # text in the clear, so its dead letter leaves the value out (`dlq.value` says why)
    # instead of keeping it 7 x the message topic's retention, shredded by no key. It could not
    # be replayed anyway: it would be refused again as not sealed.
    keep_value: bool = True


UNSEALED_VALUE_OMITTED = (
    "omitted: the record was not sealed (a value in the clear is never kept in the dead-letter "
    "topic); have its producer publish it again, sealed"
)

Process = Callable[[Sequence[RawRecord]], list[Rejected]]


class Stopped(Exception):
    """The worker is stopping: the batch in hand was not handled and must not be acked."""


def run_until_done(
    stage: str, process: Process, batch: Sequence[RawRecord], stop: threading.Event
) -> list[Rejected]:
    """Call `process` until it succeeds or `stop` is set: every failure here is retriable.

    Per-record permanent problems are returned as `Rejected` by `process` itself; anything raised
    means the batch as a whole could not be handled now (server down, overload), so we wait and try
    again rather than drop or skip. The backoff is capped so recovery is noticed within seconds.
    Raises `Stopped` once `stop` is set (checked before each attempt and during each wait); an
    attempt already running is not interrupted.
    """
    delay = 0.1
    attempt = 0
    while not stop.is_set():
        try:
            return process(batch)
        except Exception as exc:  # noqa: BLE001 - see docstring: hold the batch, never skip
            attempt += 1
            RETRIES.labels(stage).inc()
            log.warning(
                "batch failed, retrying",
                extra={
                    "stage": stage,
                    "attempt": attempt,
                    "error": type(exc).__name__,
                    "detail": str(exc)[:200],
                    "records": len(batch),
                },
            )
            if stop.wait(delay):
                break
            delay = min(delay * 2, 5.0)
    raise Stopped()


MAX_LETTER_KEY = 1024
"""Longest record key a dead letter keeps once its value and headers had to be left out (a
chat id is 36 bytes)."""

MAX_SEAL_HEADER = 64
"""Longest `sealstream.*` header value such a letter keeps (a key id: 1..64 characters)."""


class DeadLetterWriter:
    """Publishes dead letters: the record as it came (key, value still sealed, its own
    headers) followed by the `dlq.*` headers.

    A record the dead-letter topic refuses for good (larger than the topic takes) is replaced by
    a letter with the same key and headers, no value, and a `dlq.value` header saying why: the
    headers point at the original record, still in the message topic until its retention ends.
    Publishing is retried like a batch (the offset must not be committed before the topic has
    the letter) until `stop` is set; letters published before a stop are published again when
    the batch is redelivered.
    """

    def __init__(self, publisher: Publisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic

    def write(
        self,
        stage: str,
        rejected: Sequence[Rejected],
        stop: threading.Event,
        owned: Callable[[RawRecord], bool] = lambda record: True,
    ) -> int:
        """Publish each letter, retrying until `stop`; returns how many were published.

        A letter whose record is no longer `owned` (its partition moved to another worker
        meanwhile, which letters the record itself) is left out, also between the retries of a
        publish. Raises `Stopped` when `stop` is set before every letter was published.
        """
        published = 0
        for item in rejected:
            if not owned(item.record):
                continue
            letter = DeadLetter(
                stage=stage,
                reason=item.reason,
                topic=item.record.topic,
                partition=item.record.partition,
                offset=item.record.offset,
            )
            log.warning(
                "record dead-lettered",
                extra={
                    "stage": stage,
                    "reason": item.reason,
                    "partition": letter.partition,
                    "offset": letter.offset,
                },
            )
            publish = self._publisher_for(letter, owned, item.keep_value)
            sent = run_until_done(stage, publish, [item.record], stop)
            published += len(sent)
        return published

    def _publisher_for(
        self, letter: DeadLetter, owned: Callable[[RawRecord], bool], keep_value: bool = True
    ) -> Process:
        def publish(records: Sequence[RawRecord]) -> list[Rejected]:
            """Returns the letters published (as `Rejected`, for counting)."""
            sent: list[Rejected] = []
            for r in records:
                if not owned(r):
                    continue
                sent.append(Rejected(r, letter.reason))
                # The record's own headers first (its seal's key and event id), then why: a
                # replay republishes the original value with the headers not starting `dlq.`.
                headers: Headers = [*r.headers, *dead_letter_headers(letter)]
                if not keep_value:
                    self._publish_without_value(r, letter, headers, UNSEALED_VALUE_OMITTED)
                    continue
                try:
                    self.publisher.publish(
                        self.topic, [(r.key or b"", r.original_value)], headers=headers
                    )
                except RecordRefused as exc:
                    log.warning(
                        "dead letter published without its value",
                        extra={"stage": letter.stage, "offset": letter.offset, "error": exc.code},
                    )
                    omitted = f"omitted: the dead-letter topic refused it ({exc.code})"
                    self._publish_without_value(r, letter, headers, omitted)
            return sent

        return publish

    def _publish_without_value(
        self, r: RawRecord, letter: DeadLetter, headers: Headers, omitted: str
    ) -> None:
        """The letter without its value (`dlq.value`: `omitted`, why); if the topic refuses
        that too (the record's own key or headers fill the record limit: anyone who may write
        the message topic can send one), without the record's own headers and with its key only
        if short, so that one record can never hold a stage in a retry loop. The `dlq.*`
        headers are always kept."""
        try:
            self.publisher.publish(
                self.topic,
                [(r.key or b"", None)],
                headers=[*headers, ("dlq.value", omitted.encode())],
            )
            return
        except RecordRefused:
            pass
        log.warning(
            "dead letter published without its value, key and headers",
            extra={"stage": letter.stage, "offset": letter.offset},
        )
        key = r.key or b""
        # Its seal headers are kept when they are of a seal's size (a key id is at most 64
        # characters, an event id 19 digits); every other header of its own is left out.
        seal_headers = [
            (name, value)
            for name, value in r.headers
            if name.startswith("sealstream.") and len(value or b"") <= MAX_SEAL_HEADER
        ]
        stripped = (
            f"{omitted}; so were the record's own headers (but its seal's) and a key over "
            f"{MAX_LETTER_KEY} bytes"
        )
        self.publisher.publish(
            self.topic,
            [(key if len(key) <= MAX_LETTER_KEY else b"", None)],
            headers=[*seal_headers, *dead_letter_headers(letter), ("dlq.value", stripped.encode())],
        )


Partition = tuple[str, int]


@dataclass
class Batch:
    """The records handed to `process`, minus those of partitions abandoned by a revocation.

    Shared by the main thread (rebalance callbacks abandon partitions) and the batch thread
    (each retry processes what is still live), hence the lock.
    """

    records: list[RawRecord]
    abandoned: set[Partition] = field(default_factory=set)
    committed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def live(self) -> list[RawRecord]:
        with self._lock:
            if not self.abandoned:
                return self.records
            return [r for r in self.records if (r.topic, r.partition) not in self.abandoned]

    def partitions(self) -> set[Partition]:
        return {(r.topic, r.partition) for r in self.records}

    def owns(self, record: RawRecord) -> bool:
        """Whether `record`'s partition is still this batch's to handle (not abandoned)."""
        with self._lock:
            return (record.topic, record.partition) not in self.abandoned

    def abandon(self, partitions: set[Partition]) -> int:
        """Leave these partitions' records to their new owner; returns how many were dropped."""
        with self._lock:
            fresh = (partitions & self.partitions()) - self.abandoned
            self.abandoned |= fresh
        return sum(1 for r in self.records if (r.topic, r.partition) in fresh)

    def next_offsets(self) -> list[TopicPartition]:
        """The offset to commit per live partition: one past the last record handled."""
        last: dict[Partition, int] = {}
        for r in self.live():
            key = (r.topic, r.partition)
            last[key] = max(last.get(key, -1), r.offset)
        return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


class BatchThread:
    """Runs the handling of one batch in a daemon thread.

    A daemon thread, so a sink call hanging at SIGTERM does not keep the worker alive; abandoning
    such a call is safe because nothing is committed until it returned: its batch is redelivered.
    """

    def __init__(self, fn: Callable[[], int]) -> None:
        self.done = threading.Event()
        self.result = 0
        self.error: BaseException | None = None
        self._fn = fn
        threading.Thread(target=self._run, name="sealstream-batch", daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.done.set()

    @property
    def succeeded(self) -> bool:
        return self.done.is_set() and self.error is None


def consumer_config(kafka: KafkaSettings, group_id: str, client_id: str) -> dict[str, Any]:
    """The librdkafka configuration of a worker's consumer (see the module docstring)."""
    return kafka_client_config(
        kafka,
        {
            "group.id": group_id,
            "client.id": client_id,
            "auto.offset.reset": "earliest",
            # Offsets are committed by the runtime, explicitly, after the batch was handled.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Only the partitions that move stop during a rebalance; the others keep flowing.
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            # Bounded prefetch per partition (librdkafka's default is 64 MiB per partition).
            "queued.max.messages.kbytes": 16384,
        },
    )


def _record_headers(headers: object) -> RecordHeaders:
    """confluent-kafka's headers as a tuple (`sealstream.record_seal.header_pairs`)."""
    return tuple(header_pairs(headers))


class ConsumerRuntime:
    """Reads the message topic in batches in consumer group `group_id` until `stop` is set."""

    def __init__(
        self,
        stage: str,
        kafka: KafkaSettings,
        group_id: str,
        process: Process,
        dead_letters: DeadLetterWriter,
        max_size: int = 500,
        max_wait: float = 0.05,
        stop: threading.Event | None = None,
        opener: RecordOpener | None = None,
    ) -> None:
        self.stage = stage
        self.kafka = kafka
        # Sealed records are opened with it before `process` sees them; with
        # `kafka.seal_records` every record must be sealed, else unsealed ones pass as they are.
        self.opener = opener
        self.group_id = group_id
        self.process = process
        self.dead_letters = dead_letters
        self.max_size = max_size
        self.max_wait = max_wait
        self.stop = stop if stop is not None else threading.Event()
        self._consumer: Consumer | None = None
        self._collecting: list[RawRecord] = []  # read, not yet handed to `process`
        self._carry: list[RawRecord] = []  # handed out by poll() while a batch was held
        self._in_flight: tuple[Batch, BatchThread] | None = None
        self._paused = False
        self._joined = False
        # The partitions the group gave this worker, as its rebalance callbacks saw them.
        self._owned: set[Partition] = set()
        self._committed: dict[Partition, int] = {}  # as far as this worker knows (lag gauge)
        self._uncommitted: dict[Partition, int] = {}  # handled, commit refused: retried
        self._lag_at = 0.0

    # -- readiness and lag -------------------------------------------------------------------

    def ready(self) -> bool:
        """Joined its consumer group (received an assignment, possibly empty) and not stopping."""
        return self._joined and not self.stop.is_set()

    def _report_lag(self, consumer: Consumer) -> None:
        """Sum over assigned partitions of (high watermark - committed offset), every 5 s.

        While a batch is held the watermarks are asked of the broker (up to 1 s per partition,
        the first failure ends the round), since paused partitions are not fetched.
        """
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        try:
            assigned = consumer.assignment()
            unknown = [tp for tp in assigned if (tp.topic, tp.partition) not in self._committed]
            if unknown:
                for tp in consumer.committed(unknown, timeout=1.0):
                    self._committed[(tp.topic, tp.partition)] = max(tp.offset, 0)
            total = 0
            for tp in assigned:
                if self._paused:
                    # A paused partition is not fetched, so its cached watermarks stay where the
                    # pause left them: while a batch is held (when the lag grows), ask the broker.
                    low, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                else:
                    low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0:
                    # Records below the low watermark (expired) are behind nobody.
                    start = max(self._committed.get((tp.topic, tp.partition), 0), low)
                    total += max(0, high - start)
            LAG.labels(self.stage).set(float(total))
        except Exception as exc:  # noqa: BLE001 - a metric must never break the worker
            log.debug("lag not reported", extra={"stage": self.stage, "error": type(exc).__name__})

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        consumer = Consumer(consumer_config(self.kafka, self.group_id, f"{self.stage}-worker"))
        self._consumer = consumer
        consumer.subscribe(
            [self.kafka.messages_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not self.stop.is_set():
                records = self._collect(consumer)
                if records:
                    self._handle(consumer, records)
        finally:
            self.stop.set()  # a revocation during close must not wait for a batch
            consumer.close()  # leaves the group: the partitions move at once

    def _collect(self, consumer: Consumer) -> list[RawRecord]:
        """Up to `max_size` records, returned once full or once the oldest is `max_wait` old."""
        self._collecting, self._carry = self._carry, []
        first_at = time.monotonic() if self._collecting else None
        while not self.stop.is_set():
            if first_at is None:
                # poll() returns at the first record; consume() would wait for a full batch.
                message = consumer.poll(POLL_S)
                messages = [message] if message is not None else []
            else:
                timeout = max(0.0, first_at + self.max_wait - time.monotonic())
                messages = consumer.consume(self.max_size - len(self._collecting), timeout)
            self._accept(messages, self._collecting)  # callbacks may have dropped some meanwhile
            if self._uncommitted:
                self._flush_commits(consumer)
            if self._collecting and first_at is None:
                first_at = time.monotonic()
            self._report_lag(consumer)
            if len(self._collecting) >= self.max_size or (
                first_at is not None and time.monotonic() - first_at >= self.max_wait
            ):
                break
        batch, self._collecting = self._collecting, []
        return batch if not self.stop.is_set() else []

    def _accept(self, messages: list[Message], into: list[RawRecord]) -> None:
        """Append the records of `messages` to `into`, leaving out those of partitions this
        worker no longer owns: `consume()` can return, after the revocation callback it ran,
        records it had taken from the revoked partitions before (librdkafka purges them only if
        the same call reaches the partition's barrier); handing them to `process` would commit a
        partition another member owns and dead-letter its records twice."""
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                # Transient (broker down, max.poll.interval exceeded: then on_lost follows).
                log.warning("consumer error", extra={"stage": self.stage, "error": error.name()})
                continue
            if (m.topic() or "", m.partition() or 0) not in self._owned:
                continue
            value = m.value()
            headers = m.headers()
            into.append(
                RawRecord(
                    m.topic() or "",
                    m.partition() or 0,
                    m.offset() or 0,
                    m.key(),
                    value or b"",
                    _record_headers(headers),
                )
            )

    def _handle(self, consumer: Consumer, records: list[RawRecord]) -> None:
        started = time.perf_counter()
        batch = Batch(records)
        work = BatchThread(lambda: self._work(batch))
        self._in_flight = (batch, work)
        try:
            if not work.done.wait(HOLD_AFTER_S):
                self._hold(consumer, batch, work)
        finally:
            self._in_flight = None
        if not work.done.is_set() or isinstance(work.error, Stopped):
            if self.stop.is_set():
                log.info(
                    "stopping: batch left uncommitted for redelivery",
                    extra={"stage": self.stage, "records": len(records)},
                )
            else:
                log.info(
                    "batch abandoned to the partitions' new owners",
                    extra={"stage": self.stage, "records": len(records)},
                )
            return
        if work.error is not None:
            raise work.error  # not a batch failure (those are retried): a bug, stop the worker
        if not batch.committed:
            self._commit(consumer, batch)
        handled = len(batch.live())
        RECORDS.labels(self.stage, "ok").inc(handled - work.result)
        RECORDS.labels(self.stage, "dead_letter").inc(work.result)
        BATCH_SIZE.labels(self.stage).observe(handled)
        BATCH_SECONDS.labels(self.stage).observe(time.perf_counter() - started)

    def _work(self, batch: Batch) -> int:
        """In the batch thread: process (with retries) and dead-letter; returns the dead letters.

        Each attempt processes the records still live, so a partition abandoned by a revocation
        while the batch is held is left out of later attempts and of the dead letters.
        """

        def attempt(_: Sequence[RawRecord]) -> list[Rejected]:
            live = batch.live()
            if not live:
                return []
            # Opening is inside the retried attempt: Postgres or the KMS down (a topic key not
            # to be had) holds the batch like any sink outage; only a refusal dead-letters.
            opened, refused = self._open(live)
            return [*refused, *(self.process(opened) if opened else [])]

        rejected = run_until_done(self.stage, attempt, batch.records, self.stop)
        rejected = [r for r in rejected if batch.owns(r.record)]
        if not rejected:
            return 0
        # A partition may be abandoned while its letters are published (the topic is down): its
        # new owner letters those records, so they are left out here.
        return self.dead_letters.write(self.stage, rejected, self.stop, owned=batch.owns)

    def _open(self, records: Sequence[RawRecord]) -> tuple[list[RawRecord], list[Rejected]]:
        """The records with their values opened, and the refusals (not sealed while sealing is
        required, tampered, a key unknown or destroyed). Raises `StoreUnavailable` when a key
        cannot be fetched now (retried by the caller)."""
        if self.opener is None:
            return list(records), []
        opened: list[RawRecord] = []
        refused: list[Rejected] = []
        required = self.kafka.seal_records
        for r in records:
            if not required and not is_sealed(r.headers):
                opened.append(r)  # sealing off: a plaintext record is taken as it is
                continue
            try:
                plain, event_id = self.opener.open_with_event_id(r.topic, r.key, r.headers, r.value)
            except SealRefused as exc:
                # Kept only if it is sealed bytes: not sealed, or plaintext under seal headers
                # copied from another record, is possibly text in the clear.
                keep = is_sealed(r.headers) and has_sealed_format(r.value)
                refused.append(Rejected(r, exc.reason, keep_value=keep))
                continue
            opened.append(replace(r, value=plain, sealed_value=r.value, event_id=event_id))
        return opened, refused

    def _hold(self, consumer: Consumer, batch: Batch, work: BatchThread) -> None:
        """Keep the membership while the batch is retried: pause every partition and poll."""
        assigned = consumer.assignment()
        consumer.pause(assigned)
        self._paused = True
        log.info("batch held: partitions paused", extra={"stage": self.stage})
        try:
            while not work.done.is_set() and not self.stop.is_set() and batch.live():
                message = consumer.poll(POLL_S)
                if message is not None:  # fetched before the pause took effect: keep it
                    self._accept([message], self._carry)
                if self._uncommitted:
                    self._flush_commits(consumer)
                self._report_lag(consumer)
        finally:
            self._paused = False
            if not self.stop.is_set():
                consumer.resume(consumer.assignment())

    def _commit(self, consumer: Consumer, batch: Batch) -> None:
        """Commit the next offsets of a handled batch (its live partitions), synchronously."""
        batch.committed = True
        for tp in batch.next_offsets():
            key = (tp.topic, tp.partition)
            self._uncommitted[key] = max(self._uncommitted.get(key, 0), tp.offset)
        self._flush_commits(consumer)

    def _flush_commits(self, consumer: Consumer, only: set[Partition] | None = None) -> None:
        """Commit the handled offsets not committed yet (all, or those of `only`).

        A commit the broker refuses mid-rebalance (ILLEGAL_GENERATION, REBALANCE_IN_PROGRESS) or
        while it is unreachable keeps its offsets here; they are committed again after the next
        poll, or in the revocation callback before the partition moves (the worker still owns it
        there). Only a lost partition drops them: its records are then redelivered to the new
        owner, which the idempotent sinks absorb.
        """
        keys = [k for k in self._uncommitted if only is None or k in only]
        if not keys:
            return
        offsets = [TopicPartition(t, p, self._uncommitted[(t, p)]) for t, p in keys]
        try:
            results = consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            error = exc.args[0]
            name = error.name() if isinstance(error, KafkaError) else type(error).__name__
            log.warning(
                "commit refused, kept for the next poll", extra={"stage": self.stage, "error": name}
            )
            return
        failed = {(tp.topic, tp.partition) for tp in results if tp.error is not None}
        for key in keys:
            if key not in failed:
                self._committed[key] = self._uncommitted.pop(key)
        if failed:
            log.warning(
                "commit refused for some partitions, kept for the next poll",
                extra={"stage": self.stage, "partitions": sorted(p for _, p in failed)},
            )

    # -- rebalance callbacks (run inside consume()/poll() on the main thread) -----------------

    def _wait_unless_stopping(self, work: BatchThread, seconds: float) -> None:
        """Wait up to `seconds` for `work`, but no longer once the worker is stopping (SIGTERM
        during a revocation must not wait out `revoke_wait_ms`)."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or work.done.wait(min(left, POLL_S)):
                return

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = True
        self._owned |= {(tp.topic, tp.partition) for tp in partitions}
        REBALANCES.labels(self.stage, "assigned").inc(len(partitions))
        log.info(
            "partitions assigned",
            extra={"stage": self.stage, "partitions": sorted(tp.partition for tp in partitions)},
        )
        if partitions:
            consumer.incremental_assign(partitions)
            # librdkafka keeps a partition's pause flag across unassign and re-assign: one
            # revoked while this worker held a batch would come back paused for good. So each
            # assigned partition is set as the runtime wants it: paused while a batch is held.
            if self._paused:
                consumer.pause(partitions)
            else:
                consumer.resume(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, lost=True)

    def _release(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool) -> None:
        """Finish (commit) or abandon what this worker holds of partitions it no longer owns."""
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._owned -= gone
        REBALANCES.labels(self.stage, "lost" if lost else "revoked").inc(len(partitions))
        for pending in (self._collecting, self._carry):
            pending[:] = [r for r in pending if (r.topic, r.partition) not in gone]
        if self._in_flight is not None:
            batch, work = self._in_flight
            if not batch.committed and batch.partitions() & gone:
                if not lost:
                    self._wait_unless_stopping(work, self.kafka.revoke_wait_ms / 1000)
                if not lost and work.succeeded:
                    self._commit(consumer, batch)  # still the owner until this callback returns
                else:
                    dropped = batch.abandon(gone)
                    REBALANCES.labels(self.stage, "abandoned_records").inc(dropped)
        if not lost:
            self._flush_commits(consumer, only=gone)  # a last chance while still the owner
        for key in gone:
            self._committed.pop(key, None)
            if self._uncommitted.pop(key, None) is not None:
                log.warning(
                    "handled records left uncommitted: redelivered to the new owner",
                    extra={"stage": self.stage, "partition": key[1]},
                )
        log.info(
            "partitions lost" if lost else "partitions revoked",
            extra={"stage": self.stage, "partitions": sorted(p for _, p in gone)},
        )


def run_worker(
    stage: str,
    settings: Settings,
    group_id: str,
    http: HttpSettings,
    process: Process,
    stack: ExitStack,
    max_size: int = 500,
    max_wait: float = 0.05,
) -> None:
    """Run a consumer worker until SIGTERM/SIGINT: dead-letter publisher, runtime, health endpoint.

    Called from the main thread (a worker process) it installs the SIGTERM/SIGINT handlers that
    stop it; to run a runtime in another thread, build a `ConsumerRuntime` with a `stop` event of
    your own instead.
    """
    publisher = Publisher(settings.kafka, client_id=f"{stage}-dlq")
    stack.callback(publisher.close)
    # Always: with sealing off, records sealed before are still opened (not dead-lettered).
    opener = record_opener(settings)
    stack.callback(opener.close)
    stop = threading.Event()
    stack.callback(stop.set)  # whatever ends the worker also ends a retry loop still running
    runtime = ConsumerRuntime(
        stage,
        settings.kafka,
        group_id,
        process,
        DeadLetterWriter(publisher, settings.kafka.dead_letter_topic),
        max_size=max_size,
        max_wait=max_wait,
        stop=stop,
        opener=opener,
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"stage": stage, "signal": signal.Signals(signum).name})
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    endpoint = serve(http, ready=runtime.ready)
    stack.callback(endpoint.shutdown)
    runtime.run()
