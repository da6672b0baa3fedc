"""Partitions moving between workers while messages flow: nothing lost, nothing duplicated.

Messages (and bad records) are posted without pause while a second and a third encryptor and a
second indexer join the groups (cooperative rebalances), one encryptor leaves on SIGTERM, and
another is SIGKILLed. Every acknowledged message must end up stored once and indexed once, and
every bad record dead-lettered exactly once per stage.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from sealstream.adapters.kafka import ConsumerGroupsProgress, kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from tests.e2e.conftest import Pipeline, free_port
from tests.e2e.test_pipeline import (
    _headers,
    create_chat,
    history,
    post_batch,
    search,
    wait_until,
)
from tests.kafka_records import SealingProducer


def _all_dead_letters(pipe: Pipeline) -> list[Any]:
    """Every letter on the run's dead-letter topic, read to its end (all published by now: each
    is published before its record's offset is committed, and every offset was committed)."""
    topic = pipe.settings.kafka.dead_letter_topic
    consumer = Consumer(
        kafka_client_config(
            pipe.settings.kafka,
            {
                "group.id": f"dlq-check-{uuid.uuid4()}",
                "enable.auto.commit": False,
            },
        )
    )
    try:
        end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)[1]
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        letters: list[Any] = []
        deadline = time.monotonic() + 90
        while (not letters or letters[-1].offset() < end - 1) and end > 0:
            assert time.monotonic() < deadline, "could not read the dead-letter topic to its end"
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                letters.append(msg)
        return letters
    finally:
        consumer.close()


class Stream:
    """Posts 20-message batches to one chat, and now and then a bad record, and remembers them."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.chat = create_chat(pipe, "rita", ["sam"])
        self.ids: list[str] = []
        self.markers: list[str] = []
        self.sealed: dict[str, bytes] = {}  # marker -> its record's value as sent (sealed)
        self.producer = SealingProducer(pipe.settings)

    def post(self, bad: bool = True) -> None:
        n = len(self.ids)
        texts = [f"rebalance {n + i} kw{n + i}rb" for i in range(20)]
        self.ids += post_batch(self.pipe, "rita", self.chat, texts)
        if bad and len(self.ids) % 100 == 0:
            marker = uuid.uuid4().hex
            # Keyed by the chat, so it shares a partition with the chat's messages.
            self.sealed[marker] = self.producer.produce(
                self.chat.encode(), b'{"schema_version": 1, "marker": "%s"}' % marker.encode(), 1
            )
            assert self.producer.flush(30) == 0
            self.markers.append(marker)

    def post_until(self, done: Callable[[], bool], what: str, bad: bool = True) -> None:
        """Keep messages flowing until `done()` (checked between posts)."""
        deadline = time.monotonic() + 180
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.post(bad)
            time.sleep(0.3)


def test_partitions_moving_between_workers_lose_and_duplicate_nothing(pipeline: Pipeline) -> None:
    kafka = pipeline.settings.kafka
    admin = AdminClient(kafka_client_config(kafka))

    def members(group: str) -> int:
        described = admin.describe_consumer_groups([group])[group].result(10)
        return len([m for m in described.members if m.assignment.topic_partitions])

    def encryptors() -> int:
        return members(kafka.encryptor_group)

    stream = Stream(pipeline)
    started: list[str] = []
    try:
        for _ in range(3):
            stream.post()
        pipeline.start(
            "encryptor",
            key="encryptor-2",
            env={"SEALSTREAM_ENCRYPTOR_HTTP__PORT": str(free_port())},
        )
        pipeline.start(
            "indexer", key="indexer-2", env={"SEALSTREAM_INDEXER_HTTP__PORT": str(free_port())}
        )
        started += ["encryptor-2", "indexer-2"]
        stream.post_until(lambda: encryptors() == 2, "a second encryptor")
        stream.post_until(lambda: members(kafka.indexer_group) == 2, "a second indexer")
        pipeline.start(
            "encryptor",
            key="encryptor-3",
            env={"SEALSTREAM_ENCRYPTOR_HTTP__PORT": str(free_port())},
        )
        started.append("encryptor-3")
        stream.post_until(lambda: encryptors() == 3, "a third encryptor")
        for _ in range(5):
            stream.post()

        # A graceful leave mid-stream: its partitions move to the other two.
        pipeline.signal("encryptor-2", signal.SIGTERM)
        started.remove("encryptor-2")
        stream.post_until(lambda: encryptors() == 2, "the group without encryptor-2")
        for _ in range(5):
            stream.post()

        # A crash mid-stream. Its last batch may be redelivered (at-least-once, rows are
        # idempotent by id), which would also publish a dead letter again: so the bad records
        # are all committed by both groups before the kill, and none is posted after it.
        progress = ConsumerGroupsProgress(kafka)
        position = progress.position()
        wait_until(lambda: progress.passed(position), timeout=180, what="both groups caught up")
        for _ in range(3):
            stream.post(bad=False)
        pipeline.signal("encryptor-3", signal.SIGKILL)
        started.remove("encryptor-3")
        stream.post_until(lambda: encryptors() == 1, "the group without encryptor-3", bad=False)
        for _ in range(3):
            stream.post(bad=False)

        ids = stream.ids
        index = SearchIndex(pipeline.settings.opensearch)

        def stored() -> bool:
            got = [m["message_id"] for m in history(pipeline, "sam", stream.chat)]
            assert len(got) == len(set(got)), "a message was stored twice"
            return sorted(got) == sorted(ids)

        def indexed() -> bool:
            index.refresh()
            return index.count(uuid.UUID(stream.chat)) == len(ids)  # _id = message id

        wait_until(stored, timeout=240, what="every acknowledged message stored")
        wait_until(indexed, timeout=240, what="every acknowledged message indexed")
        last = len(ids) - 1
        assert len(search(pipeline, "sam", stream.chat, f"kw{last}rb").json()["messages"]) == 1
        print(f"\n{len(ids)} messages, {len(stream.markers)} bad records across the rebalances")

        assert len(stream.markers) >= 2, "too few bad records to say anything"

        def letters_of(msgs: list[Any]) -> list[tuple[str, str]]:
            found = []
            for msg in msgs:
                for marker in stream.markers:
                    # A letter holds the record as it came: sealed, byte for byte.
                    if msg.value() == stream.sealed[marker]:
                        found.append((_headers(msg)["dlq.stage"], marker))
            return found

        letters = letters_of(_all_dead_letters(pipeline))
        assert sorted(letters) == sorted(
            (stage, marker) for marker in stream.markers for stage in ("encryptor", "indexer")
        ), "a bad record was dead-lettered twice or not at all"
    finally:
        for key in started:
            pipeline.signal(key, signal.SIGTERM)
