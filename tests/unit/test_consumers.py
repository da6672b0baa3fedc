"""The consumer stages' rules, without servers: what the schema refuses and normalises, how a
sink's per-item refusals become dead letters, how retry loops end on a stop signal, how the
dead-letter writer handles a letter the topic refuses, how the runtime finishes or abandons the
batch in hand when a partition moves."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from pydantic import SecretStr

from encryptor.logic import encrypt_and_store
from indexer.logic import index_batch
from schemas.events import MessageRecord, decode_record
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import RefusedRow, StoredMessage
from sealstream.adapters.kafka import Headers, RecordRefused
from sealstream.adapters.opensearch import IndexedMessage, RefusedDocument
from sealstream.crypto import ChatKey
from sealstream.errors import StoreUnavailable
from sealstream.record_seal import RecordOpener, RecordSealer, TopicKey
from sealstream.settings import KafkaSettings
from sealstream.streaming import (
    Batch,
    BatchThread,
    ConsumerRuntime,
    DeadLetterWriter,
    RawRecord,
    Rejected,
    Stopped,
    consumer_config,
    run_until_done,
)

IDS = SnowflakeIds(5)


def record_json(**overrides: object) -> bytes:
    chat = uuid.uuid4()
    fields: dict[str, object] = {
        "message_id": IDS.next_id(),
        "chat_id": str(chat),
        "sender_id": "alice",
        "text": "hello there",
        "sent_at": "2026-03-01T12:00:00+02:00",
    }
    fields.update(overrides)
    return json.dumps(fields).encode()


def keyed(value: bytes) -> tuple[bytes, bytes]:
    """A record value with the key its producer must give it (the chat id)."""
    return value, str(json.loads(value)["chat_id"]).encode()


# --- schema: times ---------------------------------------------------------------------------


def test_sent_at_is_normalised_to_utc() -> None:
    decoded = decode_record(*keyed(record_json(sent_at="2026-03-01T12:00:00+18:00")))
    assert isinstance(decoded, MessageRecord)
    assert decoded.sent_at == datetime(2026, 2, 28, 18, 0, tzinfo=UTC)
    assert decoded.sent_at.utcoffset() == timedelta(0)
    assert '"sent_at":"2026-02-28T18:00:00Z"' in decoded.value().decode()


@pytest.mark.parametrize(
    ("sent_at", "rule"),
    [
        ("2026-03-01T12:00:00+20:00", "18:00"),
        ("2026-03-01T12:00:00-18:01", "18:00"),
        ("2026-03-01T12:00:00", "UTC offset"),
        ("0001-01-01T00:30:00+01:00", "years 1 to 9999"),
        ("9999-12-31T23:30:00-01:00", "years 1 to 9999"),
    ],
)
def test_times_no_sink_can_store_are_refused_naming_the_field(sent_at: str, rule: str) -> None:
    reason = decode_record(record_json(sent_at=sent_at, text="secret words"), None)
    assert isinstance(reason, str)
    assert "sent_at" in reason and rule in reason
    assert "secret" not in reason


# --- stages: a sink's per-item refusals are dead letters -------------------------------------


class RefusingIndex:
    def __init__(self, refuse: set[int], failures: int = 0) -> None:
        self.refuse = refuse
        self.indexed: list[IndexedMessage] = []
        self.failures = failures

    def analyze_terms(self, texts: list[str]) -> list[list[str]]:
        """A stand-in for OpenSearch's analysis (tests/integration/test_search_languages.py
        covers the real one): words split at spaces, lowercased."""
        return [sorted({w.lower() for w in t.split()}) for t in texts]

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("index busy")
        self.indexed += [m for m in messages if m.message_id not in self.refuse]
        return [
            RefusedDocument(m.message_id, "refused (HTTP 400)")
            for m in messages
            if m.message_id in self.refuse
        ]


def raw_records(values: list[bytes]) -> list[RawRecord]:
    def key(value: bytes) -> bytes | None:
        try:
            return str(json.loads(value)["chat_id"]).encode()  # the key producers must set
        except (ValueError, KeyError, TypeError):
            return None

    return [RawRecord("t", 0, offset, key(value), value) for offset, value in enumerate(values)]


def test_indexer_dead_letters_refused_documents_and_bad_records() -> None:
    ids = [IDS.next_id() for _ in range(3)]
    records = raw_records([record_json(message_id=i) for i in ids] + [b"{}"])
    sink = RefusingIndex(refuse={ids[1]})
    rejected = index_batch(records, sink)
    assert sorted((r.record.offset, r.reason.split(":")[0]) for r in rejected) == [
        (1, "refused (HTTP 400)"),
        (3, "invalid record"),
    ]
    assert [m.message_id for m in sink.indexed] == [ids[0], ids[2]]
    assert all(m.sent_at.tzinfo == UTC for m in sink.indexed)


class Keys:
    def __init__(self) -> None:
        self.usage: dict[tuple[uuid.UUID, int], int] = {}

    def current_key(self, chat_id: uuid.UUID) -> ChatKey:
        return ChatKey(1, b"k" * 32)

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]:
        for key, n in counts.items():
            self.usage[key] = self.usage.get(key, 0) + n
        return []


class RefusingStore:
    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.rows: list[StoredMessage] = []

    def write_many(self, messages: Sequence[StoredMessage]) -> list[RefusedRow]:
        self.rows += [m for m in messages if m.message_id not in self.refuse]
        return [
            RefusedRow(m.message_id, "the message store refused the row (InvalidRequest)")
            for m in messages
            if m.message_id in self.refuse
        ]


def test_encryptor_dead_letters_rows_the_store_refuses_and_counts_only_written_ones() -> None:
    chat = uuid.uuid4()
    ids = [IDS.next_id() for _ in range(3)]
    records = [
        RawRecord("t", 0, n, str(chat).encode(), record_json(message_id=i, chat_id=str(chat)))
        for n, i in enumerate(ids)
    ]
    keys, store = Keys(), RefusingStore(refuse={ids[2]})
    rejected = encrypt_and_store(records, keys, store)
    assert [(r.record.offset, "InvalidRequest" in r.reason) for r in rejected] == [(2, True)]
    assert [m.message_id for m in store.rows] == ids[:2]
    assert keys.usage == {(chat, 1): 2}


# --- retry loops end on the stop signal ------------------------------------------------------


def test_retry_loop_retries_a_failing_batch_until_it_succeeds() -> None:
    sink = RefusingIndex(refuse=set(), failures=2)
    records = raw_records([record_json()])
    assert run_until_done("t", lambda b: index_batch(b, sink), records, threading.Event()) == []
    assert len(sink.indexed) == 1


def test_retry_loop_ends_with_stopped_when_the_stop_signal_is_set() -> None:
    stop = threading.Event()
    attempts: list[int] = []

    def down(batch: Sequence[RawRecord]) -> list[Rejected]:
        attempts.append(len(batch))
        if len(attempts) == 3:
            stop.set()  # as SIGTERM does, from another thread, while the loop waits
        raise StoreUnavailable("down")

    with pytest.raises(Stopped):
        run_until_done("t", down, raw_records([b"x"]), stop)
    assert attempts == [1, 1, 1]
    with pytest.raises(Stopped):  # once stopped, no new attempt starts
        run_until_done("t", down, raw_records([b"x"]), stop)
    assert len(attempts) == 3


# --- dead-letter publishing ------------------------------------------------------------------


class Topic:
    """A dead-letter topic that refuses values above `max_bytes`, or is down `failures` times."""

    def __init__(self, max_bytes: int, failures: int = 0) -> None:
        self.max_bytes = max_bytes
        self.failures = failures
        self.letters: list[tuple[bytes, bytes | None, dict[str, bytes]]] = []

    def publish(
        self, topic: str, items: Sequence[tuple[bytes, bytes | None]], headers: Headers | None
    ) -> list[object]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("no broker")
        for key, value in items:
            if value is not None and len(value) > self.max_bytes:
                raise RecordRefused("MSG_SIZE_TOO_LARGE")
            header_map = {k: v for k, v in headers or [] if isinstance(v, bytes)}
            self.letters.append((key, value, header_map))
        return []


def test_a_letter_too_large_for_the_topic_is_published_without_its_value() -> None:
    topic = Topic(max_bytes=100, failures=1)
    writer = DeadLetterWriter(topic, "dlq")  # type: ignore[arg-type]
    small, large = RawRecord("t", 2, 10, b"k1", b"x" * 50), RawRecord("t", 2, 11, b"k2", b"y" * 500)
    writer.write(
        "indexer", [Rejected(small, "bad small"), Rejected(large, "bad large")], threading.Event()
    )
    [(k1, v1, h1), (k2, v2, h2)] = topic.letters
    assert (k1, v1, h1["dlq.reason"], h1["dlq.offset"]) == (b"k1", small.value, b"bad small", b"10")
    assert (k2, v2, h2["dlq.reason"], h2["dlq.offset"]) == (b"k2", None, b"bad large", b"11")
    assert b"MSG_SIZE_TOO_LARGE" in h2["dlq.value"] and "dlq.value" not in h1


def test_dead_letter_publishing_ends_with_stopped_when_stopping() -> None:
    stop = threading.Event()
    stop.set()
    writer = DeadLetterWriter(Topic(max_bytes=100, failures=10**6), "dlq")  # type: ignore[arg-type]
    with pytest.raises(Stopped):
        writer.write("indexer", [Rejected(RawRecord("t", 0, 0, None, b"x"), "bad")], stop)


# --- the runtime's rebalance rules: finish or abandon the batch in hand -----------------------


class FakeConsumer:
    """Records what the runtime commits; the real broker is in tests/e2e/test_rebalance.py."""

    def __init__(self, refuse: int = 0) -> None:
        self.commits: list[list[tuple[int, int]]] = []
        self.refuse = refuse  # commits refused as during a rebalance

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        assert asynchronous is False  # the offsets of a handled batch are committed synchronously
        if self.refuse:
            self.refuse -= 1
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION))
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])
        return offsets


def runtime_with(process: object, topic: Topic, revoke_wait_ms: int = 5000) -> ConsumerRuntime:
    kafka = KafkaSettings(revoke_wait_ms=revoke_wait_ms)
    writer = DeadLetterWriter(topic, "dlq")  # type: ignore[arg-type]
    return ConsumerRuntime("t", kafka, "g", process, writer)  # type: ignore[arg-type]


def records_on(partitions: dict[int, list[int]]) -> list[RawRecord]:
    return [
        RawRecord("t", p, o, b"k", b"v%d" % o) for p, offsets in partitions.items() for o in offsets
    ]


def test_the_consumer_never_auto_commits_and_shares_partitions_cooperatively() -> None:
    kafka = KafkaSettings(max_poll_interval_ms=20_000, password=SecretStr("unit-test"))
    config = consumer_config(kafka, "g", "c")
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["max.poll.interval.ms"] == 20_000


def test_group_timings_librdkafka_would_refuse_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="max_poll_interval_ms"):
        KafkaSettings(session_timeout_ms=10_000, max_poll_interval_ms=5_000)
    with pytest.raises(ValueError, match="revoke_wait_ms"):
        KafkaSettings(max_poll_interval_ms=10_000, revoke_wait_ms=10_000)


def test_a_batch_commits_one_past_the_last_record_of_each_partition_it_still_owns() -> None:
    batch = Batch(records_on({0: [5, 6, 7], 1: [3], 2: [10, 11]}))
    assert [(tp.partition, tp.offset) for tp in batch.next_offsets()] == [(0, 8), (1, 4), (2, 12)]
    assert batch.abandon({("t", 1), ("t", 9)}) == 1
    assert [(tp.partition, tp.offset) for tp in batch.next_offsets()] == [(0, 8), (2, 12)]
    assert {r.partition for r in batch.live()} == {0, 2}


def test_a_revoked_partitions_finished_batch_is_committed_before_it_moves() -> None:
    runtime = runtime_with(lambda records: [], Topic(max_bytes=100))
    batch = Batch(records_on({0: [1, 2], 1: [7]}))
    work = BatchThread(lambda: runtime._work(batch))
    assert work.done.wait(10)
    runtime._in_flight = (batch, work)
    consumer = FakeConsumer()
    runtime._release(consumer, [TopicPartition("t", 0)], lost=False)  # type: ignore[arg-type]
    assert consumer.commits == [[(0, 3), (1, 8)]]
    assert batch.committed and not batch.abandoned


def test_a_commit_refused_mid_rebalance_is_made_before_the_partition_moves() -> None:
    runtime = runtime_with(lambda records: [], Topic(max_bytes=100))
    consumer = FakeConsumer(refuse=1)
    batch = Batch(records_on({0: [4], 1: [2]}))
    runtime._commit(consumer, batch)  # type: ignore[arg-type]
    assert consumer.commits == []  # refused (ILLEGAL_GENERATION): kept, not forgotten
    runtime._release(consumer, [TopicPartition("t", 1)], lost=False)  # type: ignore[arg-type]
    assert consumer.commits == [[(1, 3)]]  # the revoked one, while this worker still owns it
    runtime._flush_commits(consumer)  # type: ignore[arg-type]  # after the next poll
    assert consumer.commits == [[(1, 3)], [(0, 5)]]


def test_a_held_batch_abandons_a_revoked_partition_uncommitted_and_retries_the_rest() -> None:
    down = threading.Event()
    down.set()
    seen: list[list[int]] = []

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        seen.append(sorted({r.partition for r in records}))
        if down.is_set():
            raise StoreUnavailable("down")
        return [Rejected(r, "bad") for r in records if r.offset == 7 or r.offset == 1]

    topic = Topic(max_bytes=100)
    runtime = runtime_with(process, topic, revoke_wait_ms=200)
    batch = Batch(records_on({0: [1, 2], 1: [7]}))
    work = BatchThread(lambda: runtime._work(batch))
    runtime._in_flight = (batch, work)
    runtime._collecting = records_on({1: [8], 2: [4]})  # read, not yet handed to `process`
    consumer = FakeConsumer()
    runtime._release(consumer, [TopicPartition("t", 1)], lost=False)  # type: ignore[arg-type]
    assert consumer.commits == []  # still held after revoke_wait: nothing of it committed
    assert batch.abandoned == {("t", 1)}
    assert [(r.partition, r.offset) for r in runtime._collecting] == [(2, 4)]
    down.clear()  # the sink is back: the retry handles partition 0 only
    assert work.done.wait(30) and work.error is None
    assert seen[0] == [0, 1] and seen[-1] == [0]
    # Only partition 0's bad record is dead-lettered: partition 1's new owner letters its own.
    assert [h["dlq.offset"] for _, _, h in topic.letters] == [b"1"]
    assert [(tp.partition, tp.offset) for tp in batch.next_offsets()] == [(0, 3)]


def test_a_lost_partition_is_abandoned_at_once_even_when_its_batch_finished() -> None:
    runtime = runtime_with(lambda records: [], Topic(max_bytes=100))
    batch = Batch(records_on({0: [1], 3: [9]}))
    work = BatchThread(lambda: runtime._work(batch))
    assert work.done.wait(10)
    runtime._in_flight = (batch, work)
    consumer = FakeConsumer()
    runtime._release(consumer, [TopicPartition("t", 3)], lost=True)  # type: ignore[arg-type]
    assert consumer.commits == []  # another member may own it already: no commit allowed
    assert [(tp.partition, tp.offset) for tp in batch.next_offsets()] == [(0, 2)]


def test_far_offsets_round_trip_only_within_java_limits() -> None:
    at = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-18)))
    ok = decode_record(*keyed(record_json(sent_at=at.isoformat())))
    assert isinstance(ok, MessageRecord) and ok.sent_at == at


class WatchedDone(threading.Event):
    """A batch thread's `done` event that says when someone began waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


