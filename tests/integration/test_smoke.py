"""One round trip per server of the local stack, through the project's own adapters.

Every test works in names of this run only (see tests/conftest.py and tests/integration/conftest.py)
and prints the version of the server it talked to, so the CI log records what was tested against.
A server that does not answer fails the test with the command that starts the stack.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import faust
import hvac
import pytest
import redis
from confluent_kafka import Consumer, Message
from confluent_kafka.admin import AdminClient

from schemas.ids import SnowflakeIds, id_millis
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import Publisher, kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache, WrappedDek
from sealstream.adapters.vault import TransitKms
from sealstream.errors import KmsError
from sealstream.faust_records import faust_broker_credentials
from sealstream.settings import KafkaSettings, Settings, StackSettings
from sealstream.stack import runner
from sealstream.stack.base import StackContext
from tests.integration.conftest import KafkaTopics, NewGroup, text_message

REPO_ROOT = Path(__file__).resolve().parents[2]


def kafka_version(kafka: KafkaSettings) -> str:
    """What the broker says about itself, plus the release the stack module runs.

    The Kafka protocol has no "server version" request, so the release comes from the stack
    module (which reads it from the broker jar it put on the classpath); describe_cluster proves
    that it is this broker that answered.
    """
    # Keep the client referenced until the future resolves: a collected handle fails it.
    admin = AdminClient(kafka_client_config(kafka))
    cluster = admin.describe_cluster(request_timeout=10).result(15)
    [stack] = runner.status(runner.build(StackContext(StackSettings(), REPO_ROOT), ["kafka"]))
    nodes = ",".join(str(node.id) for node in cluster.nodes)
    return f"{stack.detail} (cluster {cluster.cluster_id}, nodes {nodes})"


# --- Kafka -------------------------------------------------------------------------------------


def poll_one(consumer: Consumer, timeout: float = 30.0) -> Message:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue  # nothing yet: the group is still joining
        assert msg.error() is None, msg.error()
        return msg
    raise AssertionError(f"no record consumed within {timeout:.0f}s")


def test_kafka_confluent_publish_and_consume(
    kafka_topics: KafkaSettings, kafka_group: NewGroup
) -> None:
    publisher = Publisher(kafka_topics, client_id="smoke-confluent")
    try:
        headers: list[tuple[str, str | bytes | None]] = [("message-id", b"42"), ("v", b"1")]
        [delivery] = publisher.publish(
            kafka_topics.messages_topic, [(b"chat-1", b"sealed payload")], headers=headers
        )
    finally:
        publisher.close()
    assert delivery.topic == kafka_topics.messages_topic and delivery.offset >= 0

    consumer = Consumer(
        kafka_client_config(
            kafka_topics,
            {
                # A group nobody used before: with `earliest` it starts at the record just written.
                "group.id": kafka_group("smoke-confluent"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    try:
        consumer.subscribe([kafka_topics.messages_topic])
        msg = poll_one(consumer)
    finally:
        consumer.close()
    assert (msg.partition(), msg.offset()) == (delivery.partition, delivery.offset)
    assert msg.key() == b"chat-1"
    assert msg.value() == b"sealed payload"
    assert msg.headers() == headers
    print(f"\nkafka: {kafka_version(kafka_topics)}")


def test_kafka_faust_agent_sees_every_record_in_order_per_key(
    kafka_topic_factory: KafkaTopics, kafka_group: NewGroup, tmp_path: Path
) -> None:
    cfg = kafka_topic_factory("faust")
    app_id = kafka_group("smoke-faust")  # the app id is Faust's consumer group: fresh each run
    app = faust.App(
        app_id,
        broker=f"kafka://{cfg.bootstrap}",
        broker_credentials=faust_broker_credentials(cfg),
        store="memory://",
        # Faust writes `<id>-data/` into the working directory unless told otherwise.
        datadir=str(tmp_path / "faust"),
        web_enabled=False,
        # No leader-election topic (`<id>-__assignor-__leader`) left behind on the broker.
        topic_disable_leader=True,
        topic_allow_declare=False,  # the fixture created the topic; Faust must not redeclare it
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
    )
    topic = app.topic(cfg.messages_topic, key_type=bytes, value_type=bytes)
    seen: list[tuple[bytes, bytes]] = []
    expected = [(f"chat-{i % 3}".encode(), f"m{i}".encode()) for i in range(10)]

    async def collect(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            seen.append((event.key, event.value))

    app.agent(topic, name=f"{app_id}-collect")(collect)

    async def main() -> None:
        # The app runs as a service inside this event loop rather than as a faust Worker: the
        # Worker installs signal handlers and owns the process's loop, which a test must not.
        publisher = Publisher(cfg, client_id="smoke-faust")
        try:
            await app.start()
            await publisher.publish_async(cfg.messages_topic, expected)
            deadline = time.monotonic() + 60
            while len(seen) < len(expected) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await app.stop()  # leaves the group, so the kafka_group fixture can delete it
            publisher.close()

    asyncio.run(main())

    assert sorted(seen) == sorted(expected), f"agent saw {len(seen)} of {len(expected)}"
    for key in {k for k, _ in expected}:  # Kafka orders per partition, hence per key
        assert [v for k, v in seen if k == key] == [v for k, v in expected if k == key]
    print(f"\nkafka (faust {faust.__version__}): {kafka_version(cfg)}")


# --- Cassandra ---------------------------------------------------------------------------------


def test_cassandra_message_store_and_prepared_statement(message_store: MessageStore) -> None:
    ids = SnowflakeIds(7)
    chat = uuid.uuid4()
    # Cassandra timestamps hold milliseconds: truncate so the rows compare equal after the trip.
    now = datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    rows = [
        StoredMessage(chat, ids.next_id(), "alice", 1, b"\x01sealed-one", now),
        StoredMessage(chat, ids.next_id(), "bob", 1, b"\x01sealed-two", now),
    ]
    message_store.write_many(rows)

    assert message_store.get(chat, rows[0].message_id) == rows[0]
    assert message_store.get(chat, rows[1].message_id) == rows[1]
    assert message_store.get(uuid.uuid4(), rows[0].message_id) is None
    history = list(
        message_store.history(chat, ids.next_id(), id_millis(rows[0].message_id) - 1000, 10)
    )
    assert history == [rows[1], rows[0]]  # newest first

    # A prepared statement of our own, on a throwaway table in the run's keyspace.
    session = message_store.session
    table = f"{message_store.keyspace}.smoke_probe"
    session.execute(f"CREATE TABLE IF NOT EXISTS {table} (id uuid PRIMARY KEY, body blob)")
    try:
        insert = session.prepare(f"INSERT INTO {table} (id, body) VALUES (?, ?)")
        select = session.prepare(f"SELECT body FROM {table} WHERE id = ?")
        key = uuid.uuid4()
        session.execute(insert, (key, b"\x00\xffprobe"))
        row = session.execute(select, (key,)).one()
        assert row is not None and bytes(row.body) == b"\x00\xffprobe"
    finally:
        session.execute(f"DROP TABLE IF EXISTS {table}")

    version = session.execute("SELECT release_version FROM system.local").one()[0]
    print(f"\ncassandra: Apache Cassandra {version}")


# --- OpenSearch --------------------------------------------------------------------------------


def test_history_pages_past_a_long_run_of_deleted_messages(message_store: MessageStore) -> None:
    chat, ids = uuid.uuid4(), SnowflakeIds(41)
    rows = [
        StoredMessage(chat, ids.next_id(), "alice", 1, b"envelope", datetime.now(UTC))
        for _ in range(100)
    ]
    message_store.write_many(rows)
    for row in rows[40:]:  # the 60 newest are deleted
        message_store.mark_deleted(chat, row.message_id, datetime.now(UTC))
    newest_first = [r.message_id for r in reversed(rows[:40])]
    oldest_ms = id_millis(rows[0].message_id) - 60_000
    page = list(message_store.history(chat, 2**63 - 1, oldest_ms, 10))
    assert [m.message_id for m in page] == newest_first[:10]
    rest = list(message_store.history(chat, page[-1].message_id, oldest_ms, 100))
    assert [m.message_id for m in rest] == newest_first[10:]


def test_opensearch_index_search_and_no_text_in_source(search_index: SearchIndex) -> None:
    chat, other_chat = uuid.uuid4(), uuid.uuid4()
    sent = datetime.now(UTC)
    search_index.index_many(
        [
            text_message(search_index, 101, chat, "default", "alice", sent, "the quick brown fox"),
            text_message(search_index, 102, chat, "default", "bob", sent, "a lazy dog sleeps"),
            text_message(search_index, 103, other_chat, "default", "carol", sent, "brown bread"),
        ]
    )
    search_index.refresh()

    assert search_index.search_chat(chat, "brown") == [101]
    assert search_index.search_chat(chat, "dog") == [102]
    assert search_index.search_chat(other_chat, "brown") == [103]  # the chat filter holds
    assert search_index.search_chat(chat, "zebra") == []
    sources = search_index.all_sources()
    assert {s["message_id"] for s in sources} >= {101, 102, 103}
    # The mapping excludes the text from `_source`: the index answers "which" but never "what".
    assert all("text" not in source for source in sources)
    print(f"\nopensearch: {search_index.ping()}")


# --- Postgres ----------------------------------------------------------------------------------


def test_postgres_migrated_schema_and_chat_key_rows(database: Database, run_id: str) -> None:
    with database.connection() as conn:
        one = conn.execute("SELECT 1 AS one").fetchone()
        version = conn.execute("SELECT version() AS v").fetchone()
    assert one is not None and one["one"] == 1

    repo = ChatKeyRepository(database)
    tenant = f"smoke-{run_id}"
    repo.upsert_tenant(tenant, "smoke-cmk")
    assert repo.tenant_key_name(tenant) == "smoke-cmk"
    chat = uuid.uuid4()
    assert repo.create_chat(chat, tenant, ("alice", "bob"), "vault:v1:c21va2U=", "smoke-cmk")
    assert not repo.create_chat(chat, tenant, ("alice",), "vault:v1:other", "smoke-cmk")

    row = repo.chat(chat)
    assert row is not None and (row.tenant_id, row.participants) == (tenant, ("alice", "bob"))
    dek = repo.active_dek(chat)
    assert dek is not None
    assert (dek.dek_version, dek.encrypted_dek, dek.kms_key_name, dek.state) == (
        1,
        "vault:v1:c21va2U=",
        "smoke-cmk",
        "active",
    )
    assert version is not None
    print(f"\npostgres: {version['v'].split(' on ')[0]}")


# --- Redis -------------------------------------------------------------------------------------


def test_redis_wrapped_dek_cache_and_invalidation(
    redis_cache: RedisKeyCache, settings: Settings
) -> None:
    chat = uuid.uuid4()
    assert redis_cache.current_version(chat) is None
    redis_cache.set_wrapped(chat, 3, WrappedDek("vault:v1:abc", "smoke-cmk"))
    redis_cache.set_current_version(chat, 3)
    assert redis_cache.wrapped(chat, 3) == WrappedDek("vault:v1:abc", "smoke-cmk")
    assert redis_cache.wrapped(chat, 2) is None
    assert redis_cache.current_version(chat) == 3

    heard: list[tuple[str, uuid.UUID]] = []
    got = threading.Event()

    def on_chat(action: str, chat_id: uuid.UUID) -> None:
        heard.append((action, chat_id))
        got.set()

    listener = redis_cache.subscribe(on_chat, lambda: None)
    try:
        # Pub/sub drops messages published before the subscription exists: wait for it.
        # Generous bounds: on a loaded machine the listener thread may start seconds late.
        assert listener.subscribed.wait(30)
        redis_cache.publish_invalidation("rotated", chat)
        assert got.wait(30)
    finally:
        listener.stop()
    assert heard == [("rotated", chat)]
    redis_cache.forget_chat(chat)
    assert redis_cache.wrapped(chat, 3) is None

    client = redis.Redis.from_url(settings.redis.url, socket_timeout=2)
    try:
        print(f"\nredis: Redis {client.info('server')['redis_version']}")
    finally:
        client.close()


# --- OpenBao Transit ---------------------------------------------------------------------------


def test_transit_data_key_unwrap_rotate_rewrap(
    kms: TransitKms, settings: Settings, run_id: str
) -> None:
    key = f"test-{run_id}-smoke"
    try:
        kms.ensure_key(key)  # the kms fixture deletes it at the end of the run
    except KmsError as exc:
        if "refused" not in str(exc):
            raise
        # Seen when the OpenBao on this port was started by another checkout's `stack up`: it
        # answers, but not to the root token this checkout's `stack up` wrote.
        pytest.fail(
            f"{exc}; the OpenBao at {settings.vault.address} does not accept the token from "
            f"{settings.vault.token_file} - is it the one this checkout's `sealstream stack up` "
            "initialised?",
            pytrace=False,
        )
    context = b"chat:smoke:1"
    data_key = kms.generate_data_key(key, context)
    assert data_key.wrapped.startswith("vault:v1:") and len(data_key.plaintext) == 32
    assert kms.unwrap(key, data_key.wrapped, context) == data_key.plaintext
    # Wrapped under v1 too, so that the batch below really moves them to the new version.
    contexts = [f"chat:smoke:batch-{i}".encode() for i in range(3)]
    batch_keys = [kms.generate_data_key(key, c) for c in contexts]

    assert kms.rotate_master_key(key) == 2
    rewrapped = kms.rewrap(key, data_key.wrapped, context)
    assert rewrapped.startswith("vault:v2:") and rewrapped != data_key.wrapped
    assert kms.unwrap(key, rewrapped, context) == data_key.plaintext

    batch = kms.rewrap_batch(
        key, [(d.wrapped, c) for d, c in zip(batch_keys, contexts, strict=True)]
    )
    assert len(batch) == 3 and all(w.startswith("vault:v2:") for w in batch)
    assert [kms.unwrap(key, w, c) for w, c in zip(batch, contexts, strict=True)] == [
        d.plaintext for d in batch_keys
    ]

    # The health endpoint needs no token and reports the server's version.
    health = hvac.Client(url=settings.vault.address).sys.read_health_status(method="GET")
    print(f"\nopenbao: OpenBao {health['version']} (sealed={health['sealed']})")
