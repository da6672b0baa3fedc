"""Key-service benchmark on the real local stack: chat setup, a cold process sealing many
messages, KMS unwrap latency, the cost of a DEK cache miss layer by layer, and warm opens.

Run ``python -m sealstream.bench.keys_bench [chats] [messages]`` (defaults 1000 and 100000) with
the stack up (``sealstream stack up``). :func:`run` works in a namespace of its own (a fresh
Postgres schema ``bench_<hex>``, Redis prefix ``sealstream-bench:<hex>:`` and Transit key
``bench-<hex>``), removes all three afterwards, and returns the figures without printing anything.
Everything runs on one thread of this process.
"""

from __future__ import annotations

import math
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import redis

from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache
from sealstream.adapters.vault import TransitKms
from sealstream.crypto import MessageContext, envelope_dek_version, open_envelope, seal
from sealstream.keys.service import KeyService, kms_context
from sealstream.settings import Settings
from sealstream.wiring import key_service

MESSAGE_BYTES = 200
UNWRAP_CALLS = 1000  # direct Transit decrypts timed for the KMS latency figures
MIN_READ_SAMPLES = 1000  # Redis / Postgres reads are repeated over the chats up to this count
_PLAINTEXTS = 64  # distinct random plaintexts cycled through (no per-message urandom in the loop)
_PARTICIPANTS = ("alice", "bob")
_CREATED_MS = 1_767_225_600_000  # creation time bound into every benchmark envelope (v2)
T = TypeVar("T")


def bench_settings(base: Settings, run_id: str) -> Settings:
    """``base`` with its own Postgres schema, Redis key prefix and Transit key for this run."""
    return base.model_copy(
        update={
            "postgres": base.postgres.model_copy(update={"schema_name": f"bench_{run_id}"}),
            "redis": base.redis.model_copy(update={"key_prefix": f"sealstream-bench:{run_id}:"}),
            "vault": base.vault.model_copy(update={"default_key": f"bench-{run_id}"}),
        }
    )


def _percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _latency_ms(call: Callable[[], object], count: int) -> tuple[float, float]:
    """Time ``count`` calls of ``call`` one by one; return (median, p99) in milliseconds."""
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples), _percentile(samples, 0.99)


def _cycle(items: list[T]) -> Callable[[], T]:
    """A function returning the items one after another, round and round."""
    position = -1

    def following() -> T:
        nonlocal position
        position = (position + 1) % len(items)
        return items[position]

    return following


@contextmanager
def _service_without_redis(ns: Settings, db: Database, kms: TransitKms) -> Iterator[KeyService]:
    """A key service whose misses go to Postgres (as when Redis is down or has evicted the DEK)."""
    service = KeyService(
        repo=ChatKeyRepository(db),
        kms=kms,
        redis=None,
        settings=ns.keys,
        default_kms_key=ns.vault.default_key,
    )
    service.start()
    try:
        yield service
    finally:
        service.close()