def test_a_stop_during_a_revocation_ends_the_wait_for_the_batch_in_hand() -> None:
    hung = threading.Event()  # a sink call that does not return

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        hung.wait()
        return []

    kafka = KafkaSettings(max_poll_interval_ms=3_600_000, revoke_wait_ms=3_000_000)
    writer = DeadLetterWriter(Topic(max_bytes=100), "dlq")  # type: ignore[arg-type]
    runtime = ConsumerRuntime("t", kafka, "g", process, writer)
    batch = Batch(records_on({0: [1, 2]}))
    work = BatchThread(lambda: runtime._work(batch))
    work.done = WatchedDone()  # the thread is inside `process`: it sets `done` only later
    runtime._in_flight = (batch, work)
    consumer = FakeConsumer()
    revoking = threading.Thread(
        target=runtime._release, args=(consumer, [TopicPartition("t", 0)], False), daemon=True
    )
    try:
        revoking.start()
        assert work.done.waited.wait(30), "the revocation never waited for the batch"
        runtime.stop.set()  # SIGTERM while the revocation waits
        revoking.join(60)  # far below revoke_wait_ms (50 minutes)
        assert not revoking.is_alive(), "the revocation waited out revoke_wait_ms after a stop"
        assert consumer.commits == [] and batch.abandoned == {("t", 0)}
    finally:
        hung.set()


