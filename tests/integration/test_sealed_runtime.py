"""The consumer runtime opening sealed records on the real Kafka, Postgres and OpenBao: a KMS that
cannot be reached while a topic key is needed holds the batch (retried, never dead-lettered),
and every record is handled, opened, once the KMS is back."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import Publisher
from sealstream.adapters.postgres import Database, TopicKeyRepository
from sealstream.adapters.vault import TransitKms
from sealstream.keys.topic_keys import TopicKeys
from sealstream.record_seal import RecordOpener
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
