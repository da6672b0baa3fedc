"""Acknowledged means durable, and retention holds on disk (docs/operations.md, "Durability").

Against the real servers: what `sealstream migrate` leaves on the topics and the index (also when
they were made by an older release), the write consistency the message store really uses, and
the durability settings the running Postgres and Cassandra report about themselves.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources

import psycopg
import pytest
from cassandra.cluster import Cluster
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)
from opensearchpy import OpenSearch

from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import delete_topics, kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from sealstream.errors import StoreUnavailable
from sealstream.migrate import migrate_all
from sealstream.settings import KafkaSettings, Settings
from tests.conftest import require_port
from tests.integration.conftest import host_port

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def old_deployment(settings: Settings, database: object) -> Iterator[Settings]:
    """Topics and an index as an older release created them (retention only, no durability or
    history settings), plus names of this module's own; everything is removed afterwards."""
    cfg = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={
                    "messages_topic": f"{settings.kafka.messages_topic}.dur",
                    "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.dur",
                }
            ),
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_dur"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-dur"}
            ),
        }
    )
    require_port("kafka", *host_port(cfg.kafka.bootstrap))
    require_port("opensearch", *host_port(cfg.opensearch.url))
    admin = AdminClient(kafka_client_config(cfg.kafka))
    old = [
        NewTopic(cfg.kafka.messages_topic, 2, 1, config={"retention.ms": "86400000"}),
        NewTopic(cfg.kafka.dead_letter_topic, 1, 1, config={"retention.ms": "604800000"}),
    ]
    for future in admin.create_topics(old).values():
        future.result(30)
    body = json.loads(resources.files("schemas").joinpath("opensearch/messages.json").read_text())
    client = OpenSearch(hosts=[cfg.opensearch.url])
    index = f"{cfg.opensearch.index_prefix}-messages"
    client.indices.create(
        index=index,
        body={
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": body["mappings"],
        },
    )
    try:
        yield cfg
    finally:
        delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])
        client.indices.delete(index=index, ignore_unavailable=True)
        client.close()
        store = MessageStore(cfg.cassandra)
        store.connect()
        store.drop_keyspace()
        store.close()


@pytest.fixture(scope="module")
def migrated(old_deployment: Settings) -> Settings:
    migrate_all(old_deployment)
    return old_deployment


def topic_config(kafka: KafkaSettings, topic: str) -> dict[str, str]:
    admin = AdminClient(kafka_client_config(kafka))
    [future] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result(30).items()}


def broker_config(kafka: KafkaSettings) -> dict[str, str]:
    admin = AdminClient(kafka_client_config(kafka))
    broker = min(admin.describe_cluster(request_timeout=10).result(15).nodes, key=lambda n: n.id)
    [future] = admin.describe_configs(
        [ConfigResource(ResourceType.BROKER, str(broker.id))]
    ).values()
    return {name: entry.value for name, entry in future.result(30).items()}