def test_letters_of_a_partition_abandoned_while_the_topic_is_down_go_to_its_new_owner() -> None:
    down_for = 10**6
    topic = Topic(max_bytes=100, failures=down_for)
    runtime = runtime_with(
        lambda records: [Rejected(r, "bad") for r in records], topic, revoke_wait_ms=100
    )
    batch = Batch(records_on({1: [7], 0: [1]}))  # partition 1's letter is retried first
    work = BatchThread(lambda: runtime._work(batch))
    runtime._in_flight = (batch, work)
    deadline = time.monotonic() + 30
    while topic.failures > down_for - 2:  # the letter of partition 1 was retried at least once
        assert time.monotonic() < deadline and not work.done.is_set()
        time.sleep(0.05)
    consumer = FakeConsumer()
    runtime._release(consumer, [TopicPartition("t", 1)], lost=False)  # type: ignore[arg-type]
    assert batch.abandoned == {("t", 1)} and consumer.commits == []
    topic.failures = 0  # the dead-letter topic is back
    assert work.done.wait(60) and work.error is None
    # Partition 1 moved while its letter waited: its new owner letters it, not this worker.
    assert [h["dlq.partition"] for _, _, h in topic.letters] == [b"0"]
    assert work.result == 1
    assert [(tp.partition, tp.offset) for tp in batch.next_offsets()] == [(0, 2)]


