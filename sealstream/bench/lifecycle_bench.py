"""Key-lifecycle benchmark on the real local stack: how fast a chat rotation reaches another
worker, how fast DEKs are rewrapped after a master-key rotation, and how long crypto-shredding a
chat of many messages takes.

Run ``python -m sealstream.bench.lifecycle_bench [chats] [messages] [rounds]`` (defaults 10000,
10000 and 20) with the stack up, or ``sealstream bench lifecycle``. :func:`run` works in a
namespace of its own (Postgres schema ``bench_<hex>``, Redis prefix ``sealstream-bench:<hex>:``,
Transit keys ``bench-<hex>`` and ``bench-<hex>-rewrap``, Cassandra keyspace ``bench_<hex>``,
OpenSearch index ``bench-<hex>-messages``), removes all of it afterwards, also when the run
fails, and returns the figures without printing anything.

1. Propagation: two key services (as two worker processes: own in-process caches, own Redis
   subscription) hold a chat's current DEK; one rotates it, and the other's ``current_key`` is
   polled until it returns the new version. Timed from ``rotate()`` returning, so it covers the
   invalidation, the pointer read and the other worker's unwrap of the new DEK.
2. Rewrap: ``chats`` chats under a tenant with a master key of its own; the master key is rotated
   and :func:`sealstream.lifecycle.rewrap_all` rewraps every DEK (batch rewrap on Transit).
3. Shred: one chat with ``messages`` sealed rows in Cassandra (DEK rotated half way, so two
   versions) and as many search documents; :func:`sealstream.lifecycle.delete_chat` is timed and
   its receipt checked against what was written.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime

from schemas.ids import SnowflakeIds, id_millis
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import IndexedMessage, SearchIndex, document_terms
from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.bench.keys_bench import _delete_redis_prefix, _percentile
from sealstream.bench.keys_bench import bench_settings as keys_namespace
from sealstream.crypto import MessageContext, seal
from sealstream.keys.service import KeyService
from sealstream.lifecycle import delete_chat, rewrap_all
from sealstream.settings import Settings
from sealstream.wiring import key_service, message_stores

POLL_SECONDS = 0.00005  # between polls of the other worker (sleeping lets its listener run)
CREATE_THREADS = 8  # chats are created concurrently, as many gateways would
_PARTICIPANTS = ("alice", "bob")


def bench_settings(base: Settings, run_id: str) -> Settings:
    """The key benchmark's namespace plus a Cassandra keyspace and index prefix of its own."""
    ns = keys_namespace(base, run_id)
    return ns.model_copy(
        update={
            "cassandra": ns.cassandra.model_copy(update={"keyspace": f"bench_{run_id}"}),
            "opensearch": ns.opensearch.model_copy(update={"index_prefix": f"bench-{run_id}"}),
        }
    )


def run(
    chats: int = 10_000,
    messages: int = 10_000,
    rounds: int = 20,
    settings: Settings | None = None,
    *,
    run_id: str | None = None,
) -> dict[str, float]:
    """Measure propagation (``rounds`` rotations), rewrap (``chats`` DEKs) and the shred of one
    chat of ``messages`` messages. Durations are seconds, delays ms; counts are floats."""
    if chats < 1 or messages < 1 or rounds < 1:
        raise ValueError("chats, messages and rounds must be at least 1")
    run_id = run_id or secrets.token_hex(4)
    ns = bench_settings(settings or Settings(), run_id)
    rewrap_key = f"bench-{run_id}-rewrap"
    with ExitStack() as cleanup:
        kms = TransitKms(ns.vault)
        for key_name in (ns.vault.default_key, rewrap_key):
            kms.ensure_key(key_name)
            cleanup.callback(kms.delete_key, key_name)
        cleanup.callback(_delete_redis_prefix, ns)
        db = Database(ns.postgres)
        db.open()
        cleanup.callback(db.close)
        cleanup.callback(db.drop_schema)
        db.migrate()
        store, index = cleanup.enter_context(message_stores(ns))
        cleanup.callback(store.drop_keyspace)
        store.migrate()
        cleanup.callback(index.drop)
        index.migrate()
        keys = cleanup.enter_context(key_service(ns, db=db, actor="bench"))
        other = cleanup.enter_context(key_service(ns, db=db, actor="bench-other-worker"))

        out = {"propagation_rounds": float(rounds)}
        out |= _propagation(keys, other, rounds)
        out |= _rewrap(keys, kms, f"bench-{run_id}", rewrap_key, chats)
        out |= _shred(keys, store, index, ns.keys.default_tenant, messages)
        return out
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow errors