def test_migrate_bounds_how_long_kafka_keeps_records_on_disk(migrated: Settings) -> None:
    kafka = migrated.kafka
    broker = broker_config(kafka)
    check_ms = int(broker["log.retention.check.interval.ms"])
    for topic, retention_ms in (
        (kafka.messages_topic, kafka.retention_ms),
        (kafka.dead_letter_topic, kafka.retention_ms * 7),
    ):
        config = topic_config(kafka, topic)
        assert int(config["retention.ms"]) == retention_ms
        segment_ms = int(config["segment.ms"])
        delete_delay_ms = int(config["file.delete.delay.ms"])
        # A segment is deleted once its newest record is past retention; its oldest record is at
        # most segment.ms older; the broker looks every check interval and removes the files
        # file.delete.delay.ms later.
        on_disk_ms = retention_ms + segment_ms + check_ms + delete_delay_ms
        print(
            f"{topic}: retention {retention_ms / HOUR_MS:.1f} h, on disk at most "
            f"{on_disk_ms / HOUR_MS:.2f} h (segment.ms {segment_ms}, check {check_ms}, "
            f"delete delay {delete_delay_ms})"
        )
        assert segment_ms <= min(HOUR_MS, retention_ms // 4)
        # docs/security.md: at most retention + 1 h 6 min with the broker's defaults.
        assert on_disk_ms <= retention_ms + HOUR_MS + 6 * 60_000
        assert config["min.insync.replicas"] == str(kafka.min_insync_replicas)
        assert config["unclean.leader.election.enable"] == "false"


def test_migrate_keeps_an_operators_other_topic_overrides(old_deployment: Settings) -> None:
    kafka = old_deployment.kafka
    admin = AdminClient(kafka_client_config(kafka))
    resource = ConfigResource(
        ResourceType.TOPIC,
        kafka.dead_letter_topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", "2000000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    migrate_all(old_deployment)
    config = topic_config(kafka, kafka.dead_letter_topic)
    assert config["max.message.bytes"] == "2000000"
    assert int(config["segment.ms"]) <= HOUR_MS


def index_settings(url: str, index: str) -> dict[str, object]:
    client = OpenSearch(hosts=[url])
    try:
        return dict(client.indices.get_settings(index=index, flat_settings=True)[index]["settings"])
    finally:
        client.close()


def test_migrate_makes_the_index_durable_and_bounds_its_history(migrated: Settings) -> None:
    existing = index_settings(
        migrated.opensearch.url, f"{migrated.opensearch.index_prefix}-messages"
    )
    fresh_cfg = migrated.opensearch.model_copy(
        update={"index_prefix": f"{migrated.opensearch.index_prefix}-fresh"}
    )
    fresh_index = SearchIndex(fresh_cfg)
    try:
        fresh_index.migrate()
        fresh = index_settings(fresh_cfg.url, fresh_index.index)
    finally:
        fresh_index.drop()
        fresh_index.close()
    for settings in (existing, fresh):
        # Acknowledged bulk requests are fsynced in the translog (the indexer commits after).
        assert settings["index.translog.durability"] == "request"
        # History of deleted documents is kept for a missing shard copy at most this long.
        assert settings["index.soft_deletes.retention_lease.period"] == "1h"


def one_message(chat_id: uuid.UUID) -> StoredMessage:
    return StoredMessage(
        chat_id=chat_id,
        message_id=SnowflakeIds(1).next_id(),
        sender_id="alice",
        dek_version=1,
        envelope=b"\x01sealed",
        created_at=datetime.now(UTC),
    )


def test_a_write_no_quorum_acknowledged_is_refused(settings: Settings) -> None:
    """The message store writes at LOCAL_QUORUM: on a keyspace that wants two replicas of a
    one-node cluster no write can be acknowledged by a quorum, so none may be reported written
    (the driver's own default, LOCAL_ONE, would acknowledge it with one copy)."""
    require_port("cassandra", settings.cassandra.hosts[0], settings.cassandra.port)
    two_copies = settings.cassandra.model_copy(
        update={
            "keyspace": f"{settings.cassandra.keyspace}_rf2",
            "replication": "{'class': 'SimpleStrategy', 'replication_factor': 2}",
        }
    )
    store = MessageStore(two_copies)
    store.connect()
    try:
        store.migrate()
        message = one_message(uuid.uuid4())
        with pytest.raises(StoreUnavailable):
            store.write_many([message])
        with pytest.raises(StoreUnavailable):
            store.mark_deleted(message.chat_id, message.message_id, datetime.now(UTC))
    finally:
        store.drop_keyspace()
        store.close()


def test_the_running_stack_syncs_before_it_acknowledges(settings: Settings) -> None:
    """Postgres (DEK history, audit) and Cassandra (envelopes) as started by `stack up`.

    A stack started by an older release fails here until Postgres and Cassandra are restarted:
    `sealstream stack down --only postgres --only cassandra && sealstream stack up`.
    """
    pg = settings.postgres
    require_port("postgres", pg.host, pg.port)
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname=pg.database,
        user=pg.user,
        password=pg.password.get_secret_value(),
    ) as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("fsync", "synchronous_commit", "full_page_writes")
        }
    assert shown == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}

    cfg = settings.cassandra
    require_port("cassandra", cfg.hosts[0], cfg.port)
    cluster = Cluster(list(cfg.hosts), port=cfg.port)
    try:
        session = cluster.connect()
        rows = session.execute(
            "SELECT name, value FROM system_views.settings WHERE name IN "
            "('commitlog_sync', 'commitlog_sync_group_window')"
        )
        commitlog = {row.name: row.value for row in rows}
    finally:
        cluster.shutdown()
    print(f"postgres {shown}; cassandra {commitlog}")
    assert commitlog["commitlog_sync"] in ("group", "batch")


def test_migrate_never_lowers_a_topics_min_insync_replicas(old_deployment: Settings) -> None:
    """A `migrate` run with the local default (1) must not weaken topics set up stronger."""
    kafka = old_deployment.kafka
    admin = AdminClient(kafka_client_config(kafka))
    stronger = ConfigResource(
        ResourceType.TOPIC,
        kafka.messages_topic,
        incremental_configs=[
            ConfigEntry("min.insync.replicas", "2", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([stronger]).values():
        future.result(30)
    try:
        assert kafka.min_insync_replicas == 1
        migrate_all(old_deployment)
        assert topic_config(kafka, kafka.messages_topic)["min.insync.replicas"] == "2"
    finally:
        back = ConfigResource(
            ResourceType.TOPIC,
            kafka.messages_topic,
            incremental_configs=[
                ConfigEntry("min.insync.replicas", "1", incremental_operation=AlterConfigOpType.SET)
            ],
        )
        for future in admin.incremental_alter_configs([back]).values():
            future.result(30)
