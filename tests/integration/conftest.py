"""Session fixtures of the integration tier: the run's Cassandra keyspace, OpenSearch index and
Kafka topics, each created through the project's own adapter and removed at the end of the run.

They use names of their own, derived from the run's `settings` (`<keyspace>_smoke`,
`<prefix>-smoke`, `<topic>.<suffix>`): the e2e tier migrates and then drops the run's shared
keyspace, index and topics while it tears down, and these must outlive that whatever the order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from confluent_kafka.admin import AdminClient

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics, ensure_topics, kafka_client_config
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import IndexedMessage, SearchIndex, document_terms
from sealstream.settings import KafkaSettings, Settings
from tests.conftest import require_port

KafkaTopics = Callable[[str], KafkaSettings]
NewGroup = Callable[[str], str]


def host_port(address: str) -> tuple[str, int]:
    """`host:port` out of a bootstrap string or URL (`http://host:port/...`)."""
    netloc = address.split("://", 1)[-1].split("/", 1)[0].split(",", 1)[0]
    host, _, port = netloc.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="session")
def smoke_settings(settings: Settings) -> Settings:
    """The run's settings with a keyspace and index prefix of the smoke tests' own."""
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_smoke"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-smoke"}
            ),
        }
    )


@pytest.fixture(scope="session")
def message_store(smoke_settings: Settings) -> Iterator[MessageStore]:
    cfg = smoke_settings.cassandra
    require_port("cassandra", cfg.hosts[0], cfg.port)
    store = MessageStore(cfg)
    store.connect()
    try:
        store.migrate()
        yield store
    finally:
        store.drop_keyspace()
        store.close()


@pytest.fixture(scope="session")
def search_index(smoke_settings: Settings) -> Iterator[SearchIndex]:
    require_port("opensearch", *host_port(smoke_settings.opensearch.url))
    index = SearchIndex(smoke_settings.opensearch)
    try:
        index.migrate()
        yield index
    finally:
        index.drop()
        index.close()


@pytest.fixture(scope="session")
def kafka_topic_factory(settings: Settings) -> Iterator[KafkaTopics]:
    """`make(suffix)` creates a fresh message + dead-letter topic pair for this run and returns
    the Kafka settings naming them; every pair made is deleted at the end of the run."""
    require_port("kafka", *host_port(settings.kafka.bootstrap))
    made: list[KafkaSettings] = []

    def make(suffix: str) -> KafkaSettings:
        cfg = settings.kafka.model_copy(
            update={
                "messages_topic": f"{settings.kafka.messages_topic}.{suffix}",
                "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.{suffix}",
            }
        )
        made.append(cfg)  # before creating: a half-created pair is still cleaned up
        ensure_topics(cfg)
        return cfg

    yield make
    for cfg in made:
        delete_topics(cfg, [cfg.messages_topic, cfg.dead_letter_topic])


@pytest.fixture(scope="session")
def kafka_topics(kafka_topic_factory: KafkaTopics) -> KafkaSettings:
    """The run's smoke topics (message topic with `settings.kafka.partitions` partitions)."""
    return kafka_topic_factory("smoke")


@pytest.fixture
def kafka_group(settings: Settings) -> Iterator[NewGroup]:
    """`new(prefix)` returns a consumer-group id nobody used before; the groups are deleted
    after the test, since Kafka would otherwise keep them (and their offsets) for a week."""
    groups: list[str] = []

    def new(prefix: str) -> str:
        groups.append(f"{prefix}-{uuid.uuid4().hex[:12]}")
        return groups[-1]

    yield new
    if groups:
        # Fails the test if a member is still in a group: its consumer did not leave on close.
        admin = AdminClient(kafka_client_config(settings.kafka))
        for future in admin.delete_consumer_groups(groups, request_timeout=15).values():
            future.result(20)


def text_message(
    index: SearchIndex,
    message_id: int,
    chat_id: uuid.UUID,
    tenant_id: str,
    sender_id: str,
    sent_at: datetime,
    text: str,
) -> IndexedMessage:
    """The document the indexer makes of a message (a plain tenant's): its text analysed by the
    index's `_analyze` API into index terms (the text itself is not in the document)."""
    tokens = document_terms(index.analyze([text])[0])
    return IndexedMessage(message_id, chat_id, tenant_id, sender_id, sent_at, tokens)


@pytest.fixture
def wire(search_index: SearchIndex) -> Iterator[list[tuple[str, bytes]]]:
    """Every request (path, body bytes as sent) the adapter's HTTP connections send."""
    sent: list[tuple[str, bytes]] = []
    patched = []
    for connection in search_index._client.transport.connection_pool.connections:
        original = connection.perform_request

        def spy(method: str, url: str, *args: Any, _send: Any = original, **kwargs: Any) -> Any:
            body = kwargs.get("body", args[1] if len(args) > 1 else None)
            sent.append((url, body or b""))
            return _send(method, url, *args, **kwargs)

        connection.perform_request = spy
        patched.append(connection)
    yield sent
    for connection in patched:
        del connection.perform_request


def module_stores(settings: Settings, suffix: str) -> Settings:
    """`settings` with a Cassandra keyspace and an OpenSearch index of one test module's own
    (`<keyspace>_<suffix>`, `<prefix>-<suffix>`), so the module can drop them when it ends."""
    require_port("cassandra", settings.cassandra.hosts[0], settings.cassandra.port)
    require_port("opensearch", "127.0.0.1", int(settings.opensearch.url.rsplit(":", 1)[1]))
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_{suffix}"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-{suffix}"}
            ),
        }
    )


@contextmanager
def fresh_store(settings: Settings) -> Iterator[MessageStore]:
    """The message store of `settings`, migrated; its keyspace dropped at the end."""
    store = MessageStore(settings.cassandra)
    store.connect()
    store.migrate()
    try:
        yield store
    finally:
        store.drop_keyspace()
        store.close()


@contextmanager
def fresh_index(settings: Settings) -> Iterator[SearchIndex]:
    """The search index of `settings`, migrated; dropped at the end."""
    index = SearchIndex(settings.opensearch)
    index.migrate()
    try:
        yield index
    finally:
        index.drop()
        index.close()


SCRATCH_PART_SIZE = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def scratch_object_store(settings: Settings, run_id: str) -> Iterator[ObjectStore]:
    """An object-store bucket of the run's own, parts of 5 MiB (the least S3 allows, so multipart
    uploads happen at test sizes); emptied (incomplete uploads aborted) and removed at the end."""
    endpoint = urlsplit(settings.object_store.endpoint)
    require_port("s3proxy", endpoint.hostname or "127.0.0.1", endpoint.port or 80)
    config = settings.object_store.model_copy(
        update={
            "bucket": f"sealstream-test-{run_id}-{uuid.uuid4().hex[:6]}",
            "part_size_bytes": SCRATCH_PART_SIZE,
        }
    )
    objects = ObjectStore(config)
    assert "created" in objects.ensure_bucket()
    yield objects
    client = objects._client
    objects.abort_incomplete(timedelta(0), now=datetime.now(UTC) + timedelta(days=1))
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=objects.bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=objects.bucket, Key=item["Key"])
    objects.delete_empty_bucket()
    objects.close()
