"""The key-lifecycle benchmark against the real stack, at a small size: its receipts must match
what it wrote, the propagation delay must be a measured number, and it must leave nothing behind.
No timing is asserted: the figures depend on the machine and its load."""

from __future__ import annotations

import math
import secrets

import psycopg
import pytest
import redis

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.vault import TransitKms
from sealstream.bench import lifecycle_bench
from sealstream.errors import KmsError
from sealstream.settings import Settings

CHATS = 200
MESSAGES = 500
ROUNDS = 3


@pytest.fixture(scope="module")
def bench(settings: Settings, database: object, kms: object) -> tuple[str, dict[str, float]]:
    # `database` and `kms` only make sure Postgres and OpenBao answer (they fail with a hint).
    run_id = secrets.token_hex(4)
    figures = lifecycle_bench.run(
        chats=CHATS, messages=MESSAGES, rounds=ROUNDS, settings=settings, run_id=run_id
    )
    return run_id, figures


def test_receipts_match_what_was_written(bench) -> None:
    _, figures = bench
    assert figures["rewrap_chats"] == figures["rewrap_deks"] == CHATS
    assert figures["shred_messages"] == MESSAGES
    assert figures["shred_dek_versions_destroyed"] == 2  # rotated half way through the chat
    assert figures["shred_index_documents_deleted"] == MESSAGES
    assert figures["shred_rows_deleted"] == MESSAGES


def test_propagation_delay_is_measured(bench) -> None:
    _, figures = bench
    assert figures["propagation_rounds"] == ROUNDS
    for name in ("propagation_ms_p50", "propagation_ms_p99", "propagation_ms_max"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["propagation_ms_p50"] <= figures["propagation_ms_max"]
    for value in figures.values():
        assert math.isfinite(value)


def test_namespace_is_removed_afterwards(bench, settings: Settings) -> None:
    run_id, _ = bench
    ns = lifecycle_bench.bench_settings(settings, run_id)
    with psycopg.connect(settings.postgres.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s",
            (ns.postgres.schema_name,),
        ).fetchone()
    assert row is not None and row[0] == 0, "benchmark schema was not dropped"

    client = redis.Redis.from_url(settings.redis.url)
    try:
        assert not list(client.scan_iter(match=f"{ns.redis.key_prefix}*", count=1000))
    finally:
        client.close()

    store = MessageStore(ns.cassandra)
    store.connect()
    try:
        keyspaces = store.session.execute("SELECT keyspace_name FROM system_schema.keyspaces")
        assert ns.cassandra.keyspace not in {r.keyspace_name for r in keyspaces}
    finally:
        store.close()
    index = SearchIndex(ns.opensearch)
    try:
        assert not index._client.indices.exists(index=index.index)
    finally:
        index.close()
    kms = TransitKms(ns.vault)
    for key_name in (ns.vault.default_key, f"bench-{run_id}-rewrap"):
        with pytest.raises(KmsError):
            kms.latest_version(key_name)
