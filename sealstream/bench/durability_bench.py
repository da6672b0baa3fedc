"""What syncing before acknowledging costs, store by store, on the servers it runs against.

`sealstream bench durability` (or ``python -m sealstream.bench.durability_bench``) measures:

- Postgres: chat creation with its first DEK and DEK rotation through the key service (KMS call
  included), and the bare commit of a one-row transaction, once as the server is configured and
  once with ``SET LOCAL synchronous_commit = off`` (what the old local stack did for every commit);
- Cassandra: one-row writes one after another (latency) and encryptor-sized batches (throughput);
- Kafka: acknowledged (acks=all) publishes, on a topic with the broker's default flushing and on
  one with ``flush.messages=1`` (an fsync per record).

Every figure is labelled by what the server reports about itself (`fsync`, `commitlog_sync`), so
runs against differently configured stacks can be compared (docs/stack.md gives the procedure:
the same command against a private stack restarted with ``SEALSTREAM_STACK_POSTGRES_FSYNC`` and
``SEALSTREAM_STACK_CASSANDRA_COMMITLOG_SYNC``). Everything lives in names of its own (Postgres
schema, Redis prefix, Transit key, keyspace, topics), removed at the end.
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import Publisher, delete_topics, kafka_client_config
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.vault import TransitKms
from sealstream.bench.keys_bench import _delete_redis_prefix, _percentile, bench_settings
from sealstream.settings import Settings
from sealstream.wiring import key_service

CHATS = 200  # chats created, then rotated once each
COMMITS = 500  # bare one-row commits, per mode
SINGLE_WRITES = 500  # one-row Cassandra writes / single Kafka publishes, one after another
BATCHES = 20  # encryptor-sized Cassandra batches / Kafka publish rounds
BATCH_SIZE = 1000  # messages per batch, spread over BATCH_CHATS chats as the encryptor sees them
BATCH_CHATS = 100
ENVELOPE_BYTES = 281  # a 200-byte message sealed (docs/format.md: +81 bytes)


def _timed(call: Callable[[], object], count: int) -> tuple[list[float], float]:
    """Run ``call`` ``count`` times one by one: (latencies in ms, total seconds)."""
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(count):
        one = time.perf_counter()
        call()
        samples.append((time.perf_counter() - one) * 1000.0)
    return samples, time.perf_counter() - started


def _summary(out: dict[str, float | str], name: str, samples: list[float], seconds: float) -> None:
    out[f"{name}_p50_ms"] = statistics.median(samples)
    out[f"{name}_p99_ms"] = _percentile(samples, 0.99)
    out[f"{name}_per_s"] = len(samples) / seconds


def postgres(ns: Settings, out: dict[str, float | str]) -> None:
    db = Database(ns.postgres)
    db.open()
    try:
        db.migrate()
        ChatKeyRepository(db).upsert_tenant(ns.keys.default_tenant, ns.vault.default_key)
        with db.connection() as conn:
            for name in ("fsync", "synchronous_commit"):
                row = conn.execute(f"SELECT current_setting('{name}') AS value").fetchone()
                out[f"postgres_{name}"] = str(dict(row or {}).get("value", "?"))
            conn.execute("CREATE TABLE IF NOT EXISTS commit_probe (id bigint, at timestamptz)")
            conn.commit()
        counter = iter(range(10**9))

        def commit(synchronous: bool) -> None:
            with db.transaction() as conn:
                if not synchronous:
                    conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute("INSERT INTO commit_probe VALUES (%s, now())", (next(counter),))

        samples, seconds = _timed(lambda: commit(True), COMMITS)
        _summary(out, "postgres_commit", samples, seconds)
        samples, seconds = _timed(lambda: commit(False), COMMITS)
        _summary(out, "postgres_commit_async", samples, seconds)

        chats = [uuid.uuid4() for _ in range(CHATS)]
        with key_service(ns, db=db, actor="bench") as keys:
            pending = iter(chats)
            samples, seconds = _timed(
                lambda: keys.create_chat(next(pending), ("alice", "bob")), CHATS
            )
            _summary(out, "dek_create", samples, seconds)
            pending = iter(chats)
            samples, seconds = _timed(lambda: keys.rotate(next(pending), "bench"), CHATS)
            _summary(out, "dek_rotate", samples, seconds)
    finally:
        db.drop_schema()
        db.close()


def cassandra(ns: Settings, run_id: str, out: dict[str, float | str]) -> None:
    store = MessageStore(ns.cassandra.model_copy(update={"keyspace": f"bench_durability_{run_id}"}))
    store.connect()
    try:
        store.migrate()
        rows = store.session.execute(
            "SELECT name, value FROM system_views.settings WHERE name IN "
            "('commitlog_sync', 'commitlog_sync_group_window', 'commitlog_sync_period')"
        )
        out.update({f"cassandra_{row.name}": str(row.value) for row in rows})
        ids = SnowflakeIds(1)
        envelope = os.urandom(ENVELOPE_BYTES)
        chats = [uuid.uuid4() for _ in range(BATCH_CHATS)]

        def message(chat: uuid.UUID) -> StoredMessage:
            return StoredMessage(chat, ids.next_id(), "alice", 1, envelope, datetime.now(UTC))

        samples, seconds = _timed(lambda: store.write_many([message(chats[0])]), SINGLE_WRITES)
        _summary(out, "cassandra_single_write", samples, seconds)
        batches = [
            [message(chats[i % BATCH_CHATS]) for i in range(BATCH_SIZE)] for _ in range(BATCHES)
        ]
        pending = iter(batches)
        samples, seconds = _timed(lambda: store.write_many(next(pending)), BATCHES)
        out["cassandra_batch_p50_ms"] = statistics.median(samples)
        out["cassandra_batch_messages_per_s"] = BATCHES * BATCH_SIZE / seconds
    finally:
        store.drop_keyspace()
        store.close()


def kafka(ns: Settings, run_id: str, out: dict[str, float | str]) -> None:
    admin = AdminClient(kafka_client_config(ns.kafka))
    topics = {
        "kafka": f"bench.durability.{run_id}.default",
        "kafka_flush1": f"bench.durability.{run_id}.flush1",
    }
    created = admin.create_topics(
        [
            NewTopic(topics["kafka"], 6, 1),
            NewTopic(topics["kafka_flush1"], 6, 1, config={"flush.messages": "1"}),
        ]
    )
    for future in created.values():
        future.result(30)
    publisher = Publisher(ns.kafka, client_id="bench-durability")  # linger 0 as the gateway
    try:
        value = os.urandom(200)
        items = [(str(i % BATCH_CHATS).encode(), value) for i in range(BATCH_SIZE)]
        for label, topic in topics.items():

            def one(topic: str = topic) -> None:
                publisher.publish(topic, [(b"k", value)])

            def many(topic: str = topic) -> None:
                publisher.publish(topic, items)

            samples, seconds = _timed(one, SINGLE_WRITES)
            _summary(out, f"{label}_single_publish", samples, seconds)
            samples, seconds = _timed(many, BATCHES)
            out[f"{label}_batch_records_per_s"] = BATCHES * BATCH_SIZE / seconds
    finally:
        publisher.close()
        delete_topics(ns.kafka, list(topics.values()))


def run(settings: Settings | None = None, run_id: str | None = None) -> dict[str, float | str]:
    """Every figure (latencies in ms, rates per second), labelled by the servers' settings."""
    run_id = run_id or secrets.token_hex(4)
    ns = bench_settings(settings or Settings(), run_id)
    out: dict[str, float | str] = {}
    with ExitStack() as cleanup:
        kms = TransitKms(ns.vault)
        kms.ensure_key(ns.vault.default_key)
        cleanup.callback(kms.delete_key, ns.vault.default_key)
        cleanup.callback(_delete_redis_prefix, ns)
        postgres(ns, out)
        cassandra(ns, run_id, out)
        kafka(ns, run_id, out)
    return out


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<40} {value:,.3f}" if isinstance(value, float) else f"{key:<40} {value}")
    sys.exit(0)