class FetchedMessage:
    """A confluent-kafka `Message` as `poll()`/`consume()` hand it out."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v%d" % self._offset

    def headers(self) -> None:
        return None


class ScriptedConsumer(FakeConsumer):
    """Each `poll()`/`consume()` call runs the next step: rebalance callbacks to run inside the
    call (as librdkafka runs them), then the messages the call returns."""

    def __init__(self, steps: list[tuple[list[object], list[FetchedMessage]]]) -> None:
        super().__init__()
        self.steps = steps

    def _next(self, timeout: float) -> list[FetchedMessage]:
        if not self.steps:
            time.sleep(timeout)
            return []
        callbacks, messages = self.steps.pop(0)
        for callback in callbacks:
            callback()  # type: ignore[operator]
        return messages

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        pass

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass

    def poll(self, timeout: float) -> FetchedMessage | None:
        messages = self._next(timeout)
        return messages[0] if messages else None

    def consume(self, num_messages: int, timeout: float) -> list[FetchedMessage]:
        return self._next(timeout)[:num_messages]


def test_records_a_consume_call_returns_after_revoking_their_partition_are_not_handled() -> None:
    runtime = runtime_with(lambda records: [], Topic(max_bytes=100))
    runtime.max_wait = 0.5
    consumer = ScriptedConsumer([])

    def assign() -> None:
        runtime._on_assign(consumer, [TopicPartition("t", 0), TopicPartition("t", 1)])  # type: ignore[arg-type]

    def revoke_0() -> None:
        runtime._on_revoke(consumer, [TopicPartition("t", 0)])  # type: ignore[arg-type]

    consumer.steps = [
        ([assign], [FetchedMessage(1, 4)]),
        # Partition 0 is revoked inside this call, which still returns one of its records,
        # taken from the queue before the callback ran.
        ([revoke_0], [FetchedMessage(0, 11), FetchedMessage(1, 5)]),
    ]
    batch = runtime._collect(consumer)  # type: ignore[arg-type]
    assert [(r.partition, r.offset) for r in batch] == [(1, 4), (1, 5)]
    assert [(tp.partition, tp.offset) for tp in Batch(batch).next_offsets()] == [(1, 6)]


# --- sealed records: opened before `process`, dead-lettered as they came ---------------------


class TopicKeys:
    """Our own `TopicKeySource` port: one key, or down (Postgres / KMS unreachable)."""

    def __init__(self) -> None:
        self.key = TopicKey("k1", "t", bytes(range(32)))
        self.down = 0

    def current(self, topic: str) -> TopicKey:
        return self.key

    def has_current(self, topic: str) -> bool:
        return True

    def by_id(self, topic: str, key_id: str) -> TopicKey:
        if self.down:
            self.down -= 1
            raise StoreUnavailable("Postgres unavailable")
        return self.key


def sealed_raw(offset: int, value: bytes, event_id: int) -> RawRecord:
    key = str(json.loads(value)["chat_id"]).encode()
    sealed, headers = RecordSealer(TopicKeys()).seal("t", key, event_id, value)
    return RawRecord("t", 0, offset, key, sealed, tuple(headers))


def test_sealed_records_are_opened_and_refusals_dead_lettered_as_they_came() -> None:
    keys = TopicKeys()
    keys.down = 2  # the first two attempts cannot fetch the key: the batch is held, then done
    seen: list[RawRecord] = []

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        seen.extend(records)
        return []

    topic = Topic(max_bytes=10_000)
    writer = DeadLetterWriter(topic, "dlq")  # type: ignore[arg-type]
    runtime = ConsumerRuntime("t", KafkaSettings(), "g", process, writer, opener=RecordOpener(keys))
    good_value = record_json()
    good = sealed_raw(0, good_value, json.loads(good_value)["message_id"])
    tampered = replace(good, offset=1, value=good.value[:-1] + bytes([good.value[-1] ^ 1]))
    plain = RawRecord("t", 0, 2, good.key, good_value)  # not sealed while sealing is on
    batch = Batch([good, tampered, plain])
    assert runtime._work(batch) == 2
    # The good record reached `process` opened, with its sealed value and event id kept.
    [opened] = seen
    assert opened.value == good_value and opened.original_value == good.value
    assert opened.event_id == json.loads(good_value)["message_id"]
    # Each refusal went to the dead-letter topic as it came: sealed value and own headers first;
    # a value that was not sealed (possibly text in the clear) is left out.
    [(_, v1, h1), (_, v2, h2)] = topic.letters
    assert v1 == tampered.value and b"authentication failed" in h1["dlq.reason"]
    assert h1["sealstream.key_id"] == b"k1"
    assert v2 is None and h2["dlq.reason"].startswith(b"record is not sealed")
    assert h2["dlq.value"].startswith(b"omitted: the record was not sealed")


def test_the_decoder_checks_the_sealed_event_id() -> None:
    value = record_json()
    key = str(json.loads(value)["chat_id"]).encode()
    own = json.loads(value)["message_id"]
    assert isinstance(decode_record(value, key, own), MessageRecord)
    assert decode_record(value, key, own + 1) == (
        "header sealstream.event_id does not match the record's event id"
    )


def test_with_sealing_off_plaintext_passes_and_sealed_records_still_open() -> None:
    seen: list[RawRecord] = []

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        seen.extend(records)
        return []

    writer = DeadLetterWriter(Topic(max_bytes=10_000), "dlq")  # type: ignore[arg-type]
    runtime = ConsumerRuntime(
        "t",
        KafkaSettings(seal_records=False),
        "g",
        process,
        writer,
        opener=RecordOpener(TopicKeys()),
    )
    value = record_json()
    sealed = sealed_raw(0, value, json.loads(value)["message_id"])
    plain = RawRecord("t", 0, 1, sealed.key, value)
    assert runtime._work(Batch([sealed, plain])) == 0
    assert [r.value for r in seen] == [value, value]
