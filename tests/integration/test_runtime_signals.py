"""The consumer runtime on the real broker: the lag gauge while a batch is held (the moment the
lag grows), readiness of a worker the group gives no partition, and a partition revoked while
its worker held a batch (paused) that comes back to that worker later.

The runtimes run in threads of the test process with a stage function of the test's own (the
sink is the thing held, not the thing verified); the broker, group and commits are real.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from sealstream.adapters.kafka import Publisher, delete_topics, ensure_topics, kafka_client_config
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


def _wait_for(
    what: str, condition: object, seconds: float = 120, on_timeout: object = lambda: ""
) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} {on_timeout()}"  # type: ignore[operator]
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
            on_timeout=lambda: f"lag gauge {_gauge('sealstream_consumer_lag', stage)}",
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


def test_a_partition_revoked_while_its_worker_held_a_batch_is_consumed_when_it_comes_back(
    kafka_topic_factory: KafkaTopics,
) -> None:
    """librdkafka keeps a partition's pause flag across unassign and re-assign: a partition
    revoked from a worker holding a batch (all its partitions paused) must not come back to it
    paused for good once the hold is over."""
    kafka = kafka_topic_factory(f"back-{uuid.uuid4().hex[:8]}").model_copy(
        update={"revoke_wait_ms": 500}
    )
    group = f"back-{uuid.uuid4().hex[:12]}"
    a_up = threading.Event()
    handled: dict[str, set[tuple[int, int]]] = {"a": set(), "b": set()}

    def handler(name: str, up: threading.Event | None) -> object:
        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            if up is not None and not up.is_set():
                raise StoreUnavailable("sink down")
            handled[name].update((r.partition, r.offset) for r in records)
            return []

        return process

    a = Running(f"back-a-{uuid.uuid4().hex[:6]}", kafka, group, handler("a", a_up))
    b: Running | None = None
    try:
        _wait_for("worker a never joined", a.runtime.ready)
        _publish(kafka, 60, "first")
        _wait_for("worker a never held its batch", lambda: a.runtime._paused)
        b = Running(f"back-b-{uuid.uuid4().hex[:6]}", kafka, group, handler("b", None))
        # Cooperative: some of a's partitions move to b while a holds its batch (paused).
        _wait_for("no partition moved to b", lambda: bool(b and b.runtime._owned))
        moved = {p for _, p in b.runtime._owned}
        a_up.set()
        _wait_for("a's hold did not end", lambda: not a.runtime._paused)
        b.close()  # b leaves: its partitions go back to a, which holds nothing now
        b = None
        _wait_for(
            "the partitions did not come back to a",
            lambda: moved <= {p for _, p in a.runtime._owned},
        )
        before = {name: set(seen) for name, seen in handled.items()}
        _publish(kafka, 60, "after the partitions came back")
        consumer = Consumer(kafka_client_config(kafka, {"group.id": group}))
        try:
            partitions = [TopicPartition(kafka.messages_topic, p) for p in range(kafka.partitions)]
            ends = {
                tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in partitions
            }
            wanted = {(p, o) for p, end in ends.items() for o in range(end)}
            _wait_for(
                "records of the partitions that came back were never handled",
                lambda: wanted <= handled["a"] | handled["b"],
                on_timeout=lambda: sorted({p for p, _ in wanted - handled["a"] - handled["b"]}),
            )
            assert handled["a"] - before["a"], "a handled nothing after the partitions came back"
        finally:
            consumer.close()
    finally:
        if b is not None:
            b.close()
        a.close()