def _delete_redis_prefix(ns: Settings) -> None:
    client = redis.Redis.from_url(ns.redis.url, socket_timeout=5.0)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{ns.redis.key_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def run(
    chats: int = 1000,
    messages: int = 100_000,
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
) -> dict[str, float]:
    """Benchmark the key service with ``chats`` chats and ``messages`` sealed messages.

    ``settings`` (default ``Settings()``) gives the servers; the schema, Redis prefix and Transit
    key are always replaced by fresh ones named after ``run_id`` (default: 8 random hex digits)
    and removed at the end, also when the run fails. Durations are seconds, latencies ms.
    """
    if chats < 1 or messages < 1:
        raise ValueError("chats and messages must be at least 1")
    ns = bench_settings(settings or Settings(), run_id or secrets.token_hex(4))
    with ExitStack() as cleanup:
        kms = TransitKms(ns.vault)
        kms.ensure_key(ns.vault.default_key)
        cleanup.callback(kms.delete_key, ns.vault.default_key)
        cleanup.callback(_delete_redis_prefix, ns)
        db = Database(ns.postgres)
        db.open()
        cleanup.callback(db.close)
        cleanup.callback(db.drop_schema)
        db.migrate()
        return _measure(ns, db, kms, chats, messages)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow errors


def _measure(
    ns: Settings, db: Database, kms: TransitKms, chats: int, messages: int
) -> dict[str, float]:
    out: dict[str, float] = {
        "chats": float(chats),
        "messages": float(messages),
        "message_bytes": float(MESSAGE_BYTES),
    }
    chat_ids = [uuid.uuid4() for _ in range(chats)]

    # 1. Setup: one KMS datakey and the chat + DEK rows per chat.
    with key_service(ns, db=db) as service:
        started = time.perf_counter()
        for chat in chat_ids:
            service.create_chat(chat, _PARTICIPANTS)
        elapsed = time.perf_counter() - started
    out["setup_seconds"] = elapsed
    out["setup_chats_per_s"] = chats / elapsed

    # 2 + 5. A cold key service (nothing in memory) seals every message, then opens them warm.
    plaintexts = [os.urandom(MESSAGE_BYTES) for _ in range(_PLAINTEXTS)]
    envelopes: list[bytes] = []
    with key_service(ns, db=db) as service:
        stats = service.stats
        crypto = cold_lookups = 0.0
        started = time.perf_counter()
        for i in range(messages):
            chat = chat_ids[i % chats]
            unwraps = stats.kms_unwraps
            looking = time.perf_counter()
            key = service.current_key(chat)
            if stats.kms_unwraps != unwraps:  # this lookup missed the in-process cache
                cold_lookups += time.perf_counter() - looking
            context = MessageContext(chat, i, "bench-user", 1, _CREATED_MS)
            sealing = time.perf_counter()
            envelopes.append(seal(plaintexts[i % _PLAINTEXTS], key, context))
            crypto += time.perf_counter() - sealing
        elapsed = time.perf_counter() - started
        misses = stats.kms_unwraps
        warm = stats.lookup_seconds - cold_lookups
        out["seal_seconds"] = elapsed
        out["seal_messages_per_s"] = messages / elapsed
        out["seal_kms_unwraps"] = float(stats.kms_unwraps)
        out["seal_local_hits"] = float(stats.local_hits)
        out["seal_redis_hits"] = float(stats.redis_hits)
        out["seal_postgres_reads"] = float(stats.postgres_reads)
        out["seal_lookup_seconds"] = stats.lookup_seconds
        out["seal_lookup_share"] = stats.lookup_seconds / elapsed
        # Lookups that unwrapped (one per chat) vs those served from memory (all the others).
        out["seal_cold_lookup_ms"] = cold_lookups / max(misses, 1) * 1000.0
        out["seal_warm_lookup_us"] = warm / max(messages - misses, 1) * 1e6
        out["seal_crypto_seconds"] = crypto
        out["seal_crypto_share"] = crypto / elapsed

        hits_before = stats.local_hits
        started = time.perf_counter()
        for i, envelope in enumerate(envelopes):
            chat = chat_ids[i % chats]
            key = service.key(chat, envelope_dek_version(envelope))
            context = MessageContext(chat, i, "bench-user", 1, _CREATED_MS)
            if open_envelope(envelope, key, context) != plaintexts[i % _PLAINTEXTS]:
                raise RuntimeError(f"message {i} did not round-trip")
        elapsed = time.perf_counter() - started
        out["open_seconds"] = elapsed
        out["open_messages_per_s"] = messages / elapsed
        out["open_local_hits"] = float(stats.local_hits - hits_before)
    del envelopes

    # 3. KMS unwrap latency: direct Transit decrypts of the chats' wrapped DEKs.
    repo = ChatKeyRepository(db)
    wrapped: list[tuple[str, str, bytes]] = []
    for chat in chat_ids:
        row = repo.dek(chat, 1)
        if row is None or row.encrypted_dek is None:
            raise RuntimeError(f"chat {chat} has no wrapped DEK version 1")
        wrapped.append((row.kms_key_name, row.encrypted_dek, kms_context(chat, 1)))
    next_wrapped = _cycle(wrapped)
    p50, p99 = _latency_ms(lambda: kms.unwrap(*next_wrapped()), UNWRAP_CALLS)
    out["kms_unwrap_calls"] = float(UNWRAP_CALLS)
    out["kms_unwrap_ms_p50"], out["kms_unwrap_ms_p99"] = p50, p99

    # 4. One cache miss, layer by layer, then the whole miss path of a fresh key service.
    reads = max(chats, MIN_READ_SAMPLES)
    cache = RedisKeyCache(ns.redis, ttl_seconds=ns.keys.redis_ttl_seconds)
    try:
        following = _cycle(chat_ids)
        missing: list[uuid.UUID] = []

        def redis_get() -> None:
            chat = following()
            if cache.wrapped(chat, 1) is None:
                missing.append(chat)

        out["redis_get_ms_p50"], out["redis_get_ms_p99"] = _latency_ms(redis_get, reads)
        if missing:
            raise RuntimeError(f"{len(missing)} wrapped DEK reads missed Redis")
    finally:
        cache.close()
    following = _cycle(chat_ids)
    out["postgres_read_ms_p50"], out["postgres_read_ms_p99"] = _latency_ms(
        lambda: repo.dek(following(), 1), reads
    )
    with key_service(ns, db=db) as service:
        following = _cycle(chat_ids)
        out["miss_ms_p50"], out["miss_ms_p99"] = _latency_ms(
            lambda: service.key(following(), 1), chats
        )
        out["miss_kms_unwraps"] = float(service.stats.kms_unwraps)
    with _service_without_redis(ns, db, kms) as service:
        following = _cycle(chat_ids)
        out["miss_postgres_ms_p50"], out["miss_postgres_ms_p99"] = _latency_ms(
            lambda: service.key(following(), 1), chats
        )
    return out


def main(argv: list[str]) -> None:
    chats = int(argv[0]) if argv else 1000
    messages = int(argv[1]) if len(argv) > 1 else 100_000
    r = run(chats=chats, messages=messages)
    other = 1.0 - r["seal_lookup_share"] - r["seal_crypto_share"]
    rows: list[tuple[str, str]] = [
        (
            "setup: create_chat",
            f"{r['setup_chats_per_s']:,.0f} chats/s ({r['setup_seconds']:.2f} s)",
        ),
        ("cold seal", f"{r['seal_messages_per_s']:,.0f} msg/s ({r['seal_seconds']:.2f} s)"),
        (
            "  KMS unwraps",
            f"{r['seal_kms_unwraps']:,.0f} for {chats:,} chats"
            f" (redis hits {r['seal_redis_hits']:,.0f}, postgres reads"
            f" {r['seal_postgres_reads']:,.0f})",
        ),
        (
            "  wall time split",
            f"key lookup {r['seal_lookup_share']:.1%}, seal {r['seal_crypto_share']:.1%},"
            f" loop/other {other:.1%}",
        ),
        (
            "  per lookup",
            f"cold (unwrapping) {r['seal_cold_lookup_ms']:.2f} ms,"
            f" warm (in-process) {r['seal_warm_lookup_us']:.2f} µs,"
            f" seal {r['seal_crypto_seconds'] / messages * 1e6:.2f} µs",
        ),
        ("KMS unwrap", f"p50 {r['kms_unwrap_ms_p50']:.2f} ms, p99 {r['kms_unwrap_ms_p99']:.2f} ms"),
        (
            "miss: Redis GET",
            f"p50 {r['redis_get_ms_p50']:.3f} ms, p99 {r['redis_get_ms_p99']:.3f} ms",
        ),
        (
            "miss: Postgres read",
            f"p50 {r['postgres_read_ms_p50']:.3f} ms, p99 {r['postgres_read_ms_p99']:.3f} ms",
        ),
        (
            "miss: key() via Redis",
            f"p50 {r['miss_ms_p50']:.2f} ms, p99 {r['miss_ms_p99']:.2f} ms",
        ),
        (
            "miss: key() via Postgres",
            f"p50 {r['miss_postgres_ms_p50']:.2f} ms, p99 {r['miss_postgres_ms_p99']:.2f} ms",
        ),
        (
            "warm open",
            f"{r['open_messages_per_s']:,.0f} msg/s ({r['open_seconds']:.2f} s,"
            f" {r['open_local_hits']:,.0f} in-process hits)",
        ),
    ]
    print(
        f"{chats:,} chats, {messages:,} messages of {MESSAGE_BYTES} bytes, one thread, "
        "real Postgres + Redis + OpenBao"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
