"""The producer and consumer libraries on the real stack (Kafka, Postgres, OpenBao), on topics and
consumer groups of this module's own.

What a direct producer publishes is on the topic sealed (no text in any value or header) with ids
from a leased worker id; a consumer in a group of its own reads every record back as a validated
`MessageRecord`, hands back what it cannot use with the reason, and commits only what the caller
committed: a consumer killed before `commit()` leaves its batch to the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from schemas.events import MessageRecord
from schemas.ids import SEQUENCE_BITS, WORKER_BITS, SnowflakeIds
from sealstream.adapters.kafka import kafka_client_config
from sealstream.adapters.vault import TransitKms
from sealstream.consumer import BatchNotCommitted, MessageBatch, MessageConsumer
from sealstream.errors import KmsUnavailable, SealRefused
from sealstream.producer import InvalidProducerMessage, MessageProducer, Sent
from sealstream.record_seal import (
    HEADER_EVENT_ID,
    HEADER_KEY_ID,
    record_opener,
    record_sealer,
    sealed_key_id,
)
from sealstream.services import settings_env
from sealstream.settings import Settings
from sealstream.streaming import _record_headers
from tests.integration.conftest import KafkaTopics, NewGroup

SECRET = "zqlibsecret launch words"


@pytest.fixture(scope="module")
def lib_settings(
    settings: Settings, database: Any, kms: TransitKms, kafka_topic_factory: KafkaTopics
) -> Settings:
    """The run's settings on a message topic of this module's own (records sealed)."""
    kms.ensure_key(settings.vault.default_key)
    kafka = kafka_topic_factory("libs")
    return settings.model_copy(update={"kafka": kafka})


@pytest.fixture(scope="module")
def producer(lib_settings: Settings) -> Iterator[MessageProducer]:
    with MessageProducer(lib_settings, service="test-producer", timeout_seconds=30) as made:
        yield made


def post(chat: uuid.UUID, text: str, sender: str = "bot") -> dict[str, Any]:
    return {"chat_id": chat, "sender_id": sender, "text": text}


def read_all(consumer: MessageConsumer, want: int) -> list[MessageBatch]:
    """Batches (each committed) until `want` records came, or none came for 30 s."""
    got: list[MessageBatch] = []
    for batch in consumer.batches(idle_seconds=30):
        got.append(batch)
        batch.commit()
        if sum(len(b) for b in got) >= want:
            break
    return got


def raw_records(settings: Settings) -> list[Any]:
    """Every record of the topic as Kafka holds it: each partition read from its start to its
    end. Not "until nothing came for 10 s": on a loaded machine joining a group could take that
    long, and the first poll's silence read as an empty topic."""
    topic = settings.kafka.messages_topic
    reader = Consumer(
        kafka_client_config(
            settings.kafka,
            {
                "group.id": f"raw-{uuid.uuid4()}",  # never joined (assign), never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    records: list[Any] = []
    try:
        partitions = list(reader.list_topics(topic, timeout=30).topics[topic].partitions)
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + 60
        while len(at_end) < len(partitions):
            assert time.monotonic() < deadline, f"read to the end of partitions {at_end} only"
            m = reader.poll(0.5)
            if m is None:
                continue
            if m.error() is None:
                records.append(m)
            else:
                assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
                at_end.add(m.partition())
    finally:
        reader.close()
    return records


def test_producer_records_are_sealed_and_a_consumer_reads_them_back_validated(
    lib_settings: Settings, producer: MessageProducer, kafka_group: NewGroup
) -> None:
    chats = [uuid.uuid4() for _ in range(3)]
    posts = [post(chats[i % 3], f"{SECRET} {i}", sender=f"u{i % 4}") for i in range(30)]
    sent = producer.send_batch(posts)
    [single] = [producer.send(post(chats[0], f"{SECRET} single"))]
    edit = producer.send(
        {**post(chats[0], f"{SECRET} edited"), "kind": "edit", "message_id": single.message_id}
    )
    gone = producer.send(
        {
            "chat_id": chats[0],
            "sender_id": "bot",
            "kind": "delete",
            "message_id": sent[0].message_id,
        }
    )
    everything: list[Sent] = [*sent, single, edit, gone]

    # Ids: unique, all from one leased worker id, each post's event id its message id.
    events = [s.event_id for s in everything]
    assert len(set(events)) == len(events)
    workers = {(e >> SEQUENCE_BITS) & ((1 << WORKER_BITS) - 1) for e in events}
    assert len(workers) == 1, workers
    assert edit.message_id == single.message_id < edit.event_id < gone.event_id

    # On Kafka: sealed values, key id and event id in headers, no text anywhere.
    raw = raw_records(lib_settings)
    assert len(raw) == len(everything)
    for m in raw:
        headers = dict(m.headers() or [])
        assert set(headers) == {HEADER_KEY_ID, HEADER_EVENT_ID}
        assert b"zqlibsecret" not in m.value() and b"launch" not in m.value()
        assert not any(b"zqlib" in v for v in headers.values())
    assert {int(dict(m.headers())[HEADER_EVENT_ID]) for m in raw} == set(events)

    # A consumer of its own reads back exactly what was produced, in batches of at most 7.
    with MessageConsumer(
        lib_settings,
        kafka_group(f"{lib_settings.kafka.ml_group_prefix}libs-read"),
        batch_size=7,
        max_wait_seconds=0.5,
    ) as consumer:
        batches = read_all(consumer, len(everything))
    assert all(1 <= len(b) <= 7 for b in batches)
    records = [r for b in batches for r in b.records]
    assert not [r for b in batches for r in b.refused]
    by_event = {r.change_id: r for r in records}
    assert set(by_event) == set(events)
    for s, original in zip(sent, posts, strict=True):
        record = by_event[s.event_id]
        assert (record.kind, record.chat_id, record.sender_id, record.text) == (
            "post",
            original["chat_id"],
            original["sender_id"],
            original["text"],
        )
    assert (by_event[edit.event_id].kind, by_event[edit.event_id].text) == (
        "edit",
        f"{SECRET} edited",
    )
    assert by_event[gone.event_id].kind == "delete" and by_event[gone.event_id].text is None


def test_a_bad_message_is_refused_naming_the_field_and_nothing_reaches_kafka(
    lib_settings: Settings, producer: MessageProducer
) -> None:
    before = len(raw_records(lib_settings))
    chat = uuid.uuid4()
    with pytest.raises(InvalidProducerMessage) as caught:
        producer.send_batch([post(chat, f"{SECRET} ok"), {**post(chat, SECRET), "sender_id": ""}])
    assert caught.value.field == "messages.1.sender_id"
    assert "zqlibsecret" not in str(caught.value)
    assert len(raw_records(lib_settings)) == before


def test_records_the_consumer_cannot_use_are_handed_back_with_their_reason(
    lib_settings: Settings, kafka_topic_factory: KafkaTopics, kafka_group: NewGroup
) -> None:
    """On a topic of its own: a plaintext record, a tampered one, one sealed as another event,
    one with an invalid field (sealed properly), a tombstone, and two good ones around them."""
    settings = lib_settings.model_copy(update={"kafka": kafka_topic_factory("libs-bad")})
    topic = settings.kafka.messages_topic
    chat = uuid.uuid4()
    key = str(chat).encode()

    def record(text: str, message_id: int, **changes: Any) -> bytes:
        fields = {
            "message_id": message_id,
            "chat_id": str(chat),
            "sender_id": "bot",
            "text": text,
            "sent_at": datetime.now(UTC).isoformat(),
            **changes,
        }
        return json.dumps(fields).encode()

    sealer = record_sealer(settings)
    try:
        good1, h1 = sealer.seal(topic, key, 11, record(f"{SECRET} one", 11))
        invalid, h2 = sealer.seal(topic, key, 12, record(SECRET, 12, sender_id=""))
        other, h3 = sealer.seal(topic, key, 999, record(SECRET, 13))
        tampered, h4 = sealer.seal(topic, key, 14, record(SECRET, 14))
        good2, h5 = sealer.seal(topic, key, 15, record(f"{SECRET} two", 15))
    finally:
        sealer.close()
    tampered = tampered[:-1] + bytes([tampered[-1] ^ 1])
    producer = Producer(kafka_client_config(settings.kafka))
    for value, headers in [
        (good1, h1),
        (record(SECRET, 16), None),  # plaintext
        (invalid, h2),
        (other, h3),
        (tampered, h4),
        (None, None),  # a tombstone
        (good2, h5),
    ]:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0

    with MessageConsumer(
        settings, kafka_group(f"{settings.kafka.ml_group_prefix}libs-bad"), max_wait_seconds=1
    ) as consumer:
        batches = read_all(consumer, 7)
    assert [r.text for b in batches for r in b.records] == [f"{SECRET} one", f"{SECRET} two"]
    refused = [r for b in batches for r in b.refused]
    assert [r.offset for r in refused] == [1, 2, 3, 4, 5]
    reasons = [r.reason for r in refused]
    assert reasons[0] == "record is not sealed: header sealstream.key_id missing"
    assert reasons[1].startswith("invalid record: sender_id: ")
    assert reasons[2] == "header sealstream.event_id does not match the record's event id"
    assert "authentication failed" in reasons[3]
    assert reasons[4].startswith("record has no value")
    assert not any("zqlib" in r for r in reasons)


class FlakyOpener:
    """The real opener behind an outage: the first `failures` calls fail as a KMS that is down."""

    def __init__(self, opener: Any, failures: int) -> None:
        self.opener, self.failures, self.calls = opener, failures, 0

    def open(self, topic: str, key: bytes | None, headers: Any, value: bytes) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise KmsUnavailable("KMS down")
        return bytes(self.opener.open(topic, key, headers, value))


def test_a_kms_outage_holds_the_batch_and_skips_nothing(
    lib_settings: Settings, kafka_topic_factory: KafkaTopics, kafka_group: NewGroup
) -> None:
    settings = lib_settings.model_copy(update={"kafka": kafka_topic_factory("libs-outage")})
    chat = uuid.uuid4()
    with MessageProducer(settings, service="test-outage") as producer:
        sent = producer.send_batch([post(chat, f"{SECRET} {i}") for i in range(3)])
    opener = record_opener(settings)
    flaky = FlakyOpener(opener, failures=4)
    try:
        with MessageConsumer(
            settings, kafka_group(f"{settings.kafka.ml_group_prefix}libs-outage"), opener=flaky
        ) as consumer:
            batches = read_all(consumer, 3)
    finally:
        opener.close()
    assert flaky.calls == 4 + 3
    assert [r.message_id for b in batches for r in b.records] == [s.message_id for s in sent]
    assert not [r for b in batches for r in b.refused]


KILLED_CONSUMER = """
import json, os, signal, sys
from sealstream.consumer import MessageConsumer
from sealstream.settings import Settings

with MessageConsumer(Settings(), sys.argv[1], batch_size=100, max_wait_seconds=1) as consumer:
    batch = consumer.poll_batch(60)
    print(json.dumps([r.message_id for r in batch.records] if batch else []), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed before batch.commit()
"""


def test_a_consumer_killed_before_commit_leaves_its_batch_to_the_next_one(
    lib_settings: Settings, kafka_topic_factory: KafkaTopics, kafka_group: NewGroup
) -> None:
    settings = lib_settings.model_copy(update={"kafka": kafka_topic_factory("libs-kill")})
    chat = uuid.uuid4()
    with MessageProducer(settings, service="test-kill") as producer:
        first = producer.send_batch([post(chat, f"{SECRET} {i}") for i in range(5)])
    group = kafka_group(f"{settings.kafka.ml_group_prefix}libs-kill")
    env = {**os.environ, **settings_env(settings)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_CONSUMER, group],
        env=env,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    seen_by_killed = json.loads(killed.stdout.decode().splitlines()[-1])
    assert seen_by_killed == [s.message_id for s in first]

    with MessageConsumer(settings, group, max_wait_seconds=1) as consumer:
        batch = consumer.poll_batch(120)  # the dead member's session expires first
        assert batch is not None
        assert [r.message_id for r in batch.records] == seen_by_killed
        # The next batch is refused until this one is committed.
        with pytest.raises(BatchNotCommitted):
            consumer.poll_batch(0)
        batch.commit()
        with MessageProducer(settings, service="test-kill") as producer:
            later = producer.send(post(chat, f"{SECRET} later"))
        after = consumer.poll_batch(60)
        assert after is not None
        assert [r.message_id for r in after.records] == [later.message_id]
        after.commit()

    # Committed: a new member of the group starts after both batches.
    with MessageConsumer(settings, group, max_wait_seconds=1) as consumer:
        assert consumer.poll_batch(15) is None


def test_the_consumer_refuses_the_pipelines_groups(lib_settings: Settings) -> None:
    for group in (lib_settings.kafka.encryptor_group, lib_settings.kafka.indexer_group, ""):
        with pytest.raises(ValueError, match="consumer group of the caller's own"):
            MessageConsumer(lib_settings, group)


def test_a_null_seal_header_is_refused_by_the_consumer_as_by_the_workers(
    lib_settings: Settings, kafka_topic_factory: KafkaTopics, kafka_group: NewGroup
) -> None:
    """A writer of the topic re-sends a genuine sealed record with one more `sealstream.key_id`
    header whose value is null. The encryptor and indexer read that header as empty, so the key
    id is "present more than once" and the record is dead-lettered: the message is never
    stored. The consumer library dropped null headers and handed the record on, so an ML
    consumer saw a message the pipeline refused. Both must read a record alike."""
    settings = lib_settings.model_copy(update={"kafka": kafka_topic_factory("libs-null")})
    topic = settings.kafka.messages_topic
    chat = uuid.uuid4()
    record = MessageRecord(
        message_id=SnowflakeIds(98).next_id(),
        chat_id=chat,
        sender_id="bot",
        text=f"{SECRET} null header",
        sent_at=datetime.now(UTC),
    )
    sealer = record_sealer(settings)
    try:
        value, headers = sealer.seal(topic, record.key(), record.change_id, record.value())
    finally:
        sealer.close()
    producer = Producer(kafka_client_config(settings.kafka))
    producer.produce(
        topic, key=record.key(), value=value, headers=[(HEADER_KEY_ID, None), *headers]
    )
    assert producer.flush(30) == 0
    # What the workers' runtime reads of those headers, through the same opener.
    worker_headers = _record_headers([(HEADER_KEY_ID, None), *headers])
    with pytest.raises(SealRefused, match="more than once"):
        sealed_key_id(worker_headers)

    group = kafka_group(f"{settings.kafka.ml_group_prefix}libs-null")
    with MessageConsumer(settings, group, max_wait_seconds=1) as consumer:
        batches = read_all(consumer, 1)
    assert [r.message_id for b in batches for r in b.records] == []
    [refusal] = [r for b in batches for r in b.refused]
    assert refusal.reason == f"header {HEADER_KEY_ID}: present more than once"
