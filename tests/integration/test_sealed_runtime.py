"""The consumer runtime opening sealed records on the real Kafka, Postgres and OpenBao: a KMS that
cannot be reached while a topic key is needed holds the batch (retried, never dead-lettered),
and every record is handled, opened, once the KMS is back."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer
from prometheus_client import REGISTRY

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import Publisher, kafka_client_config
from sealstream.adapters.postgres import Database, TopicKeyRepository
from sealstream.adapters.vault import TransitKms
from sealstream.keys.topic_keys import TopicKeys, destroy_topic_keys, topic_key_cutoff
from sealstream.record_seal import HEADER_KEY_ID, RecordOpener, RecordSealer
from sealstream.settings import Settings
from sealstream.streaming import ConsumerRuntime, DeadLetterWriter, RawRecord, Rejected
from tests.integration.conftest import KafkaTopics, host_port
from tests.kafka_records import publish_records
from tests.tcp_proxy import proxy


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _wait_for(what: str, condition: Any, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.2)


def test_a_kms_outage_while_opening_holds_the_batch_and_loses_nothing(
    settings: Settings, database: Database, kms: TransitKms, kafka_topic_factory: KafkaTopics
) -> None:
    kms.ensure_key(settings.vault.default_key)
    kafka = kafka_topic_factory(f"sealkms-{uuid.uuid4().hex[:8]}")
    stage = f"sealkms-{uuid.uuid4().hex[:8]}"
    handled: dict[int, bytes] = {}
    lock = threading.Lock()

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        with lock:
            handled.update((r.offset * 100 + r.partition, r.value) for r in records)
        return []

    with proxy(*host_port(settings.vault.address)) as kms_link:
        # The worker reaches the KMS through the proxy only; the producer directly.
        vault = settings.vault.model_copy(update={"address": f"http://{kms_link.address}"})
        keys = TopicKeys(
            TopicKeyRepository(database),
            TransitKms(vault, retry_seconds=0.5, timeout=1.0),
            kms_key_name=settings.vault.default_key,
            rotation_seconds=3600,
            cache_seconds=300,
        )
        letters = Publisher(kafka, client_id=f"{stage}-dlq")
        runtime = ConsumerRuntime(
            stage,
            kafka,
            f"{stage}-group",
            process,
            DeadLetterWriter(letters, kafka.dead_letter_topic),
            opener=RecordOpener(keys),
        )
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        try:
            kms_link.down()
            ids = SnowflakeIds(93)
            chat = uuid.uuid4()
            records = [
                MessageRecord(
                    message_id=ids.next_id(),
                    chat_id=chat,
                    sender_id="alice",
                    text=f"sealed while the KMS is away {i}",
                    sent_at=datetime.now(UTC),
                )
                for i in range(30)
            ]
            publish_records(settings, kafka, records, client_id="sealkms-producer")
            retries = "sealstream_consumer_retries_total"
            _wait_for("the batch retried", lambda: _sample(retries, stage=stage) >= 3)
            _wait_for("the batch held (partitions paused)", lambda: runtime._paused)
            assert handled == {}  # nothing handed on while its key could not be had
            kms_link.forward()
            _wait_for("every record handled once the KMS is back", lambda: len(handled) == 30)
        finally:
            runtime.stop.set()
            thread.join(60)
            letters.close()
    assert sorted(handled.values()) == sorted(r.value() for r in records)  # opened, all of them
    assert _sample("sealstream_consumer_records_total", stage=stage, outcome="dead_letter") == 0


def test_a_record_under_a_destroyed_key_is_dead_lettered_with_the_reason(
    settings: Settings, database: Database, kms: TransitKms, kafka_topic_factory: KafkaTopics
) -> None:
    kms.ensure_key(settings.vault.default_key)
    kafka = kafka_topic_factory(f"sealgone-{uuid.uuid4().hex[:8]}")
    stage = f"sealgone-{uuid.uuid4().hex[:8]}"
    repo = TopicKeyRepository(database)

    def keys(clock: Any = time.time) -> TopicKeys:
        return TopicKeys(
            repo,
            kms,
            kms_key_name=settings.vault.default_key,
            rotation_seconds=3600,
            cache_seconds=300,
            clock=clock,
            max_clock_skew_seconds=None,  # a slot of 2001 on purpose
        )

    # Sealed under the key of a slot that ended in 2001 (a record long past retention, found
    # in a backup), then the key is destroyed as `keys destroy-topic-keys` does.
    old = MessageRecord(
        message_id=SnowflakeIds(95).next_id(),
        chat_id=uuid.uuid4(),
        sender_id="alice",
        text="from a backup",
        sent_at=datetime.now(UTC),
    )
    topic = kafka.messages_topic
    sealer = RecordSealer(keys(clock=lambda: 1_000_003_600.0))
    value, headers = sealer.seal(topic, old.key(), old.change_id, old.value())
    key_id = dict(headers)[HEADER_KEY_ID].decode()
    row = repo.by_id(key_id)
    assert row is not None
    keep = row.valid_to - topic_key_cutoff(settings.kafka, row.valid_to)
    destroyed = destroy_topic_keys(
        repo, settings.kafka, actor="test", now=row.valid_to + keep + timedelta(minutes=1)
    )
    assert key_id in destroyed
    publisher = Publisher(kafka, client_id=f"{stage}-producer")
    publisher.publish(topic, [(old.key(), value)], headers=headers)
    publisher.close()

    handled: list[RawRecord] = []
    letters = Publisher(kafka, client_id=f"{stage}-dlq")
    runtime = ConsumerRuntime(
        stage,
        kafka,
        f"{stage}-group",
        lambda records: handled.extend(records) or [],  # type: ignore[func-returns-value]
        DeadLetterWriter(letters, kafka.dead_letter_topic),
        opener=RecordOpener(keys()),  # a fresh process: Postgres and the KMS at hand
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        dead = "sealstream_consumer_records_total"
        _wait_for(
            "the record dead-lettered", lambda: _sample(dead, stage=stage, outcome="dead_letter")
        )
    finally:
        runtime.stop.set()
        thread.join(60)
        letters.close()
    assert handled == []
    consumer = Consumer(
        kafka_client_config(kafka, {"group.id": f"{stage}-check", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([kafka.dead_letter_topic])
    letter = None
    deadline = time.monotonic() + 30
    while letter is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            letter = msg
    consumer.close()
    assert letter is not None and letter.value() == value  # still sealed, as it came
    reason = dict(letter.headers() or [])["dlq.reason"].decode()
    assert "the topic key was destroyed" in reason, reason


def test_a_record_with_headers_too_large_for_a_dead_letter_never_stops_the_stage(
    settings: Settings, database: Database, kms: TransitKms, kafka_topic_factory: KafkaTopics
) -> None:
    """An attacker who may write the message topic sends one record whose headers fill the
    topic's record limit. Its dead letter (its own headers + the `dlq.*` ones) is larger still,
    even without its value: the letter must still be published (the oversized original headers
    and key left out, the reason and origin kept) and the records after it handled."""
    kms.ensure_key(settings.vault.default_key)
    kafka = kafka_topic_factory(f"sealhdr-{uuid.uuid4().hex[:8]}")
    stage = f"sealhdr-{uuid.uuid4().hex[:8]}"
    keys = TopicKeys(
        TopicKeyRepository(database),
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
    )
    chat = uuid.uuid4()
    good = MessageRecord(
        message_id=SnowflakeIds(96).next_id(),
        chat_id=chat,
        sender_id="alice",
        text="after the poison record",
        sent_at=datetime.now(UTC),
    )
    topic = kafka.messages_topic
    sealer = RecordSealer(keys)
    value, headers = sealer.seal(topic, good.key(), good.change_id, good.value())
    publisher = Publisher(kafka, client_id=f"{stage}-producer")
    # Just under librdkafka's default message.max.bytes (1,000,000: key + value + headers).
    padding = b"a" * (1_000_000 - 700)
    publisher.publish(
        topic,
        [(good.key(), b"not sealed")],
        headers=[("x-pad", padding), (HEADER_KEY_ID, b"k" * 500)],
    )
    publisher.publish(topic, [(good.key(), value)], headers=headers)
    publisher.close()

    handled: list[RawRecord] = []
    letters = Publisher(kafka, client_id=f"{stage}-dlq")
    runtime = ConsumerRuntime(
        stage,
        kafka,
        f"{stage}-group",
        lambda records: handled.extend(records) or [],  # type: ignore[func-returns-value]
        DeadLetterWriter(letters, kafka.dead_letter_topic),
        opener=RecordOpener(keys),
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        dead = "sealstream_consumer_records_total"
        _wait_for(
            "the batch done, its letter published",
            lambda: _sample(dead, stage=stage, outcome="dead_letter") == 1,
            90,
        )
    finally:
        runtime.stop.set()
        thread.join(60)
        letters.close()
    assert [r.value for r in handled] == [good.value()]
    consumer = Consumer(
        kafka_client_config(kafka, {"group.id": f"{stage}-check", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([kafka.dead_letter_topic])
    letter = None
    deadline = time.monotonic() + 30
    while letter is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            letter = msg
    consumer.close()
    assert letter is not None
    letter_headers = dict(letter.headers() or [])
    assert letter_headers["dlq.offset"] == b"0" and letter_headers["dlq.topic"] == topic.encode()
    assert b"header sealstream.event_id missing" in letter_headers["dlq.reason"]
    assert "x-pad" not in letter_headers and letter.value() is None
    assert letter.key() == good.key()  # the chat id, short, is kept


def test_a_plaintext_record_is_dead_lettered_without_its_text(
    settings: Settings, database: Database, kms: TransitKms, kafka_topic_factory: KafkaTopics
) -> None:
    """A producer that does not seal (one written before sealing, or run with
    `seal_records=false`) publishes message text in the clear. The workers refuse it, but its
    dead letter copied the plaintext value into the dead-letter topic, kept 7 x the message
    topic's retention and shredded by no key: a week of plaintext at rest instead of a day. The
    letter must keep the reason, origin and headers, and leave the value out."""
    kms.ensure_key(settings.vault.default_key)
    kafka = kafka_topic_factory(f"sealplain-{uuid.uuid4().hex[:8]}")
    stage = f"sealplain-{uuid.uuid4().hex[:8]}"
    keys = TopicKeys(
        TopicKeyRepository(database),
        kms,
        kms_key_name=settings.vault.default_key,
        rotation_seconds=3600,
        cache_seconds=300,
    )
    secret = f"plaintext-{uuid.uuid4().hex}"
    legacy = MessageRecord(
        message_id=SnowflakeIds(97).next_id(),
        chat_id=uuid.uuid4(),
        sender_id="alice",
        text=secret,
        sent_at=datetime.now(UTC),
    )
    publisher = Publisher(kafka, client_id=f"{stage}-producer")
    publisher.publish(kafka.messages_topic, [(legacy.key(), legacy.value())])
    # The same text under seal headers copied from a genuine record (a relay that forwards
    # headers): refused as not a sealed value, and not sealed bytes to keep either.
    sealed_value, sealed_headers = RecordSealer(keys).seal(
        kafka.messages_topic, legacy.key(), legacy.change_id, legacy.value()
    )
    assert sealed_value != legacy.value()
    publisher.publish(
        kafka.messages_topic, [(legacy.key(), legacy.value())], headers=sealed_headers
    )
    publisher.close()

    handled: list[RawRecord] = []
    letters = Publisher(kafka, client_id=f"{stage}-dlq")
    runtime = ConsumerRuntime(
        stage,
        kafka,
        f"{stage}-group",
        lambda records: handled.extend(records) or [],  # type: ignore[func-returns-value]
        DeadLetterWriter(letters, kafka.dead_letter_topic),
        opener=RecordOpener(keys),
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        dead = "sealstream_consumer_records_total"
        _wait_for(
            "the record dead-lettered",
            lambda: _sample(dead, stage=stage, outcome="dead_letter") == 2,
            90,
        )
    finally:
        runtime.stop.set()
        thread.join(60)
        letters.close()
    assert handled == []
    consumer = Consumer(
        kafka_client_config(kafka, {"group.id": f"{stage}-check", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([kafka.dead_letter_topic])
    found: list[Any] = []
    deadline = time.monotonic() + 30
    while len(found) < 2 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            found.append(msg)
    consumer.close()
    assert len(found) == 2
    first, second = sorted(found, key=lambda m: dict(m.headers())["dlq.offset"])
    for letter in (first, second):
        letter_headers = dict(letter.headers() or [])
        assert letter.key() == legacy.key()
        assert letter.value() is None, "the plaintext value was copied into the dead-letter topic"
        assert b"not sealed" in letter_headers["dlq.value"]
        assert all(secret.encode() not in (v or b"") for v in letter_headers.values())
    assert b"not sealed" in dict(first.headers())["dlq.reason"]
    assert dict(second.headers())["dlq.reason"].startswith(b"sealed value: ")
