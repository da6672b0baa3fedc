"""Deleted stays deleted (issue 9 item 3), on the running pipeline with the services as processes.

Each test deletes through the admin API and then brings the deleted records back the ways
production does: the identical record delivered again, a burst still in flight when its chat is
deleted, both consumer groups reset to offset 0, records whose producer clock (`sent_at`) is days
off. What the stores hold is checked directly (Cassandra rows, index documents), not only through
the reader, which hides deleted rows on its own.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.events import MessageRecord
from schemas.ids import WORKER_BITS, first_id_at
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from tests.e2e.conftest import Pipeline
from tests.e2e.test_key_lifecycle import call, finished
from tests.e2e.test_pipeline import create_chat, history, post_batch, search, wait_until
from tests.kafka_records import SealingProducer, opened_value, opener_for


@pytest.fixture(scope="module")
def admin(pipeline: Pipeline) -> Iterator[Pipeline]:
    pipeline.start("admin")
    try:
        pipeline.wait_http(pipeline.admin_url)
        yield pipeline
    finally:
        if "admin" in pipeline.procs:
            pipeline.signal("admin", signal.SIGTERM)


@pytest.fixture(scope="module")
def store(admin: Pipeline) -> Iterator[MessageStore]:
    store = MessageStore(admin.settings.cassandra)
    store.connect()
    yield store
    store.close()


@pytest.fixture(scope="module")
def index(admin: Pipeline) -> Iterator[SearchIndex]:
    index = SearchIndex(admin.settings.opensearch)
    yield index
    index.close()


TopicRecord = tuple[bytes, bytes, bytes, list[tuple[str, bytes]]]


def topic_records(pipe: Pipeline, chat: str) -> list[TopicRecord]:
    """Every record of a chat on the message topic, in topic order, as (key, opened value,
    value as sealed, headers)."""
    opener = opener_for(pipe.settings)
    consumer = Consumer(
        kafka_client_config(
            pipe.settings.kafka,
            {
                "group.id": f"replay-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    topic = pipe.settings.kafka.messages_topic
    consumer.assign([TopicPartition(topic, p, 0) for p in range(pipe.settings.kafka.partitions)])
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1]
        for p in range(pipe.settings.kafka.partitions)
    }
    found: list[TopicRecord] = []
    done: set[int] = {p for p, end in ends.items() if end == 0}
    deadline = time.monotonic() + 60
    while len(done) < len(ends) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        if msg.key() == chat.encode():
            found.append(
                (
                    msg.key() or b"",
                    opened_value(opener, msg),
                    msg.value() or b"",
                    list(msg.headers() or []),
                )
            )
        if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
            done.add(msg.partition() or 0)
    consumer.close()
    opener.close()
    return found


def republish(pipe: Pipeline, records: list[TopicRecord]) -> None:
    """Publish records read from the topic again as they are (sealed value, same headers), as a
    replay would."""
    producer = SealingProducer(pipe.settings)
    for key, _, sealed, headers in records:
        producer.produce_unsealed(key, sealed, headers)  # already sealed: sent byte for byte
    assert producer.flush(30) == 0
    producer.close()


def publish(pipe: Pipeline, records: list[MessageRecord]) -> None:
    """Publish new records straight to the message topic, sealed."""
    producer = SealingProducer(pipe.settings)
    for record in records:
        producer.produce_record(record)
    assert producer.flush(30) == 0
    producer.close()


def workers_caught_up(pipe: Pipeline) -> bool:
    """Both consumer groups committed every record now on the message topic."""
    kafka = pipe.settings.kafka
    consumer = Consumer(kafka_client_config(kafka, {"group.id": "probe-unused"}))
    partitions = [TopicPartition(kafka.messages_topic, p) for p in range(kafka.partitions)]
    ends = {tp.partition: consumer.get_watermark_offsets(tp)[1] for tp in partitions}
    consumer.close()
    admin = AdminClient(kafka_client_config(kafka))
    for group in (kafka.encryptor_group, kafka.indexer_group):
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        result = admin.list_consumer_group_offsets(request)[group].result(10)
        committed = {tp.partition: tp.offset for tp in result.topic_partitions}
        if any(committed.get(p, -1) < end for p, end in ends.items() if end > 0):
            return False
    return True


def indexed(index: SearchIndex, chat: str, word: str) -> list[int]:
    """Message ids whose index document holds `word` (straight from the index, not the reader)."""
    index.refresh()
    return index.search_chat(uuid.UUID(chat), word, limit=1000)


def rows_with_envelope(store: MessageStore, chat: str, ids: list[str]) -> list[str]:
    out = []
    for message_id in ids:
        row = store.get(uuid.UUID(chat), int(message_id))
        if row is not None and row.envelope:
            out.append(message_id)
    return out


def test_redelivered_record_stays_deleted(
    admin: Pipeline, store: MessageStore, index: SearchIndex
) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    word = f"redeliver{uuid.uuid4().hex[:8]}"
    ids = post_batch(admin, "alice", chat, [f"{word} number {i}" for i in range(3)])
    wait_until(lambda: len(history(admin, "alice", chat)) == 3, what="readable")
    wait_until(lambda: len(indexed(index, chat, word)) == 3, what="searchable")

    gone = call(admin, "DELETE", f"/v1/chats/{chat}/messages/{ids[0]}")
    assert gone.status_code == 200, gone.text
    assert int(ids[0]) not in indexed(index, chat, word)

    # The same record delivered again (a rebalance, a replay), then a later message of the same
    # chat (same partition, after it): once that one is readable and searchable, both workers
    # have handled the redelivered record.
    again = [r for r in topic_records(admin, chat) if json.loads(r[1])["message_id"] == int(ids[0])]
    assert len(again) == 1
    republish(admin, again)
    [later] = post_batch(admin, "alice", chat, [f"{word} later"])
    wait_until(lambda: int(later) in indexed(index, chat, word), what="later message indexed")
    wait_until(lambda: len(history(admin, "alice", chat)) == 3, what="later message readable")

    assert rows_with_envelope(store, chat, ids) == ids[1:]  # no envelope back on the deleted row
    row = store.get(uuid.UUID(chat), int(ids[0]))
    assert row is not None and row.deleted_at is not None
    assert sorted(indexed(index, chat, word)) == sorted(int(i) for i in [*ids[1:], later])
    reader = httpx.get(
        f"{admin.reader_url}/v1/chats/{chat}/messages/{ids[0]}", headers=admin.token("alice")
    )
    assert reader.status_code == 404
    hits = search(admin, "alice", chat, word).json()["messages"]
    assert ids[0] not in {h["message_id"] for h in hits}


def test_chat_deleted_with_messages_in_flight(
    admin: Pipeline, store: MessageStore, index: SearchIndex
) -> None:
    receipts = []
    for attempt in range(5):
        chat = create_chat(admin, "alice", ["bob"])
        word = f"inflight{attempt}x{uuid.uuid4().hex[:8]}"
        ids = post_batch(admin, "alice", chat, [f"{word} {i}" for i in range(50)])
        # Deleted right after the gateway acknowledged: the workers have not all seen the burst.
        receipt = call(admin, "DELETE", f"/v1/chats/{chat}", params={"reason": "in flight"})
        assert receipt.status_code == 200, receipt.text
        receipts.append(receipt.json())
        wait_until(lambda: workers_caught_up(admin), timeout=180, what="workers caught up")
        index.refresh()
        assert index.count(uuid.UUID(chat)) == 0, f"attempt {attempt}: documents left"
        assert indexed(index, chat, word) == []
        assert rows_with_envelope(store, chat, ids) == []
        now = int(time.time() * 1000)
        assert list(store.scan_chat(uuid.UUID(chat), now - 3_600_000, now + 600_000)) == []
    for body in receipts:
        assert body["sweep_completed"] is True, body
        # What the receipt counts was removed: never more than the burst, and both passes add up.
        assert 0 <= body["index_documents_deleted"] <= 50
        assert 0 <= body["rows_deleted"] <= 50


def reset_groups_to_zero(pipe: Pipeline) -> None:
    """What an operator does to replay the topic: stop both workers, set both groups' committed
    offsets to 0 on every partition, start the workers again."""
    kafka = pipe.settings.kafka
    pipe.signal("encryptor", signal.SIGTERM)
    pipe.signal("indexer", signal.SIGTERM)
    admin = AdminClient(kafka_client_config(kafka))
    partitions = [TopicPartition(kafka.messages_topic, p, 0) for p in range(kafka.partitions)]
    for group in (kafka.encryptor_group, kafka.indexer_group):
        deadline = time.monotonic() + 120
        while True:  # the broker refuses to move the offsets of a group with live members
            try:
                request = [ConsumerGroupTopicPartitions(group, partitions)]
                admin.alter_consumer_group_offsets(request)[group].result(10)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
    pipe.start("encryptor")
    pipe.start("indexer")


def test_replay_from_offset_zero_after_shred(
    admin: Pipeline, store: MessageStore, index: SearchIndex
) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    word = f"replayed{uuid.uuid4().hex[:8]}"
    ids = post_batch(admin, "alice", chat, [f"{word} {i}" for i in range(20)])
    wait_until(lambda: len(history(admin, "alice", chat)) == 20, what="readable")
    wait_until(lambda: len(indexed(index, chat, word)) == 20, what="searchable")
    receipt = call(admin, "DELETE", f"/v1/chats/{chat}", params={"reason": "replay test"})
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["index_documents_deleted"] == 20
    assert receipt.json()["rows_deleted"] == 20

    reset_groups_to_zero(admin)
    # A chat posted after the reset is readable once the workers have replayed everything.
    other = create_chat(admin, "carol", ["dave"])
    post_batch(admin, "carol", other, ["after the replay"])
    wait_until(lambda: workers_caught_up(admin), timeout=300, what="replay done")
    wait_until(lambda: len(history(admin, "carol", other)) == 1, what="pipeline back")

    assert rows_with_envelope(store, chat, ids) == []
    index.refresh()
    assert index.count(uuid.UUID(chat)) == 0
    assert indexed(index, chat, word) == []


def raw_record(chat: str, at: datetime, sent_at: datetime, text: str, seq: int) -> MessageRecord:
    """A record as a producer posting straight to Kafka makes it: id from one clock (`at`),
    `sent_at` from another."""
    worker = 1000  # not a gateway's worker id: no collision with ids the gateway hands out
    message_id = first_id_at(int(at.timestamp() * 1000)) | (worker << 12) | seq
    assert message_id >> (WORKER_BITS + 12) == first_id_at(int(at.timestamp() * 1000)) >> 22
    return MessageRecord(
        message_id=message_id,
        chat_id=uuid.UUID(chat),
        sender_id="alice",
        text=text,
        sent_at=sent_at,
    )


def test_retention_uses_the_id_clock_whatever_sent_at_says(
    admin: Pipeline, store: MessageStore, index: SearchIndex, database: Any
) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    with database.connection() as conn:  # a chat opened five days ago
        conn.execute(
            "UPDATE chats SET created_at = now() - interval '5 days' WHERE chat_id = %s",
            (uuid.UUID(chat),),
        )
    now = datetime.now(UTC)
    old_word, recent_word = f"oldid{uuid.uuid4().hex[:8]}", f"newid{uuid.uuid4().hex[:8]}"
    # Made 3 days ago, but the producer's clock said 3 days in the future.
    old = raw_record(chat, now - timedelta(days=3), now + timedelta(days=3), f"{old_word} a", 1)
    # Made an hour ago, but the producer's clock said 3 days ago.
    recent = raw_record(
        chat, now - timedelta(hours=1), now - timedelta(days=3), f"{recent_word} b", 2
    )
    publish(admin, [old, recent])
    wait_until(lambda: len(history(admin, "alice", chat)) == 2, what="both readable")
    wait_until(lambda: indexed(index, chat, old_word) == [old.message_id], what="old indexed")
    wait_until(lambda: indexed(index, chat, recent_word) == [recent.message_id], what="indexed")

    assert call(admin, "PUT", f"/v1/chats/{chat}/retention", json={"days": 1}).status_code == 200
    finished(admin, call(admin, "POST", "/v1/retention/runs"))

    # History and search agree: the old message is gone from both, the recent one is in both.
    assert [m["message_id"] for m in history(admin, "alice", chat)] == [str(recent.message_id)]
    assert indexed(index, chat, old_word) == []
    assert indexed(index, chat, recent_word) == [recent.message_id]
    hits = search(admin, "alice", chat, recent_word).json()["messages"]
    assert [h["message_id"] for h in hits] == [str(recent.message_id)]
    # The row's time is the id's time too, not the producer's clock.
    row = store.get(uuid.UUID(chat), recent.message_id)
    assert row is not None
    assert abs((row.created_at - (now - timedelta(hours=1))).total_seconds()) < 1


def test_chat_deleted_while_the_indexer_is_down(
    admin: Pipeline, store: MessageStore, index: SearchIndex
) -> None:
    """The indexer is down when a chat is deleted: the receipt says the sweep did not complete,
    nothing of the chat is indexed when the indexer comes back (it reads the chat's state), and
    running the deletion again, once the indexer caught up, completes it."""
    from tests.e2e.conftest import free_port

    port = free_port()
    admin.start(
        "admin",
        key="admin-short-sweep",
        env={"SEALSTREAM_ADMIN__PORT": str(port), "SEALSTREAM_DELETION__SWEEP_SECONDS": "5"},
    )
    url = f"http://127.0.0.1:{port}"
    admin.wait_http(url)

    def delete(chat: str) -> dict[str, Any]:
        response = httpx.delete(
            f"{url}/v1/chats/{chat}",
            params={"reason": "indexer down"},
            headers=admin.admin_token(),
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    try:
        chat = create_chat(admin, "alice", ["bob"])
        word = f"indexerdown{uuid.uuid4().hex[:8]}"
        admin.signal("indexer", signal.SIGTERM)
        ids = post_batch(admin, "alice", chat, [f"{word} {i}" for i in range(30)])
        first = delete(chat)
        assert first["sweep_completed"] is False, first
        assert first["index_documents_deleted"] == 0

        admin.start("indexer")
        wait_until(lambda: workers_caught_up(admin), timeout=300, what="indexer caught up")
        assert indexed(index, chat, word) == []
        assert index.count(uuid.UUID(chat)) == 0
        assert rows_with_envelope(store, chat, ids) == []

        again = delete(chat)
        assert again["sweep_completed"] is True, again
        assert again["dek_versions_destroyed"] == []
        assert again["index_documents_deleted"] == 0
    finally:
        if "indexer" not in admin.procs:
            admin.start("indexer")
        admin.signal("admin-short-sweep", signal.SIGTERM)
