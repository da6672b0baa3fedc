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
