"""Consumer-runtime benchmark: what reading the message topic costs per record, before any work.

The encryptor and the indexer run on `sealstream.streaming` (confluent-kafka batches, a batch
thread, explicit synchronous commits). This measures that runtime, as a worker process with a
`process` that does nothing, against the same records read by a bare confluent-kafka
(librdkafka) consumer in batches with a synchronous commit per batch, the cheapest way Python can
read Kafka. Each consumer runs as its own process over the same 30,000 records of an isolated
topic; the figure is its CPU time per record (the process's user + system time, so it holds on a
loaded machine where throughput does not). Each window opens before the consumer can see a record:
the runtime worker joins the group on an empty topic and the records are published only then; the
bare consumer starts its clock when the partitions are assigned, before its first fetch. It tells how much of the two workers' CPU per message
is the runtime itself (docs/benchmarks.md).

    sealstream bench consumer
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import Publisher, delete_topics, ensure_topics, kafka_client_config
from sealstream.bench.pipeline_bench import isolated
from sealstream.services import settings_env, stop, wait_for
from sealstream.settings import Settings
from sealstream.stack.runner import group_cpu_seconds


def _publish(settings: Settings, count: int) -> None:
    ids = SnowflakeIds(7)
    chats = [uuid.uuid4() for _ in range(50)]
    records = [
        MessageRecord(
            message_id=ids.next_id(),
            chat_id=chats[i % len(chats)],
            sender_id="bench",
            text=f"benchmark message {i} lorem ipsum dolor sit amet consectetur",
            sent_at=datetime.now(UTC),
        )
        for i in range(count)
    ]
    publisher = Publisher(settings.kafka, client_id="consumer-bench", linger_ms=20)
    try:
        for start in range(0, count, 1000):
            publisher.publish(
                settings.kafka.messages_topic,
                [(r.key(), r.value()) for r in records[start : start + 1000]],
            )
    finally:
        publisher.close()


def _runtime_worker() -> None:
    """Child process: the workers' runtime with a process that does nothing (the child of
    `_runtime_figures`, started as `python -m sealstream.bench.consumer_bench runtime`)."""
    from sealstream.observability import configure_logging
    from sealstream.streaming import run_worker

    settings = Settings()
    configure_logging("consumer-bench")
    with ExitStack() as stack:
        run_worker(
            "bench", settings, settings.kafka.encryptor_group, settings.encryptor_http,
            lambda records: [], stack,
        )  # fmt: skip


def _confluent_consumer(count: int) -> None:
    """Child process: a bare confluent-kafka consumer, batches of 500, commit after each."""
    from confluent_kafka import Consumer

    settings = Settings()
    consumer = Consumer(
        kafka_client_config(
            settings.kafka,
            {
                "group.id": f"{settings.kafka.encryptor_group}-confluent",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    started: list[float] = []

    def on_assign(_consumer: object, _partitions: object) -> None:
        # Joined the group, nothing fetched yet: from here on, as for the runtime worker.
        if not started:
            started.extend((time.process_time(), time.perf_counter()))

    consumer.subscribe([settings.kafka.messages_topic], on_assign=on_assign)
    seen = 0
    while seen < count:
        batch = consumer.consume(500, 0.1)
        if batch:
            seen += len(batch)
            _ = [(m.topic(), m.partition(), m.offset(), m.key(), m.value()) for m in batch]
            consumer.commit(asynchronous=False)
    print(f"{time.process_time() - started[0]} {time.perf_counter() - started[1]}")
    consumer.close()


def _runtime_figures(env: dict[str, str], settings: Settings, count: int) -> dict[str, float]:
    import httpx

    url = f"http://127.0.0.1:{settings.encryptor_http.port}"
    child = subprocess.Popen(
        [sys.executable, "-m", "sealstream.bench.consumer_bench", "runtime"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def handled() -> float:
        total = 0.0
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("sealstream_consumer_records_total"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    try:
        # Ready = joined the group on an empty topic: every record published from here on is read
        # by this process inside the window (published before, it could be read before cpu0).
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "ready")
        cpu0, t0 = group_cpu_seconds(child.pid), time.perf_counter()
        _publish(settings, count)
        wait_for(lambda: handled() >= count, 300, "all records handled", interval=0.1)
        cpu1, t1 = group_cpu_seconds(child.pid), time.perf_counter()
    finally:
        stop([child])
    return {
        "runtime_cpu_ms_per_record": 1000 * (cpu1 - cpu0) / count,
        "runtime_records_per_s": count / (t1 - t0),
    }


def _confluent_figures(env: dict[str, str], count: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "sealstream.bench.consumer_bench", "confluent", str(count)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    cpu, wall = (float(v) for v in done.stdout.split())
    return {
        "confluent_cpu_ms_per_record": 1000 * cpu / count,
        "confluent_records_per_s": count / wall if wall else 0.0,
    }


def run(count: int = 30_000, settings: Settings | None = None) -> dict[str, float]:
    cfg = isolated(settings or Settings(), secrets.token_hex(3))
    # The runtime's own cost, before any work: plaintext records, so opening sealed ones (a
    # topic key from Postgres and the KMS, AES-GCM per record) is not in it; `bench pipeline`
    # measures sealing beside plaintext.
    cfg = cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"seal_records": False})})
    ensure_topics(cfg.kafka)
    try:
        env = {**os.environ, **settings_env(cfg)}
        figures = {"records": float(count)}
        figures |= _runtime_figures(env, cfg, count)
        figures |= _confluent_figures(env, count)
        return figures
    finally:
        delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])


if __name__ == "__main__":
    if sys.argv[1:2] == ["runtime"]:
        _runtime_worker()
    elif sys.argv[1:2] == ["confluent"]:
        _confluent_consumer(int(sys.argv[2]))
    else:
        for name, value in run().items():
            print(f"{name:<45} {value:,.4f}")
