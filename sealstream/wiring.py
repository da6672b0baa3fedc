"""Builds the real adapters from settings; the only place that knows which class serves which port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import DeadLetterReader, Publisher
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database, DeadLetterReplays
from sealstream.adapters.redis import RedisKeyCache
from sealstream.keys.index_keys import IndexKeys
from sealstream.keys.router import KmsRouter
from sealstream.keys.service import KeyService
from sealstream.settings import Settings


@contextmanager
def key_service(
    settings: Settings,
    db: Database | None = None,
    actor: str = "sealstream",
    kms_deadline: float | None = None,
) -> Iterator[KeyService]:
    """A started key service on Postgres + Redis + Transit (one cluster per tenant region);
    closes what it opened. `kms_deadline`: seconds per KMS call (see `KmsRouter`)."""
    own_db = db is None
    database = db or Database(settings.postgres)
    if own_db:
        database.open()
    redis = RedisKeyCache(settings.redis, ttl_seconds=settings.keys.redis_ttl_seconds)
    repo = ChatKeyRepository(database)
    service = KeyService(
        repo=repo,
        kms=KmsRouter(settings.vault, repo.tenants_with_key, deadline=kms_deadline),
        redis=redis,
        settings=settings.keys,
        default_kms_key=settings.vault.default_key,
        actor=actor,
    )
    try:
        service.start()
        yield service
    finally:
        service.close()
        redis.close()
        if own_db:
            database.close()


@contextmanager
def message_stores(settings: Settings) -> Iterator[tuple[MessageStore, SearchIndex]]:
    """The Cassandra message store and the search index, connected; closed on exit."""
    store = MessageStore(settings.cassandra)
    store.connect()
    index = SearchIndex(settings.opensearch)
    try:
        yield store, index
    finally:
        store.close()
        index.close()


def stores_reachable(database: Database, store: MessageStore, index: SearchIndex) -> None:
    """Raise unless Postgres, Cassandra and OpenSearch all answer (the readiness check of the
    services that read messages: reader and admin API)."""
    with database.connection() as conn:
        conn.execute("SELECT 1")
    store.session.execute("SELECT release_version FROM system.local")
    index.ping()


def index_keys(settings: Settings, database: Database, actor: str = "sealstream") -> IndexKeys:
    """The blind index's per-tenant keys on Postgres + Transit (no Redis: plaintext index keys
    stay in this process, wrapped ones in Postgres). Change of a tenant's keys reach it within
    `keys.pointer_ttl_seconds`."""
    from sealstream.adapters.postgres import IndexKeyRepository

    chats = ChatKeyRepository(database)
    return IndexKeys(
        repo=IndexKeyRepository(database),
        chats=chats,
        kms=KmsRouter(settings.vault, chats.tenants_with_key),
        ttl_seconds=settings.keys.pointer_ttl_seconds,
        key_ttl_seconds=settings.keys.ttl_seconds,
        actor=actor,
    )


@contextmanager
def dead_letter_tools(
    settings: Settings, database: Database
) -> Iterator[tuple[DeadLetterReader, Publisher, DeadLetterReplays]]:
    """What `sealstream dlq` and the admin API's dead-letter routes act on: the dead-letter
    topic's reader, an acks=all publisher (replays) and the replay ledger; closed on exit."""
    reader = DeadLetterReader(settings.kafka)
    publisher = Publisher(settings.kafka, client_id="sealstream-dlq-replay")
    try:
        yield reader, publisher, DeadLetterReplays(database)
    finally:
        publisher.close()
        reader.close()
