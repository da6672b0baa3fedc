"""What an idempotency claim costs the gateway: the Postgres claim + acknowledgement of this
design against the Redis `SET NX GET` per client id of the old one (figures in
docs/operations.md, "Deadlines and idempotency"). Prints figures; asserts only the outcome
(every claim granted, then found again), never a timing: that depends on the machine's load.

Run: `.venv/bin/python -m pytest tests/integration/test_claims_cost.py -q -s`
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import redis

from ingest.idempotency import PostgresClaims
from ingest.ports import Claim
from sealstream.adapters.postgres import Database
from sealstream.crypto import TextFingerprints
from sealstream.settings import Settings

ROUNDS = 200


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms / p99 {p99 * 1000:.2f} ms"


def test_claim_cost_postgres_against_redis(settings: Settings, database: Database) -> None:
    claims = PostgresClaims(database)
    fingerprints = TextFingerprints(b"cost test fingerprint secret")

    def fingerprint(text: str) -> bytes:
        return fingerprints.of(text, "cost")

    cache = redis.Redis.from_url(settings.redis.url, socket_timeout=1.0)
    prefix = f"{settings.redis.key_prefix}claim-cost:"
    try:
        for size in (1, 10, 100):
            chat = uuid.uuid4()
            claim, acknowledge, old = [], [], []
            for i in range(ROUNDS):
                wanted = [
                    Claim(f"c{i}-{j}", i * 1000 + j, fingerprint(f"text {j}"), datetime.now(UTC))
                    for j in range(size)
                ]
                started = time.perf_counter()
                granted = claims.claim(chat, "cost", wanted)
                claim.append(time.perf_counter() - started)
                started = time.perf_counter()
                claims.acknowledge(chat, "cost", granted)
                acknowledge.append(time.perf_counter() - started)
                started = time.perf_counter()
                for j in range(size):  # the old store: one round trip per client id
                    cache.set(f"{prefix}{chat}:{i}:{j}", f"pending:{j}", nx=True, get=True, ex=60)
                old.append(time.perf_counter() - started)
                assert [g.message_id for g in granted] == [c.message_id for c in wanted]
            retry = [replace(c, message_id=c.message_id + 500) for c in wanted]
            again = claims.claim(chat, "cost", retry)
            assert all(g.earlier and g.acknowledged for g in again)
            print(
                f"\n{size:>3} client ids per request: Postgres claim {_ms(claim)}, "
                f"acknowledge {_ms(acknowledge)}; old Redis SET NX GET x{size} {_ms(old)}"
            )
    finally:
        for key in cache.scan_iter(f"{prefix}*", count=1000):
            cache.delete(key)
        cache.close()
