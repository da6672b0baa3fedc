"""The key-service benchmark against the real stack, at a small size: what it reports must hold
(one KMS unwrap per chat at most, every figure present) and it must leave nothing behind.
No timing is asserted: the figures depend on the machine and its load."""

from __future__ import annotations

import math
import secrets

import hvac
import hvac.exceptions
import psycopg
import pytest
import redis

from sealstream.bench import keys_bench
from sealstream.settings import Settings
from tests.conftest import require_port

CHATS = 20
MESSAGES = 2000

FIGURES = {
    "chats", "messages", "message_bytes",
    "setup_seconds", "setup_chats_per_s",
    "seal_seconds", "seal_messages_per_s", "seal_kms_unwraps", "seal_local_hits",
    "seal_redis_hits", "seal_postgres_reads", "seal_lookup_seconds", "seal_lookup_share",
    "seal_crypto_seconds", "seal_crypto_share", "seal_cold_lookup_ms", "seal_warm_lookup_us",
    "open_seconds", "open_messages_per_s", "open_local_hits",
    "kms_unwrap_calls", "kms_unwrap_ms_p50", "kms_unwrap_ms_p99",
    "redis_get_ms_p50", "redis_get_ms_p99", "postgres_read_ms_p50", "postgres_read_ms_p99",
    "miss_ms_p50", "miss_ms_p99", "miss_kms_unwraps", "miss_postgres_ms_p50",
    "miss_postgres_ms_p99",
}  # fmt: skip
# Which layer answered a cold lookup is the key service's business; the other figures are > 0.
MAY_BE_ZERO = {"seal_redis_hits", "seal_postgres_reads"}


@pytest.fixture(scope="module")
def bench(settings: Settings) -> tuple[str, dict[str, float]]:
    require_port("postgres", settings.postgres.host, settings.postgres.port)
    require_port("redis", "127.0.0.1", int(settings.redis.url.rsplit(":", 1)[1].split("/")[0]))
    require_port("openbao", "127.0.0.1", int(settings.vault.address.rsplit(":", 1)[1]))
    run_id = secrets.token_hex(4)
    return run_id, keys_bench.run(chats=CHATS, messages=MESSAGES, settings=settings, run_id=run_id)


def test_cold_process_unwraps_each_chat_key_at_most_once(bench) -> None:
    _, figures = bench
    assert 1 <= figures["seal_kms_unwraps"] <= CHATS
    # A fresh process missing every chat once also unwraps once per chat, no more.
    assert figures["miss_kms_unwraps"] == CHATS
    # Every message after the first lookup of its chat came from the in-process cache ...
    assert figures["seal_local_hits"] >= MESSAGES - CHATS
    # ... and the warm opens never left it.
    assert figures["open_local_hits"] == MESSAGES


def test_every_figure_is_present_and_positive(bench) -> None:
    _, figures = bench
    assert set(figures) == FIGURES
    for name, value in figures.items():
        assert math.isfinite(value), name
        assert (value >= 0) if name in MAY_BE_ZERO else (value > 0), name
    assert figures["chats"] == CHATS and figures["messages"] == MESSAGES
    assert figures["seal_lookup_share"] + figures["seal_crypto_share"] <= 1.0
    for name in (
        "kms_unwrap_ms",
        "redis_get_ms",
        "postgres_read_ms",
        "miss_ms",
        "miss_postgres_ms",
    ):
        assert figures[f"{name}_p50"] <= figures[f"{name}_p99"], name


def test_namespace_is_removed_afterwards(bench, settings: Settings) -> None:
    run_id, _ = bench
    ns = keys_bench.bench_settings(settings, run_id)
    assert ns.postgres.schema_name == f"bench_{run_id}"

    with psycopg.connect(settings.postgres.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s",
            (ns.postgres.schema_name,),
        ).fetchone()
    assert row is not None and row[0] == 0, "benchmark schema was not dropped"

    client = redis.Redis.from_url(settings.redis.url)
    try:
        leftover = list(client.scan_iter(match=f"{ns.redis.key_prefix}*", count=1000))
    finally:
        client.close()
    assert leftover == [], "benchmark Redis keys were not deleted"

    vault = hvac.Client(
        url=settings.vault.address, token=settings.vault.resolved_token().get_secret_value()
    )
    with pytest.raises(hvac.exceptions.InvalidPath):
        vault.secrets.transit.read_key(
            name=ns.vault.default_key, mount_point=settings.vault.transit_mount
        )
