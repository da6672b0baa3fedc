"""Chat deletion by crypto-shredding, and the key audit trail, on the real stack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from reader.wiring import build as build_reader
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache
from sealstream.auth import mint_token
from sealstream.errors import KeyDestroyed, KmsError
from sealstream.keys.service import KeyService, kms_context
from sealstream.lifecycle import delete_chat
from sealstream.settings import Settings
from tests.integration.conftest import text_message
from tests.sealed_rows import sealed_row


@pytest.fixture(scope="module")
def life_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_life"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-life"}
            ),
        }
    )


@pytest.fixture(scope="module")
def stores(life_settings: Settings) -> Iterator[tuple[MessageStore, SearchIndex]]:
    store = MessageStore(life_settings.cassandra)
    store.connect()
    store.migrate()
    index = SearchIndex(life_settings.opensearch)
    index.migrate()
    yield store, index
    store.drop_keyspace()
    store.close()
    index.drop()
    index.close()


def service(settings: Settings, database: Database, kms: object, actor: str) -> KeyService:
    keys = KeyService(
        ChatKeyRepository(database),
        kms,
        RedisKeyCache(settings.redis),  # type: ignore[arg-type]
        settings.keys,
        settings.vault.default_key,
        actor=actor,
    )
    keys.start()
    return keys


def test_deleted_chat_is_shredded_everywhere(
    life_settings: Settings,
    database: Database,
    kms: object,
    stores: tuple[MessageStore, SearchIndex],
) -> None:
    store, index = stores
    keys = service(life_settings, database, kms, "operator")
    other = service(life_settings, database, kms, "another-process")
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice", "bob"))
        ids = SnowflakeIds(9)
        rows, docs = [], []
        for i in range(30):
            if i == 15:
                keys.rotate(chat, "test")
            key = keys.current_key(chat)
            message_id = ids.next_id()
            text = f"secret plan number {i}"
            rows.append(sealed_row(chat, message_id, "alice", key, text, datetime.now(UTC)))
            docs.append(
                text_message(index, message_id, chat, "default", "alice", datetime.now(UTC), text)
            )
        store.write_many(rows)
        index.index_many(docs)
        index.refresh()
        assert other.key(chat, 1) and other.key(chat, 2)  # another process holds both DEKs

        reader_app, close_reader = build_reader(life_settings)
        with TestClient(reader_app) as reader:
            url = f"/v1/chats/{chat}/messages/{rows[0].message_id}"
            bob = {"Authorization": f"Bearer {mint_token(life_settings.auth, 'bob')}"}
            assert reader.get(url, headers=bob).status_code == 200

            receipt = delete_chat(keys, index, store, chat, "user asked for erasure")
            assert receipt.dek_versions_destroyed == [1, 2]
            assert receipt.index_documents_deleted == 30
            assert receipt.rows_deleted == 30

            time.sleep(2.1)  # the reader's chat cache lives 2 s
            gone = reader.get(url, headers=bob)
            assert gone.status_code == 410 and "secret" not in gone.text
            search = reader.get(f"/v1/chats/{chat}/search", params={"q": "plan"}, headers=bob)
            assert search.status_code == 410
        close_reader()

        # Every process forgets the keys; no wrapped DEK of the chat survives anywhere.
        with pytest.raises(KeyDestroyed):
            keys.key(chat, 1)
        # It forgets on the Redis broadcast, which a loaded machine may deliver seconds late;
        # without it, `other` would serve its in-memory copy for the whole key TTL (300 s).
        assert life_settings.keys.ttl_seconds > 120
        deadline = time.monotonic() + 60
        while True:
            try:
                other.key(chat, 2)
            except KeyDestroyed:
                break
            assert time.monotonic() < deadline, "another process still serves the DEK after 60 s"
            time.sleep(0.05)
        with database.connection() as conn:
            deks = conn.execute(
                "SELECT state, encrypted_dek FROM chat_deks WHERE chat_id = %s", (chat,)
            ).fetchall()
        assert deks and all(d["state"] == "destroyed" and d["encrypted_dek"] is None for d in deks)
        assert not [v for v in RedisKeyCache(life_settings.redis).scan_values() if str(chat) in v]
        assert store.get(chat, rows[0].message_id) is None
        assert index.count(chat) == 0

        actions = {e.action for e in keys.repo.audit_entries(chat)}
        assert {"dek_created", "dek_rotated", "dek_unwrapped", "chat_shredded"} <= actions
        shred = next(e for e in keys.repo.audit_entries(chat) if e.action == "chat_shredded")
        assert shred.actor == "operator" and "erasure" in shred.reason
    finally:
        keys.close()
        other.close()


def test_audit_trail_is_append_only(database: Database) -> None:
    repo = ChatKeyRepository(database)
    repo.audit("tester", "retention", None, None, "append-only check")
    with pytest.raises(psycopg.errors.RaiseException), database.connection() as conn:
        conn.execute("UPDATE key_audit SET reason = 'rewritten'")
    with pytest.raises(psycopg.errors.RaiseException), database.connection() as conn:
        conn.execute("DELETE FROM key_audit")
    for entry in repo.audit_entries(limit=1000):
        assert "vault:v" not in entry.reason  # no key material, wrapped or not


def test_master_key_rotation_rewraps_every_dek_and_old_versions_retire(
    settings: Settings, database: Database, kms: object, run_id: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sealstream.adapters.vault import TransitKms
    from sealstream.lifecycle import rewrap_all

    assert isinstance(kms, TransitKms)
    keys = service(settings, database, kms, "operator")
    tenant, key_name = f"rewrap-{run_id}", f"test-{run_id}-rewrap"
    keys.register_tenant(tenant, key_name)
    chats = [uuid.uuid4() for _ in range(10_000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: keys.create_chat(c, ("alice",), tenant), chats))
    sample = chats[::500]
    before = {c: keys.repo.dek(c, 1).encrypted_dek for c in sample}  # type: ignore[union-attr]
    plain = {c: keys.key(c, 1).material for c in sample}

    assert kms.rotate_master_key(key_name) == 2
    report = rewrap_all(keys, kms, key_name)
    print(
        f"rewrapped {report.rewrapped} DEKs in {report.seconds:.1f}s = {report.per_second:,.0f}/s"
    )
    assert report.examined == report.rewrapped == 10_000
    again = rewrap_all(keys, kms, key_name)  # idempotent: nothing left to do
    assert again.examined == 10_000 and again.rewrapped == 0

    kms.set_min_decryption_version(key_name, 2)
    fresh = service(settings, database, kms, "reader-process")  # nothing cached in memory
    try:
        for chat in sample:
            row = fresh.repo.dek(chat, 1)
            assert row is not None and row.encrypted_dek.startswith("vault:v2:")  # type: ignore[union-attr]
            assert fresh.key(chat, 1).material == plain[chat]  # still reads, via Redis or Postgres
            with pytest.raises(KmsError):  # the old wrapping is retired
                kms.unwrap(key_name, before[chat], kms_context(chat, 1))  # type: ignore[arg-type]
    finally:
        fresh.close()
        keys.close()


def test_deleted_message_is_hidden_and_unindexed(
    life_settings: Settings,
    database: Database,
    kms: object,
    stores: tuple[MessageStore, SearchIndex],
) -> None:
    from sealstream.lifecycle import delete_message

    store, index = stores
    keys = service(life_settings, database, kms, "operator")
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice",))
        key = keys.current_key(chat)
        ids = SnowflakeIds(11)
        kept, gone = ids.next_id(), ids.next_id()
        for message_id, text in ((kept, "keep this one"), (gone, "remove this one")):
            store.write_many([sealed_row(chat, message_id, "alice", key, text, datetime.now(UTC))])
            index.index_many(
                [text_message(index, message_id, chat, "default", "alice", datetime.now(UTC), text)]
            )
        index.refresh()
        assert delete_message(store, index, chat, gone).found
        index.refresh()
        history = [m.message_id for m in store.history(chat, ids.next_id(), 0, 10)]
        assert history == [kept]
        assert index.search_chat(chat, "remove") == [] and index.search_chat(chat, "keep") == [kept]
        row = store.get(chat, gone)
        assert row is not None and row.deleted_at is not None and row.envelope == b""
    finally:
        keys.close()


def test_batch_rotation_by_age_is_rate_limited_and_resumable(
    settings: Settings, database: Database, kms: object, run_id: str
) -> None:
    from datetime import timedelta

    from sealstream.lifecycle import rotate_due

    keys = service(settings, database, kms, "operator")
    try:
        tenant = f"rotate-{run_id}"
        keys.register_tenant(tenant, f"test-{run_id}-rotate")
        old = [uuid.uuid4() for _ in range(12)]
        for chat in old:
            keys.create_chat(chat, ("alice",), tenant)
        cutoff = datetime.now(UTC)
        time.sleep(0.05)
        young = uuid.uuid4()
        keys.create_chat(young, ("alice",), tenant)

        first = rotate_due(keys, cutoff, rate_per_second=40, reason="test", tenant_id=tenant)
        # Every chat of the tenant older than the cutoff got a new version, the young chat did
        # not, and 40/s was respected.
        assert first.rotated == len(old)
        assert all(keys.current_version(c) == 2 for c in old)
        assert keys.current_version(young) == 1
        assert first.seconds >= (first.rotated - 1) / 40 - 0.05
        # Resuming with the same cutoff finds nothing left to do.
        assert rotate_due(keys, cutoff, rate_per_second=1000, tenant_id=tenant).rotated == 0
        # By age: nothing of this tenant is older than an hour.
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        assert rotate_due(keys, hour_ago, tenant_id=tenant).rotated == 0
    finally:
        keys.close()


def test_retention_removes_expired_messages_and_unused_dek_versions(
    life_settings: Settings,
    database: Database,
    kms: object,
    stores: tuple[MessageStore, SearchIndex],
) -> None:
    from datetime import timedelta

    from sealstream.lifecycle import apply_retention

    store, index = stores
    keys = service(life_settings, database, kms, "retention-job")
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice",))
        now = datetime.now(UTC)
        # Backdate the chat and its first DEK version as if they were a month old.
        with database.connection() as conn:
            conn.execute(
                "UPDATE chats SET created_at = %s WHERE chat_id = %s",
                (now - timedelta(days=30), chat),
            )
        old_key = keys.current_key(chat)
        old_ids = SnowflakeIds(
            12, clock_ms=lambda: int((now - timedelta(days=20)).timestamp() * 1000)
        )
        old_rows = []
        for i in range(5):
            message_id = old_ids.next_id()
            old_rows.append(
                sealed_row(chat, message_id, "alice", old_key, f"old {i}", now - timedelta(days=20))
            )
        keys.rotate(chat, "test")
        with database.connection() as conn:
            conn.execute(
                "UPDATE chat_deks SET valid_to = %s WHERE chat_id = %s AND dek_version = 1",
                (now - timedelta(days=19), chat),
            )
        new_key = keys.current_key(chat)
        new_ids = SnowflakeIds(13)
        new_rows = []
        for i in range(3):
            message_id = new_ids.next_id()
            new_rows.append(sealed_row(chat, message_id, "alice", new_key, f"new {i}", now))
        store.write_many(old_rows + new_rows)
        index.index_many(
            [
                text_message(index, r.message_id, chat, "default", "alice", r.created_at, "word")
                for r in old_rows + new_rows
            ]
        )
        index.refresh()

        keys.repo.set_retention(7, chat_id=chat)
        report = apply_retention(keys, index, store)
        assert report.rows_deleted == 5 and report.index_documents_deleted == 5
        # The run covers every chat of the schema with a retention policy, other test modules'
        # too (in the full suite: an attachment test's chat whose files live in another
        # keyspace), so this chat's own versions are checked below, by state.
        assert report.dek_versions_destroyed >= 1
        remaining = [m.message_id for m in store.history(chat, new_ids.next_id(), 0, 100)]
        assert remaining == [r.message_id for r in reversed(new_rows)]
        index.refresh()
        assert sorted(index.search_chat(chat, "word")) == sorted(r.message_id for r in new_rows)
        states = {d.dek_version: d.state for d in keys.repo.deks(chat)}
        assert states == {1: "destroyed", 2: "active"}
        with pytest.raises(KeyDestroyed):
            keys.key(chat, 1)
        assert keys.key(chat, 2).material == new_key.material  # live messages still open
        assert apply_retention(keys, index, store).rows_deleted == 0  # idempotent
        assert any(e.action == "retention" for e in keys.repo.audit_entries(chat))
    finally:
        keys.close()
