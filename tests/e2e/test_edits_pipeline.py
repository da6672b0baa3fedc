"""Edits and sender deletions on the running pipeline (services as processes, issue 15).

The message is posted through the gateway; the edit and deletion records are published straight
to the message topic, as the gateway's PATCH/DELETE (or a direct producer) publish them, and so
are the replays and the forged record. What a user sees comes from the reader's HTTP API, what
delivery would get from the change topic.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition

from schemas.changes import ChangeEvent
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import create_chat, post_batch, search, wait_until
from tests.kafka_records import SealingProducer

_IDS = SnowflakeIds(worker_id=913)


def publish(pipe: Pipeline, *records: MessageRecord) -> None:
    """Publish straight to the message topic, sealed as every producer must."""
    producer = SealingProducer(pipe.settings)
    for record in records:
        producer.produce_record(record)
    assert producer.flush(30) == 0
    producer.close()


def change(kind: str, chat: str, message_id: str, sender: str, text: str | None) -> MessageRecord:
    return MessageRecord.model_validate(
        {
            "kind": kind,
            "message_id": int(message_id),
            "event_id": _IDS.next_id(),
            "chat_id": chat,
            "sender_id": sender,
            "text": text,
            "sent_at": datetime.now(UTC),
        }
    )


def message(pipe: Pipeline, chat: str, message_id: str) -> httpx.Response:
    return httpx.get(
        f"{pipe.reader_url}/v1/chats/{chat}/messages/{message_id}",
        headers=pipe.token("bob"),
        timeout=30,
    )


def found(pipe: Pipeline, chat: str, q: str) -> list[str]:
    answer = search(pipe, "bob", chat, q)
    assert answer.status_code == 200, answer.text
    return [m["message_id"] for m in answer.json()["messages"]]


def indexed(pipe: Pipeline, chat: str, word: str) -> list[int]:
    """Ids whose index document holds `word`, from the index itself (the reader would drop a
    hit whose decrypted text lacks the word, hiding a document that still holds it)."""
    index = SearchIndex(pipe.settings.opensearch)
    try:
        index.refresh()
        return index.search_chat(uuid.UUID(chat), word)
    finally:
        index.close()


def change_events(pipe: Pipeline, chat: str) -> list[ChangeEvent]:
    """Every change event of `chat` on the change topic, in topic order."""
    kafka = pipe.settings.kafka
    consumer = Consumer(
        kafka_client_config(
            kafka,
            {
                "group.id": f"changes-{uuid.uuid4()}",
                "enable.auto.commit": False,
            },
        )
    )
    topic = kafka.changes_topic
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    partitions = sorted(metadata.partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
    done = {p for p, end in ends.items() if end == 0}
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + 60
    while len(done) < len(ends) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        if msg.key() == chat.encode():
            events.append(ChangeEvent.model_validate_json(msg.value() or b""))
        if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
            done.add(msg.partition() or 0)
    consumer.close()
    return events


def test_edits_replays_forgeries_and_a_sender_deletion(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob", "mallory"])
    word = f"w{uuid.uuid4().hex[:8]}"
    [message_id] = post_batch(pipeline, "alice", chat, [f"{word} original lighthouse"])
    wait_until(lambda: message(pipeline, chat, message_id).status_code == 200, what="readable")
    wait_until(lambda: found(pipeline, chat, "lighthouse") == [message_id], what="searchable")

    first = change("edit", chat, message_id, "alice", f"{word} edited harbour")
    second = change("edit", chat, message_id, "alice", f"{word} final quay")
    publish(pipeline, first, second)
    wait_until(
        lambda: message(pipeline, chat, message_id).json().get("revision") == 3, what="edited"
    )
    wait_until(lambda: found(pipeline, chat, "quay") == [message_id], what="edit indexed")
    body: dict[str, Any] = message(pipeline, chat, message_id).json()
    assert body["text"] == f"{word} final quay" and body["edited_at"] is not None
    assert indexed(pipeline, chat, "lighthouse") == [] and indexed(pipeline, chat, "harbour") == []

    # A forged edit naming another sender, then replays of the first edit: none changes a thing.
    # A later post in the chat (same partition, after them) shows both workers got past them.
    forged = change("edit", chat, message_id, "mallory", f"{word} forged zeppelin")
    publish(pipeline, forged, first)
    [later] = post_batch(pipeline, "alice", chat, [f"{word} later marker"])
    wait_until(lambda: found(pipeline, chat, "marker") == [later], what="later post indexed")
    wait_until(lambda: message(pipeline, chat, later).status_code == 200, what="later readable")
    body = message(pipeline, chat, message_id).json()
    assert (body["text"], body["revision"]) == (f"{word} final quay", 3)
    assert indexed(pipeline, chat, "zeppelin") == [] and indexed(pipeline, chat, "harbour") == []

    removal = change("delete", chat, message_id, "alice", None)
    publish(pipeline, removal)
    wait_until(lambda: message(pipeline, chat, message_id).status_code == 404, what="deleted")
    wait_until(lambda: indexed(pipeline, chat, "quay") == [], what="deletion indexed")
    # The encryptor publishes a change event once the change is stored, so on a loaded machine
    # the deletion's can come after its row reads as deleted. It is the chat's last (keyed by
    # the chat: one partition, in order), so every earlier event is there once it is.
    wait_until(
        lambda: removal.event_id in {e.event_id for e in change_events(pipeline, chat)},
        what="the deletion's change event",
    )

    events = [(e.kind, e.event_id, e.revision) for e in change_events(pipeline, chat)]
    mine = [e for e in events if e[1] != int(later)]
    assert mine == [
        ("post", int(message_id), 1),
        ("edit", first.event_id, 2),
        ("edit", second.event_id, 3),
        ("delete", removal.event_id, 3),
    ]
