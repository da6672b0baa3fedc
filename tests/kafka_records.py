"""Tests that write to or read the message topic straight, as a direct producer or consumer
would: every record is sealed (docs/format.md, "Sealed Kafka records") through the project's
own sealer and opened through its opener. One place, so no test hand-rolls the format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer

from schemas.events import MessageRecord
from sealstream.adapters.kafka import Delivery, Headers, Publisher, kafka_client_config
from sealstream.record_seal import RecordOpener, RecordSealer, record_opener, record_sealer
from sealstream.settings import KafkaSettings, Settings


def sealed_items(
    sealer: RecordSealer, topic: str, records: Sequence[MessageRecord]
) -> tuple[list[tuple[bytes, bytes]], list[Headers]]:
    """(items, per-record headers) for `Publisher.publish(topic, items, record_headers=...)`."""
    items: list[tuple[bytes, bytes]] = []
    headers: list[Headers] = []
    for record in records:
        value, sealed_headers = sealer.seal(topic, record.key(), record.change_id, record.value())
        items.append((record.key(), value))
        headers.append(list(sealed_headers))
    return items, headers


def publish_sealed(
    publisher: Publisher, sealer: RecordSealer, topic: str, records: Sequence[MessageRecord]
) -> list[Delivery]:
    """Seal and publish `records` with the project's acknowledged publisher."""
    items, headers = sealed_items(sealer, topic, records)
    return publisher.publish(topic, items, record_headers=headers)


class SealingProducer:
    """A plain confluent-kafka producer to the message topic that seals what it sends, as a
    direct producer must. `produce_record` seals a `MessageRecord`; `produce` seals any bytes
    (a poison record still sealed, so it is refused for its contents, not for being plaintext);
    `produce_unsealed` sends bytes as they are (what sealing must refuse)."""

    def __init__(self, settings: Settings, **config: Any) -> None:
        self.topic = settings.kafka.messages_topic
        self.sealer = record_sealer(settings)
        self._producer = Producer(kafka_client_config(settings.kafka, {"acks": "all", **config}))

    def produce_record(
        self, record: MessageRecord, on_delivery: Callable[..., None] | None = None
    ) -> bytes:
        """Seal and send `record`; returns the sealed value as sent."""
        return self.produce(record.key(), record.value(), record.change_id, on_delivery)

    def produce(
        self,
        key: bytes,
        value: bytes,
        event_id: int,
        on_delivery: Callable[..., None] | None = None,
        extra_headers: Headers | None = None,
    ) -> bytes:
        """Seal and send any value bound to `event_id` (`extra_headers` after the seal's);
        returns the sealed value as sent."""
        sealed, headers = self.sealer.seal(self.topic, key, event_id, value)
        self._producer.produce(
            self.topic,
            key=key,
            value=sealed,
            headers=[*headers, *(extra_headers or [])],
            on_delivery=on_delivery,
        )
        return sealed

    def produce_unsealed(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        on_delivery: Callable[..., None] | None = None,
    ) -> None:
        self._producer.produce(
            self.topic, key=key, value=value, headers=headers, on_delivery=on_delivery
        )

    def flush(self, timeout: float = 30) -> int:
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        self.flush()
        self.sealer.close()


def opener_for(settings: Settings) -> RecordOpener:
    """An opener on the real topic keys of `settings` (close it after use)."""
    return record_opener(settings)


def opened_value(opener: RecordOpener, msg: Any) -> bytes:
    """The plaintext value of a confluent-kafka message read from the message topic."""
    return opener.open(msg.topic(), msg.key(), msg.headers(), msg.value() or b"")


def publish_records(
    settings: Settings, kafka: KafkaSettings, records: Sequence[MessageRecord], client_id: str
) -> list[Delivery]:
    """Seal `records` (topic keys of `settings`' Postgres and KMS) and publish them to
    `kafka.messages_topic` with an acknowledged publisher, as a direct producer does."""
    publisher = Publisher(kafka, client_id=client_id)
    sealer = record_sealer(settings)
    try:
        return publish_sealed(publisher, sealer, kafka.messages_topic, records)
    finally:
        sealer.close()
        publisher.close()