def _propagation(keys: KeyService, other: KeyService, rounds: int) -> dict[str, float]:
    chat = uuid.uuid4()
    keys.create_chat(chat, _PARTICIPANTS)
    timeout = keys.settings.pointer_ttl_seconds + 5.0
    rotate_ms: list[float] = []
    delays_ms: list[float] = []
    for _ in range(rounds):
        old = other.current_key(chat).version  # both workers hold the current DEK
        if keys.current_key(chat).version != old:
            raise RuntimeError("the two workers disagree on the current DEK before rotating")
        started = time.perf_counter()
        new = keys.rotate(chat, "benchmark: propagation")
        rotated = time.perf_counter()
        while other.current_key(chat).version != new:
            if time.perf_counter() - rotated > timeout:
                raise RuntimeError(f"rotation not seen by the other worker within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)
        delays_ms.append((time.perf_counter() - rotated) * 1000.0)
        rotate_ms.append((rotated - started) * 1000.0)
    return {
        "rotate_ms_p50": statistics.median(rotate_ms),
        "propagation_ms_p50": statistics.median(delays_ms),
        "propagation_ms_p99": _percentile(delays_ms, 0.99),
        "propagation_ms_max": max(delays_ms),
        "propagation_within_1s": float(max(delays_ms) < 1000.0),
    }


def _rewrap(
    keys: KeyService, kms: TransitKms, tenant: str, key_name: str, chats: int
) -> dict[str, float]:
    keys.register_tenant(tenant, key_name)
    chat_ids = [uuid.uuid4() for _ in range(chats)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(lambda c: keys.create_chat(c, _PARTICIPANTS, tenant), chat_ids))
    created = time.perf_counter() - started
    version = kms.rotate_master_key(key_name)
    report = rewrap_all(keys, kms, key_name)
    if report.master_key_version != version or not (report.examined == report.rewrapped == chats):
        raise RuntimeError(
            f"rewrap examined {report.examined} and rewrapped {report.rewrapped} of {chats} DEKs"
        )
    return {
        "rewrap_chats": float(chats),
        "rewrap_setup_chats_per_s": chats / created,
        "rewrap_deks": float(report.rewrapped),
        "rewrap_seconds": report.seconds,
        "rewrap_deks_per_s": report.per_second,
    }


def _shred(
    keys: KeyService, store: MessageStore, index: SearchIndex, tenant: str, messages: int
) -> dict[str, float]:
    chat = uuid.uuid4()
    keys.create_chat(chat, _PARTICIPANTS)
    ids = SnowflakeIds(1000)
    rows: list[StoredMessage] = []
    docs: list[IndexedMessage] = []
    texts: list[str] = []
    for i in range(messages):
        if i == messages // 2:
            keys.rotate(chat, "benchmark: second DEK version")
        key = keys.current_key(chat)
        message_id = ids.next_id()
        now = datetime.now(UTC)
        text = f"benchmark message {i} lorem ipsum dolor sit amet"
        context = MessageContext(chat, message_id, "alice", 1, id_millis(message_id))
        envelope = seal(text.encode(), key, context)
        rows.append(StoredMessage(chat, message_id, "alice", key.version, envelope, now))
        texts.append(text)
        docs.append(IndexedMessage(message_id, chat, tenant, "alice", now, []))
    # The index terms, as the indexer makes them (one `_analyze` pass, outside the timing).
    for n, tokens in enumerate(index.analyze(texts)):
        docs[n] = replace(docs[n], tokens=document_terms(tokens))
    started = time.perf_counter()
    store.write_many(rows)
    written = time.perf_counter()
    index.index_many(docs)
    index.refresh()
    indexed = time.perf_counter()
    if index.count(chat) != messages:
        raise RuntimeError(f"{index.count(chat)} of {messages} documents indexed")

    receipt = delete_chat(keys, index, store, chat, "benchmark: shred")
    got = (
        sorted(receipt.dek_versions_destroyed),
        receipt.index_documents_deleted,
        receipt.rows_deleted,
    )
    if got != ([1, 2], messages, messages):
        raise RuntimeError(f"shred receipt {got}, expected ([1, 2], {messages}, {messages})")
    return {
        "shred_messages": float(messages),
        "shred_write_rows_seconds": written - started,
        "shred_index_seconds": indexed - written,
        "shred_seconds": receipt.seconds,
        "shred_dek_versions_destroyed": float(len(receipt.dek_versions_destroyed)),
        "shred_index_documents_deleted": float(receipt.index_documents_deleted),
        "shred_rows_deleted": float(receipt.rows_deleted),
    }


def main(argv: list[str]) -> None:
    chats = int(argv[0]) if argv else 10_000
    messages = int(argv[1]) if len(argv) > 1 else 10_000
    rounds = int(argv[2]) if len(argv) > 2 else 20
    r = run(chats=chats, messages=messages, rounds=rounds)
    print(
        f"rotation seen by another worker ({rounds} rounds): p50 {r['propagation_ms_p50']:.2f} ms,"
        f" p99 {r['propagation_ms_p99']:.2f} ms, max {r['propagation_ms_max']:.2f} ms"
        f" (rotate itself p50 {r['rotate_ms_p50']:.2f} ms); within 1 s:"
        f" {'yes' if r['propagation_within_1s'] else 'NO'}"
    )
    print(
        f"rewrap: {r['rewrap_deks']:,.0f} DEKs in {r['rewrap_seconds']:.2f} s ="
        f" {r['rewrap_deks_per_s']:,.0f} DEKs/s (chats created at"
        f" {r['rewrap_setup_chats_per_s']:,.0f}/s)"
    )
    print(
        f"shred a chat of {messages:,} messages: {r['shred_seconds']:.2f} s"
        f" ({r['shred_dek_versions_destroyed']:.0f} DEK versions destroyed,"
        f" {r['shred_index_documents_deleted']:,.0f} documents, {r['shred_rows_deleted']:,.0f} rows)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
