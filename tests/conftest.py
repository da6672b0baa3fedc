"""Shared fixtures: one isolated namespace per test run on the real local stack.

Every run gets its own Postgres schema, Redis key prefix, Transit key names, Cassandra keyspace,
OpenSearch index prefix and Kafka topic / consumer-group names, so runs never see each other's
data. A test that needs a server which is not answering fails (never skips) and says how to start it.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from opensearchpy import OpenSearch

from sealstream.settings import (
    CassandraSettings,
    OpenSearchSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)

START_HINT = "start the local stack first: `sealstream stack up` (or `make stack-up`)"


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def settings(run_id: str) -> Settings:
    base = Settings()
    return Settings(
        # The base's connection and credentials (the test process acts as the operator, the
        # services it starts as their own principals), with names of the run's own.
        kafka=base.kafka.model_copy(
            update=dict(
                messages_topic=f"t.{run_id}.messages",
                dead_letter_topic=f"t.{run_id}.dlq",
                # The run's own change topic too: tests read it from offset 0 (a shared one only grows).
                changes_topic=f"t.{run_id}.changes",
                # Groups of the run's own: in a shared group, other runs' workers would keep it from
                # being empty (offsets cannot be reset) and count as members.
                encryptor_group=f"t.{run_id}.encryptor",
                indexer_group=f"t.{run_id}.indexer",
                ml_group_prefix=f"t.{run_id}.ml-",
                partitions=4,
            )
        ),
        cassandra=CassandraSettings(
            hosts=base.cassandra.hosts, port=base.cassandra.port, keyspace=f"t_{run_id}"
        ),
        postgres=PostgresSettings(
            host=base.postgres.host, port=base.postgres.port, schema_name=f"t_{run_id}"
        ),
        redis=RedisSettings(url=base.redis.url, key_prefix=f"sealstream-test:{run_id}:"),
        vault=base.vault.model_copy(update={"default_key": f"test-{run_id}-default"}),
        opensearch=OpenSearchSettings(url=base.opensearch.url, index_prefix=f"t-{run_id}"),
        keys=base.keys,
    )


def require_port(name: str, host: str, port: int) -> None:
    """Fail (not skip) with the start command when a server of the stack is not listening."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        pytest.fail(f"{name} is not answering on {host}:{port}; {START_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def database(settings: Settings) -> Iterator[object]:
    from sealstream.adapters.postgres import Database

    require_port("postgres", settings.postgres.host, settings.postgres.port)
    db = Database(settings.postgres)
    db.open()
    db.migrate()
    yield db
    db.drop_schema()
    db.close()


@pytest.fixture(scope="session")
def kms(settings: Settings) -> Iterator[object]:
    from sealstream.adapters.vault import TransitKms

    require_port("openbao", "127.0.0.1", int(settings.vault.address.rsplit(":", 1)[1]))
    client = TransitKms(settings.vault)
    created: list[str] = []
    original = client.ensure_key

    def ensure_and_track(key_name: str) -> None:
        original(key_name)
        if key_name not in created:
            created.append(key_name)

    client.ensure_key = ensure_and_track  # type: ignore[method-assign]
    yield client
    for key_name in created:
        client.delete_key(key_name)


@pytest.fixture(scope="session")
def redis_cache(settings: Settings) -> Iterator[object]:
    from sealstream.adapters.redis import RedisKeyCache

    require_port("redis", "127.0.0.1", int(settings.redis.url.rsplit(":", 1)[1].split("/")[0]))
    cache = RedisKeyCache(settings.redis)
    yield cache
    cache.close()


def index_folder(client: OpenSearch, index_name: str) -> Path:
    """The folder of `index_name`'s shards on this machine (the node's own `path.data`)."""
    nodes = client.nodes.info(node_id="_local", metric="settings")["nodes"]
    [node] = nodes.values()
    data = node["settings"]["path"]["data"]
    data_path = Path(data[0] if isinstance(data, list) else data)
    uuid_ = client.indices.get_settings(index=index_name)[index_name]["settings"]["index"]["uuid"]
    folder = data_path / "nodes" / "0" / "indices" / uuid_
    assert folder.is_dir(), f"no folder {folder}: is the OpenSearch node on this machine?"
    return folder


def phrases(text: str) -> list[str]:
    """The whole text and every run of two words of it, in their order."""
    words = text.split()
    return [text] + [f"{a} {b}" for a, b in pairwise(words)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the fault drills after every other test: they crash and restart the stack's servers,
    which would disturb any test running at the same time (a stable sort keeps all else in order).
    """
    items.sort(key=lambda item: item.path.name == "test_drills.py")
