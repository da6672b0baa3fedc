"""One round trip per server of the local stack, through the project's own adapters.

Each test prints the version of the server it talked to, so the CI log records them.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from datetime import UTC, datetime

import faust
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import Publisher, delete_topics, ensure_topics
from sealstream.adapters.opensearch import IndexedMessage, SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache, WrappedDek
from sealstream.adapters.vault import TransitKms
from sealstream.settings import Settings
from tests.conftest import require_port


def smoke_kafka(settings: Settings, suffix: str) -> Settings:
    require_port("kafka", "127.0.0.1", int(settings.kafka.bootstrap.rsplit(":", 1)[1]))
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.smoke-{suffix}",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.smoke-{suffix}",
        }
    )
    return settings.model_copy(update={"kafka": kafka})


def test_kafka_confluent_round_trip(settings: Settings) -> None:
    cfg = smoke_kafka(settings, "confluent")
    ensure_topics(cfg.kafka)
    publisher = Publisher(cfg.kafka, client_id="smoke")
    try:
        [delivery] = publisher.publish(
            cfg.kafka.messages_topic, [(b"chat-1", b"payload")], headers=[("h", b"v")]
        )
        assert delivery.offset >= 0
        consumer = Consumer(
            {
                "bootstrap.servers": cfg.kafka.bootstrap,
                "group.id": f"smoke-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([cfg.kafka.messages_topic])
        msg = None
        for _ in range(100):
            msg = consumer.poll(0.3)
            if msg is not None and not msg.error():
                break
        consumer.close()
        assert msg is not None and (msg.key(), msg.value()) == (b"chat-1", b"payload")
        assert msg.headers() == [("h", b"v")]
        admin = AdminClient({"bootstrap.servers": cfg.kafka.bootstrap})
        print(f"kafka broker ids: {list(admin.list_topics(timeout=5).brokers)}")
    finally:
        publisher.close()
        delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])


def test_kafka_faust_agent_sees_every_record_in_order(settings: Settings) -> None:
    cfg = smoke_kafka(settings, "faust")
    ensure_topics(cfg.kafka)
    publisher = Publisher(cfg.kafka, client_id="smoke-faust")
    seen: list[tuple[bytes, bytes]] = []
    done = threading.Event()
    app = faust.App(
        f"smoke-faust-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{cfg.kafka.bootstrap}",
        store="memory://",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
    )
    topic = app.topic(cfg.kafka.messages_topic, key_type=bytes, value_type=bytes)

    async def collect(stream: faust.StreamT) -> None:  # type: ignore[type-arg]
        async for event in stream.events():
            seen.append((event.key, event.value))
            if len(seen) == 10:
                done.set()

    app.agent(topic, name="smoke-agent")(collect)

    async def main() -> None:
        await app.start()
        publisher.publish(
            cfg.kafka.messages_topic, [(f"k{i % 2}".encode(), f"v{i}".encode()) for i in range(10)]
        )
        for _ in range(600):
            if done.is_set():
                break
            await asyncio.sleep(0.1)
        await app.stop()

    try:
        asyncio.run(main())
    finally:
        publisher.close()
        delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])
    assert len(seen) == 10
    for key in (b"k0", b"k1"):  # per key (partition), order is kept
        values = [int(v[1:]) for k, v in seen if k == key]
        assert values == sorted(values)


def test_cassandra_prepared_round_trip(settings: Settings) -> None:
    require_port("cassandra", "127.0.0.1", settings.cassandra.port)
    store = MessageStore(
        settings.cassandra.model_copy(update={"keyspace": f"{settings.cassandra.keyspace}_smoke"})
    )
    store.connect()
    try:
        store.migrate()
        ids = SnowflakeIds(5)
        chat = uuid.uuid4()
        rows = [
            StoredMessage(
                chat,
                ids.next_id(),
                "alice",
                1,
                bytes([i]) * 100,
                datetime.now(UTC).replace(microsecond=0),
            )
            for i in range(2)
        ]
        store.write_many(rows)
        assert store.get(chat, rows[0].message_id) == rows[0]
        history = list(store.history(chat, ids.next_id(), 0, 10))
        assert [m.message_id for m in history] == [rows[1].message_id, rows[0].message_id]
        version = store.session.execute("SELECT release_version FROM system.local").one()[0]
        print(f"cassandra {version}")
    finally:
        store.drop_keyspace()
        store.close()


def test_opensearch_index_and_search_without_text_in_source(settings: Settings) -> None:
    require_port("opensearch", "127.0.0.1", 19200)
    index = SearchIndex(
        settings.opensearch.model_copy(
            update={"index_prefix": f"{settings.opensearch.index_prefix}-smoke"}
        )
    )
    try:
        index.migrate()
        chat = uuid.uuid4()
        index.index_many(
            [IndexedMessage(42, chat, "default", "alice", datetime.now(UTC), "the quick brown fox")]
        )
        index.refresh()
        assert index.search_chat(chat, "brown") == [42]
        assert index.search_chat(uuid.uuid4(), "brown") == []
        assert all("text" not in source for source in index.all_sources())
        print(index.ping())
    finally:
        index.drop()
        index.close()


def test_postgres_round_trip(database: Database) -> None:
    with database.connection() as conn:
        row = conn.execute("SELECT 1 AS one, version() AS v").fetchone()
    assert row is not None and row["one"] == 1
    repo = ChatKeyRepository(database)
    repo.upsert_tenant("smoke-tenant", "smoke-key")
    chat = uuid.uuid4()
    assert repo.create_chat(chat, "smoke-tenant", ("alice",), "vault:v1:wrapped", "smoke-key")
    assert repo.active_dek(chat).encrypted_dek == "vault:v1:wrapped"  # type: ignore[union-attr]
    print(row["v"].split(" on ")[0])


def test_redis_round_trip_and_invalidation(redis_cache: RedisKeyCache) -> None:
    chat = uuid.uuid4()
    redis_cache.set_wrapped(chat, 3, WrappedDek("vault:v1:abc", "k"))
    redis_cache.set_current_version(chat, 3)
    assert redis_cache.wrapped(chat, 3) == WrappedDek("vault:v1:abc", "k")
    assert redis_cache.current_version(chat) == 3
    heard: list[tuple[str, uuid.UUID]] = []
    got = threading.Event()

    def on_chat(action: str, chat_id: uuid.UUID) -> None:
        heard.append((action, chat_id))
        got.set()

    listener = redis_cache.subscribe(on_chat, lambda: None)
    try:
        assert listener.subscribed.wait(5)
        redis_cache.publish_invalidation("rotated", chat)
        assert got.wait(5) and heard == [("rotated", chat)]
    finally:
        listener.stop()
    print(f"redis {redis_cache._client.info('server')['redis_version']}")


def test_transit_datakey_decrypt_rotate_rewrap(kms: TransitKms, run_id: str) -> None:
    key = f"test-{run_id}-smoke"
    kms.ensure_key(key)
    context = b"chat:1"
    data_key = kms.generate_data_key(key, context)
    assert data_key.wrapped.startswith("vault:v1:") and len(data_key.plaintext) == 32
    assert kms.unwrap(key, data_key.wrapped, context) == data_key.plaintext
    assert kms.rotate_master_key(key) == 2
    rewrapped = kms.rewrap(key, data_key.wrapped, context)
    assert rewrapped.startswith("vault:v2:")
    assert kms.unwrap(key, rewrapped, context) == data_key.plaintext
    others = [kms.generate_data_key(key, f"chat:{i}".encode()) for i in range(3)]
    batch = kms.rewrap_batch(key, [(d.wrapped, f"chat:{i}".encode()) for i, d in enumerate(others)])
    assert [kms.unwrap(key, w, f"chat:{i}".encode()) for i, w in enumerate(batch)] == [
        d.plaintext for d in others
    ]
    assert base64.b64encode(data_key.plaintext).decode() not in repr(data_key)
    health = kms._client.sys.read_health_status(method="GET")
    print(f"openbao {health['version']}")
