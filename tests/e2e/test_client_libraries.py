"""The producer and consumer libraries against the running pipeline (gateway, encryptor, indexer,
reader as processes, on the sealed message topic).

A direct producer's messages end readable through the reader with their text, under ids no
gateway message shares; a bad one is refused before publishing, naming its field; and an ML
consumer in a group of its own reads back, opened and validated, what the gateway and the producer
published, and a delete the producer sent.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient

from sealstream.adapters.kafka import kafka_client_config
from sealstream.consumer import MessageConsumer
from sealstream.producer import InvalidProducerMessage, MessageProducer
from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import create_chat, history, post_batch, wait_until


def test_producer_to_reader_and_consumer_reads_gateway_and_producer_records(
    pipeline: Pipeline,
) -> None:
    chat = create_chat(pipeline, "ivy", ["jack"])
    gateway_texts = [f"zqgw{i} from the gateway — café" for i in range(5)]
    gateway_ids = [int(m) for m in post_batch(pipeline, "ivy", chat, gateway_texts)]

    producer_texts = [f"zqdp{i} from a direct producer — 世界 🚀" for i in range(20)]
    with MessageProducer(pipeline.settings, service="e2e-direct-producer") as producer:
        with pytest.raises(InvalidProducerMessage) as refused:
            producer.send({"chat_id": chat, "sender_id": "jack", "text": "zq", "sent_at": "now"})
        assert refused.value.field == "sent_at"
        sent = producer.send_batch(
            [{"chat_id": chat, "sender_id": "jack", "text": t} for t in producer_texts]
        )
        single = producer.send({"chat_id": chat, "sender_id": "ivy", "text": "zqdpsingle"})
        doomed = producer.send({"chat_id": chat, "sender_id": "jack", "text": "zqdpdoomed"})
        gone = producer.send(
            {
                "chat_id": chat,
                "sender_id": "jack",
                "kind": "delete",
                "message_id": doomed.message_id,
            }
        )
    producer_ids = [s.message_id for s in [*sent, single]]
    every_id = gateway_ids + producer_ids + [doomed.message_id]
    assert len(set(every_id)) == len(every_id), "a direct producer's id equals another message's"

    # Through the pipeline to the reader: every message with its text; the deleted one gone.
    expected = dict(zip(gateway_ids, gateway_texts, strict=True))
    expected |= dict(zip(producer_ids, [*producer_texts, "zqdpsingle"], strict=True))

    def read() -> dict[int, str]:
        return {int(m["message_id"]): m["text"] for m in history(pipeline, "jack", chat)}

    wait_until(lambda: read() == expected, timeout=180, what="every message readable, one deleted")

    # An ML consumer of its own reads the same records from the sealed topic, opened.
    chat_id = uuid.UUID(chat)
    seen: dict[int, tuple[str, str | None]] = {}
    group = f"{pipeline.settings.kafka.ml_group_prefix}e2e-{uuid.uuid4().hex[:12]}"
    with MessageConsumer(pipeline.settings, group, batch_size=50, max_wait_seconds=0.5) as consumer:
        for batch in consumer.batches(idle_seconds=30):
            for record in batch.records:
                if record.chat_id == chat_id:
                    seen[record.change_id] = (record.kind, record.text)
            batch.commit()
            if len(seen) >= len(expected) + 2:
                break
    admin = AdminClient(kafka_client_config(pipeline.settings.kafka))
    for future in admin.delete_consumer_groups([group], request_timeout=15).values():
        future.result(20)  # Kafka would keep the group's offsets for a week
    assert {
        i: text for i, (kind, text) in seen.items() if kind == "post" and i != doomed.event_id
    } == (expected)
    assert seen[gone.event_id] == ("delete", None)
    assert seen[doomed.message_id] == ("post", "zqdpdoomed")
