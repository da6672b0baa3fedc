"""What the consumer runtime tells an operator, on the real broker: the lag gauge while a batch is
held (the moment the lag grows), and readiness of a worker the group gives no partition.

The runtimes run in threads of the test process with a stage function of the test's own (the
sink is the thing held, not the thing verified); the broker, group and commits are real.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import REGISTRY

from sealstream.adapters.kafka import Publisher, delete_topics, ensure_topics
from sealstream.errors import StoreUnavailable
from sealstream.settings import KafkaSettings, Settings
from sealstream.streaming import ConsumerRuntime, DeadLetterWriter, RawRecord, Rejected
from tests.conftest import require_port
from tests.integration.conftest import KafkaTopics, host_port


def _gauge(name: str, stage: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"stage": stage})


def _publish(kafka: KafkaSettings, n: int, what: str) -> None:
    publisher = Publisher(kafka, client_id="runtime-signals-test")
    try:
        items = [(f"{what}-{i}".encode(), f"{what} {i}".encode()) for i in range(n)]
        publisher.publish(kafka.messages_topic, items)
    finally:
        publisher.close()


class Running:
    """A `ConsumerRuntime` in a thread, stopped (and its consumer closed) at the end."""

    def __init__(self, stage: str, kafka: KafkaSettings, group: str, process: object) -> None:
        self.publisher = Publisher(kafka, client_id=f"{stage}-dlq")
        self.runtime = ConsumerRuntime(
            stage,
            kafka,
            group,
            process,  # type: ignore[arg-type]
            DeadLetterWriter(self.publisher, kafka.dead_letter_topic),
        )
        self.thread = threading.Thread(target=self.runtime.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.runtime.stop.set()
        self.thread.join(60)
        self.publisher.close()
        assert not self.thread.is_alive(), "the runtime did not stop"


def _wait_for(what: str, condition: object, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def test_the_lag_gauge_counts_records_that_arrive_while_a_batch_is_held(
    kafka_topic_factory: KafkaTopics,
) -> None:
    kafka = kafka_topic_factory(f"lag-{uuid.uuid4().hex[:8]}")
    stage = f"lagtest-{uuid.uuid4().hex[:8]}"
    sink_up = threading.Event()
    handled: set[tuple[int, int]] = set()

    def process(records: Sequence[RawRecord]) -> list[Rejected]:
        if not sink_up.is_set():
            raise StoreUnavailable("sink down")
        handled.update((r.partition, r.offset) for r in records)
        return []

    worker = Running(stage, kafka, f"lag-{uuid.uuid4().hex[:12]}", process)
    try:
        _publish(kafka, 6, "first")
        _wait_for("the batch was never held", lambda: worker.runtime._paused)
        _publish(kafka, 60, "arrived during the hold")
        # The gauge is refreshed every 5 s: every record published is behind, none committed.
        _wait_for(
            "the lag gauge did not count the records that arrived while the batch was held",
            lambda: (_gauge("sealstream_consumer_lag", stage) or 0) >= 66,
        )
        sink_up.set()
        _wait_for("not every record was handled after the hold", lambda: len(handled) == 66)
        _wait_for(
            "the lag gauge did not fall to 0 once everything was committed",
            lambda: _gauge("sealstream_consumer_lag", stage) == 0,
        )
    finally:
        worker.close()


@pytest.fixture
def one_partition_topic(settings: Settings) -> Iterator[KafkaSettings]:
    require_port("kafka", *host_port(settings.kafka.bootstrap))
    suffix = f"one-{uuid.uuid4().hex[:8]}"
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.{suffix}",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.{suffix}",
            "partitions": 1,
        }
    )
    try:
        ensure_topics(kafka)
        yield kafka
    finally:
        delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])


def test_a_worker_the_group_gives_no_partition_is_ready(one_partition_topic: KafkaSettings) -> None:
    group = f"ready-{uuid.uuid4().hex[:12]}"
    first = Running(f"ready-a-{uuid.uuid4().hex[:6]}", one_partition_topic, group, lambda r: [])
    second: Running | None = None
    try:
        _wait_for("the first worker never became ready", first.runtime.ready)
        second = Running(
            f"ready-b-{uuid.uuid4().hex[:6]}", one_partition_topic, group, lambda r: []
        )
        # One partition, two members: the second joins the group and is assigned nothing.
        _wait_for("a member without partitions never became ready", second.runtime.ready)
        assert first.runtime.ready()
    finally:
        if second is not None:
            second.close()
        first.close()
