"""Rotation by usage (messages per DEK version) and re-encryption of a chat's history, on the
real Postgres, Redis, OpenBao and Cassandra."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from encryptor.logic import encrypt_and_store
from reader.service import EnvelopeOpener
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache
from sealstream.adapters.vault import TransitKms
from sealstream.errors import KeyDestroyed
from sealstream.keys.service import KeyService
from sealstream.lifecycle import reencrypt_chat, rotate_due
from sealstream.settings import Settings
from sealstream.streaming import RawRecord
from tests.sealed_rows import sealed_row


@pytest.fixture(scope="module")
def policy_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_policy"}
            ),
            # A small message limit, and a short pointer TTL so retiring needs no long wait.
            "keys": settings.keys.model_copy(
                update={"rotate_max_messages": 50, "pointer_ttl_seconds": 1.0}
            ),
        }
    )


@pytest.fixture(scope="module")
def store(policy_settings: Settings) -> Iterator[MessageStore]:
    store = MessageStore(policy_settings.cassandra)
    store.connect()
    store.migrate()
    yield store
    store.drop_keyspace()
    store.close()


def service(
    settings: Settings, database: Database, kms: object, actor: str, start: bool = True
) -> KeyService:
    keys = KeyService(
        ChatKeyRepository(database),
        kms,  # type: ignore[arg-type]
        RedisKeyCache(settings.redis),
        settings.keys,
        settings.vault.default_key,
        actor=actor,
    )
    if start:
        keys.start()
    return keys


def records(chat: uuid.UUID, ids: SnowflakeIds, texts: list[str]) -> list[RawRecord]:
    out = []
    for offset, text in enumerate(texts):
        record = MessageRecord(
            message_id=ids.next_id(),
            chat_id=chat,
            sender_id="alice",
            text=text,
            sent_at=datetime.now(UTC),
        )
        out.append(RawRecord("t", 0, offset, record.key(), record.value()))
    return out


def test_encryptor_rotates_a_chat_when_its_dek_reached_the_message_limit(
    policy_settings: Settings, database: Database, kms: object, store: MessageStore
) -> None:
    worker_a = service(policy_settings, database, kms, "encryptor-a")
    worker_b = service(policy_settings, database, kms, "encryptor-b")
    try:
        chat = uuid.uuid4()
        worker_a.create_chat(chat, ("alice",))
        ids = SnowflakeIds(21)
        # 40 messages: under the limit of 50, no rotation.
        assert encrypt_and_store(records(chat, ids, ["m"] * 40), worker_a, store) == []
        assert worker_a.repo.active_dek(chat).dek_version == 1  # type: ignore[union-attr]
        # Two workers each seal 20 more with version 1 and report usage: the chat crosses the
        # limit and is rotated exactly once, whoever reports first.
        encrypt_and_store(records(chat, ids, ["m"] * 20), worker_a, store)
        encrypt_and_store(records(chat, ids, ["m"] * 20), worker_b, store)
        deks = worker_a.repo.deks(chat)
        assert [d.dek_version for d in deks] == [1, 2]
        assert deks[0].state == "retired" and deks[1].state == "active"
        reasons = [e.reason for e in worker_a.repo.audit_entries(chat) if e.action == "dek_rotated"]
        assert len(reasons) == 1 and "messages sealed with version 1 (max 50)" in reasons[0]
        # The next batch is sealed with the new version by both workers.
        time.sleep(0.2)  # the invalidation travels through Redis pub/sub
        encrypt_and_store(records(chat, ids, ["after"]), worker_b, store)
        assert worker_b.current_key(chat).version == 2
    finally:
        worker_a.close()
        worker_b.close()


def test_policy_rotation_waits_out_a_kms_outage_without_holding_the_batch(
    policy_settings: Settings, database: Database, kms: object
) -> None:
    keys = service(policy_settings, database, kms, "operator")
    dead_vault = policy_settings.vault.model_copy(update={"address": "http://127.0.0.1:9"})
    # An encryptor whose KMS has gone away (not started: start() registers the default tenant).
    dead_kms = TransitKms(dead_vault, retry_seconds=0.5)
    cut_off = service(policy_settings, database, dead_kms, "encryptor", start=False)
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice",))
        # The limit is reached while the KMS is unreachable: no exception for the caller (the
        # encryptor's batch is already written), the chat keeps its version and its count.
        assert cut_off.record_usage({(chat, 1): 60}) == []
        assert keys.repo.active_dek(chat).dek_version == 1  # type: ignore[union-attr]
        # The policy job rotates it once the KMS answers again.
        report = rotate_due(keys, datetime(2000, 1, 1, tzinfo=UTC), 0, max_messages=50)
        assert report.rotated >= 1
        assert keys.repo.active_dek(chat).dek_version == 2  # type: ignore[union-attr]
    finally:
        keys.close()
        cut_off.close()


def test_rotate_due_picks_chats_by_message_count(
    policy_settings: Settings, database: Database, kms: object
) -> None:
    keys = service(policy_settings, database, kms, "operator")
    try:
        busy, quiet = uuid.uuid4(), uuid.uuid4()
        tenant = f"policy-{uuid.uuid4().hex[:8]}"
        keys.register_tenant(tenant, policy_settings.vault.default_key)
        keys.create_chat(busy, ("alice",), tenant)
        keys.create_chat(quiet, ("alice",), tenant)
        # Count usage without the inline rotation (as if the limit was lowered afterwards).
        keys.repo.add_usage({(busy, 1): 30, (quiet, 1): 3})
        report = rotate_due(
            keys, datetime(2000, 1, 1, tzinfo=UTC), 0, tenant_id=tenant, max_messages=10
        )
        assert report.rotated == 1
        assert keys.repo.active_dek(busy).dek_version == 2  # type: ignore[union-attr]
        assert keys.repo.active_dek(quiet).dek_version == 1  # type: ignore[union-attr]
    finally:
        keys.close()


def _write(
    keys: KeyService, store: MessageStore, chat: uuid.UUID, ids: SnowflakeIds, n: int
) -> list[tuple[int, str]]:
    key = keys.current_key(chat)
    rows, sent = [], []
    for i in range(n):
        message_id = ids.next_id()
        text = f"v{key.version} message {i} {uuid.uuid4().hex}"
        sent.append((message_id, text))
        rows.append(sealed_row(chat, message_id, "alice", key, text, datetime.now(UTC)))
    store.write_many(rows)
    return sent


def _read_all(keys: KeyService, store: MessageStore, chat: uuid.UUID) -> dict[int, str]:
    """The chat's whole history as the reader reads it: every row opened with its own version
    by the reader's `EnvelopeOpener`, which reads a row again when the job re-sealed it and
    destroyed its old version between the fetch and the opening."""
    opener = EnvelopeOpener(keys, store.get)
    rows = store.history(chat, 2**63 - 1, int(time.time() * 1000) - 3_600_000, 10_000)
    return {row.message_id: opener.open(row).text for row in rows}


def test_history_reencryption_moves_every_row_to_the_newest_dek_and_retires_old_ones(
    policy_settings: Settings, database: Database, kms: object, store: MessageStore
) -> None:
    keys = service(policy_settings, database, kms, "operator")
    reader = service(policy_settings, database, kms, "reader")
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice",))
        ids = SnowflakeIds(22)
        sent = _write(keys, store, chat, ids, 150)
        keys.rotate(chat, "test")
        sent += _write(keys, store, chat, ids, 150)
        keys.rotate(chat, "test")
        sent += _write(keys, store, chat, ids, 50)
        deleted_id = sent[0][0]
        store.mark_deleted(chat, deleted_id, datetime.now(UTC))
        expected = {mid: text for mid, text in sent if mid != deleted_id}
        assert _read_all(reader, store, chat) == expected
        time.sleep(2.2)  # twice the (test) pointer TTL: versions 1 and 2 may now be retired

        # Readers keep reading the whole history while the job runs.
        done = threading.Event()
        reports = []

        def job() -> None:
            try:
                reports.append(reencrypt_chat(keys, store, chat, batch_size=25))
            finally:
                done.set()

        threading.Thread(target=job).start()
        reads = 0
        while not done.is_set() or reads == 0:
            assert _read_all(reader, store, chat) == expected
            reads += 1
        done.wait()
        report = reports[0]

        assert report.dek_version == 3
        assert report.rows_examined == len(expected)
        assert report.rows_reencrypted == 299  # 149 + 150 live rows of versions 1 and 2
        assert report.dek_versions_destroyed == [1, 2]
        versions = {row.dek_version for row in store.scan_chat(chat, 0, 2**41)}
        assert versions == {3}
        assert store.get(chat, deleted_id).deleted_at is not None  # type: ignore[union-attr]
        states = {d.dek_version: d.state for d in keys.repo.deks(chat)}
        assert states == {1: "destroyed", 2: "destroyed", 3: "active"}

        # A fresh process (empty caches) reads everything with version 3 only.
        fresh = service(policy_settings, database, kms, "fresh-reader")
        try:
            assert _read_all(fresh, store, chat) == expected
            with pytest.raises(KeyDestroyed):
                fresh.key(chat, 1)
        finally:
            fresh.close()

        # Idempotent: a second run changes nothing.
        again = reencrypt_chat(keys, store, chat)
        assert again.rows_reencrypted == 0 and again.dek_versions_destroyed == []
        audit = [e for e in keys.repo.audit_entries(chat) if e.action == "history_reencrypted"]
        assert len(audit) == 2 and "299 of 349 rows" in audit[1].reason
    finally:
        keys.close()
        reader.close()


def test_reencryption_keeps_versions_retired_too_recently(
    policy_settings: Settings, database: Database, kms: object, store: MessageStore
) -> None:
    keys = service(policy_settings, database, kms, "operator")
    try:
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice",))
        ids = SnowflakeIds(23)
        _write(keys, store, chat, ids, 10)
        keys.rotate(chat, "test")
        report = reencrypt_chat(keys, store, chat)  # right after the rotation
        assert report.rows_reencrypted == 10
        # An encryptor that missed the rotation could still be sealing with version 1.
        assert report.dek_versions_destroyed == []
        assert keys.repo.dek(chat, 1).state == "retired"  # type: ignore[union-attr]
    finally:
        keys.close()
