"""Deleted stays deleted, with the workers' process functions and the real stores: the orders of
events the e2e tests can only hit by chance are made to happen here, one step at a time.

The only stand-ins are of our own ports: a `ChatStates` answering what Postgres said before the
deletion (a batch that read the chat's state just before it was shredded), a `KeySource` holding
the DEK it had cached then, and a `WorkerProgress` that lets that batch write right after the
deletion's first pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from encryptor.logic import encrypt_and_store
from indexer.logic import index_batch
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds, first_id_at, id_time
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache
from sealstream.crypto import ChatKey
from sealstream.deletion_state import ChatState
from sealstream.keys.service import KeyService
from sealstream.lifecycle import delete_chat, delete_message, reencrypt_chat
from sealstream.settings import Settings
from sealstream.streaming import RawRecord
from tests.integration.conftest import text_message


@pytest.fixture(scope="module")
def race_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_race"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-race"}
            ),
        }
    )


@pytest.fixture(scope="module")
def stores(race_settings: Settings) -> Iterator[tuple[MessageStore, SearchIndex]]:
    store = MessageStore(race_settings.cassandra)
    store.connect()
    store.migrate()
    index = SearchIndex(race_settings.opensearch)
    index.migrate()
    index.migrate()  # an existing index: the `deleted` field is added in place, no error
    yield store, index
    store.drop_keyspace()
    store.close()
    index.drop()
    index.close()


@pytest.fixture
def keys(race_settings: Settings, database: Database, kms: object) -> Iterator[KeyService]:
    service = KeyService(
        ChatKeyRepository(database),
        kms,  # type: ignore[arg-type]
        RedisKeyCache(race_settings.redis),
        race_settings.keys,
        race_settings.vault.default_key,
        actor="deletion-test",
    )
    service.start()
    yield service
    service.close()


def records(chat: uuid.UUID, message_ids: list[int], word: str) -> list[RawRecord]:
    out = []
    for offset, message_id in enumerate(message_ids):
        record = MessageRecord(
            message_id=message_id,
            chat_id=chat,
            sender_id="alice",
            text=f"{word} {offset}",
            sent_at=datetime.now(UTC),
        )
        out.append(RawRecord("t", 0, offset, record.key(), record.value()))
    return out


def skipped_count(stage: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "sealstream_records_skipped_total", {"stage": stage, "reason": reason}
    )
    return value or 0.0


class StatesReadEarlier:
    """What Postgres answered before the chat was shredded (a batch that read just before it)."""

    def __init__(self, answer: dict[uuid.UUID, ChatState]) -> None:
        self.answer = answer

    def chat_states(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, ChatState]:
        return {c: s for c, s in self.answer.items() if c in chat_ids}


class CachedKey:
    """An encryptor's in-process DEK cache that has not heard of the shred yet."""

    def __init__(self, key: ChatKey) -> None:
        self.key = key

    def current_key(self, chat_id: uuid.UUID) -> ChatKey:
        return self.key

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]:
        return []


class WorkersWriteLate:
    """Both workers finish a batch they began before the shred, right after the first pass."""

    def __init__(self, batch: list[RawRecord], late_write: object) -> None:
        self.batch = batch
        self.late_write = late_write
        self.calls = 0

    def position(self) -> dict[int, int]:
        return {0: len(self.batch)}

    def passed(self, position: dict[int, int]) -> bool:
        self.calls += 1
        if self.calls == 1:
            self.late_write()  # type: ignore[operator]
            return False  # not yet committed: the sweep must wait for the next look
        return True


def test_a_batch_in_flight_during_the_shred_leaves_nothing(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    store, index = stores
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    ids = SnowflakeIds(31)
    first = records(chat, [ids.next_id() for _ in range(5)], "early")
    assert encrypt_and_store(first, keys, store, keys.repo) == []
    assert index_batch(first, index, keys.repo) == []
    index.refresh()

    in_flight = records(chat, [ids.next_id() for _ in range(7)], "inflight")
    before = StatesReadEarlier(keys.repo.chat_states([chat]))
    cached = CachedKey(keys.current_key(chat))

    def late_write() -> None:
        assert encrypt_and_store(in_flight, cached, store, before) == []
        assert index_batch(in_flight, index, before) == []
        index.refresh()

    workers = WorkersWriteLate(in_flight, late_write)
    receipt = delete_chat(keys, index, store, chat, "race", workers, sweep_seconds=30)

    assert receipt.sweep_completed and workers.calls == 2
    index.refresh()
    assert index.count(chat) == 0 and index.search_chat(chat, "inflight") == []
    # The 5 documents of the first pass and the 7 written after it, removed by the sweep.
    assert receipt.index_documents_deleted == 12
    assert receipt.rows_deleted == 5
    # The late rows were written after the partitions' deletion, yet are not there: the
    # deletion's write timestamp is above theirs.
    now = int(datetime.now(UTC).timestamp() * 1000)
    assert list(store.scan_chat(chat, now - 3_600_000, now + 600_000)) == []
    for raw in in_flight:
        message_id = MessageRecord.model_validate_json(raw.value).message_id
        assert store.get(chat, message_id) is None

    # A replay after the shred: both workers skip the records, and nothing is dead-lettered
    # (the dead-letter topic would keep the deleted chat's text for days).
    skipped = skipped_count("encryptor", "chat_deleted")
    assert encrypt_and_store(first + in_flight, keys, store, keys.repo) == []
    assert index_batch(first + in_flight, index, keys.repo) == []
    assert skipped_count("encryptor", "chat_deleted") == skipped + 12
    index.refresh()
    assert index.count(chat) == 0
    assert list(store.scan_chat(chat, now - 3_600_000, now + 600_000)) == []


def test_a_deleted_message_survives_redelivery_and_reencryption(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    store, index = stores
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    ids = SnowflakeIds(32)
    batch = records(chat, [ids.next_id() for _ in range(3)], "redelivered")
    gone = MessageRecord.model_validate_json(batch[0].value).message_id
    assert encrypt_and_store(batch, keys, store, keys.repo) == []
    assert index_batch(batch, index, keys.repo) == []
    assert delete_message(store, index, chat, gone).found

    # The same batch again (a rebalance), in both workers.
    assert encrypt_and_store(batch, keys, store, keys.repo) == []
    assert index_batch(batch, index, keys.repo) == []
    index.refresh()
    row = store.get(chat, gone)
    assert row is not None and row.deleted_at is not None and row.envelope == b""
    assert gone not in index.search_chat(chat, "redelivered")
    assert len(index.search_chat(chat, "redelivered")) == 2
    assert index.count(chat) == 2  # the tombstone is not a message document

    # Re-encryption to a new DEK version leaves the deleted row deleted (its conditional write
    # sees deleted_at) and re-seals the two others.
    keys.rotate(chat, "test")
    report = reencrypt_chat(keys, store, chat)
    assert report.rows_examined == 2 and report.rows_reencrypted == 2
    row = store.get(chat, gone)
    assert row is not None and row.deleted_at is not None and row.envelope == b""
    # The row's time is the id's time, not the producer's clock.
    kept = MessageRecord.model_validate_json(batch[1].value).message_id
    assert store.get(chat, kept).created_at == id_time(kept)  # type: ignore[union-attr]


def test_records_past_retention_are_not_written(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    store, index = stores
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    keys.repo.set_retention(1, chat_id=chat)
    now = datetime.now(UTC)
    old_id = first_id_at(int((now - timedelta(days=2)).timestamp() * 1000)) | (1000 << 12)
    new_id = first_id_at(int((now - timedelta(hours=2)).timestamp() * 1000)) | (1000 << 12)
    batch = records(chat, [old_id, new_id], "expired")
    assert encrypt_and_store(batch, keys, store, keys.repo) == []
    assert index_batch(batch, index, keys.repo) == []
    index.refresh()
    assert store.get(chat, old_id) is None and store.get(chat, new_id) is not None
    assert index.search_chat(chat, "expired") == [new_id]


class ShreddedWhileReading(ChatKeyRepository):
    """A worker's repository whose DEK read is answered just before the chat is shredded by
    another process (the admin API): the read returns the wrapped DEK, the shred then commits and
    clears Redis, and only after that does the worker go on with what it read."""

    def __init__(self, database: Database, shred: object) -> None:
        super().__init__(database)
        self.shred = shred

    def _then_shred(self) -> None:
        shred, self.shred = self.shred, None
        if shred is not None:
            shred()  # type: ignore[operator]

    def active_dek(self, chat_id: uuid.UUID):  # type: ignore[no-untyped-def]
        row = super().active_dek(chat_id)
        self._then_shred()
        return row

    def dek(self, chat_id: uuid.UUID, version: int):  # type: ignore[no-untyped-def]
        row = super().dek(chat_id, version)
        self._then_shred()
        return row


@pytest.mark.parametrize("lookup", ["current_key", "key"])
def test_no_wrapped_dek_of_a_shredded_chat_is_left_in_redis(
    keys: KeyService,
    race_settings: Settings,
    database: Database,
    kms: object,
    lookup: str,
) -> None:
    """A process (encryptor or reader) filling Redis from a DEK row it read just before the shred
    must not leave that wrapped DEK in Redis after the shred: docs/security.md promises that once
    a chat is deleted no wrapped DEK of it exists in Postgres or Redis."""
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    redis = RedisKeyCache(race_settings.redis)
    redis.forget_chat(chat)  # a cold cache: the worker reads the DEK from Postgres
    repo = ShreddedWhileReading(database, lambda: keys.delete_chat(chat, "race"))
    worker = KeyService(
        repo,
        kms,  # type: ignore[arg-type]
        RedisKeyCache(race_settings.redis),
        race_settings.keys,
        race_settings.vault.default_key,
        actor="racing-worker",
    )
    try:
        if lookup == "current_key":
            worker.current_key(chat)
        else:
            worker.key(chat, 1)
    except Exception:  # noqa: BLE001, S110 - refusing the key is fine; leaving it in Redis is not
        pass
    assert repo.shred is None, "the shred did not run in the window"
    assert keys.repo.chat(chat).state == "deleted"  # type: ignore[union-attr]
    assert redis.wrapped(chat, 1) is None, "a wrapped DEK of the shredded chat is in Redis"
    assert redis.current_version(chat) is None


def test_two_concurrent_chat_deletions_count_each_document_once(
    stores: tuple[MessageStore, SearchIndex],
) -> None:
    """Two deletions of one chat at once (two admins, a retried request): the receipts count what
    each really removed, so together they count every document exactly once. Each pass used to
    count every hit it asked to delete, including those the other had deleted meanwhile."""
    import threading

    _, index = stores
    chat = uuid.uuid4()
    ids = SnowflakeIds(33)
    total = 3000
    index.index_many(
        [
            text_message(index, ids.next_id(), chat, "t", "alice", datetime.now(UTC), f"twice {i}")
            for i in range(total)
        ]
    )
    index.refresh()
    assert index.count(chat) == total
    start = threading.Barrier(2)
    counts: list[int] = []
    errors: list[BaseException] = []

    def delete() -> None:
        start.wait()
        try:
            counts.append(index.delete_chat(chat))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=delete) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    index.refresh()
    assert index.count(chat) == 0
    assert sum(counts) == total, f"receipts counted {counts} for {total} documents"


class NothingInFlight:
    def position(self) -> dict[int, int]:
        return {}

    def passed(self, position: dict[int, int]) -> bool:
        return True


def test_records_without_a_key_never_bypass_the_deletion_check(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    """The deletion check reads chat states by record key. A direct producer's record without a
    key (valid JSON, the right chat_id) must not slip past it into a shredded or expired chat:
    it is dead-lettered, as a key that does not match chat_id is, by both stages."""
    store, index = stores
    shredded, expiring = uuid.uuid4(), uuid.uuid4()
    keys.create_chat(shredded, ("alice",))
    keys.create_chat(expiring, ("alice",))
    keys.repo.set_retention(1, chat_id=expiring)
    delete_chat(keys, index, store, shredded, "keyless", NothingInFlight(), sweep_seconds=30)
    old_id = first_id_at(int((datetime.now(UTC) - timedelta(days=2)).timestamp() * 1000))
    batch = [
        RawRecord(r.topic, r.partition, offset, None, r.value)
        for offset, r in enumerate(
            records(shredded, [SnowflakeIds(34).next_id()], "keyless")
            + records(expiring, [old_id | (7 << 12)], "keyless")
        )
    ]

    outcomes = [
        encrypt_and_store(batch, keys, store, keys.repo),
        index_batch(batch, index, keys.repo),
    ]
    index.refresh()
    assert index.search_chat(shredded, "keyless") == []
    assert index.search_chat(expiring, "keyless") == []
    assert store.get(expiring, old_id | (7 << 12)) is None
    for rejected in outcomes:
        assert [r.record.offset for r in rejected] == [0, 1]
        assert all("key" in r.reason and "keyless" not in r.reason for r in rejected)


def test_a_record_of_an_unknown_chat_is_dead_lettered_by_both_stages(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    """A direct producer's record for a chat that does not exist: the encryptor has no key and
    dead-letters it; the indexer must not index its words (no chat deletion or retention would
    ever remove them), it dead-letters it too."""
    store, index = stores
    known, unknown = uuid.uuid4(), uuid.uuid4()
    keys.create_chat(known, ("alice",))
    ids = SnowflakeIds(35)
    batch = records(unknown, [ids.next_id()], "orphan") + records(known, [ids.next_id()], "orphan")
    batch = [RawRecord(r.topic, r.partition, i, r.key, r.value) for i, r in enumerate(batch)]

    stored = encrypt_and_store(batch, keys, store, keys.repo)
    indexed = index_batch(batch, index, keys.repo)

    index.refresh()
    assert index.search_chat(unknown, "orphan") == []
    assert len(index.search_chat(known, "orphan")) == 1
    for rejected in (stored, indexed):
        assert [(r.record.offset, f"unknown chat {unknown}") for r in rejected] == [
            (0, r.reason) for r in rejected
        ]


def test_a_record_naming_another_tenant_is_dead_lettered_by_both_workers(
    keys: KeyService, stores: tuple[MessageStore, SearchIndex]
) -> None:
    """Only a direct producer can send a record whose tenant_id is not its chat's. Written as
    it came, the index would file the words under the wrong tenant (and with a blind index,
    under the wrong tenant's key, or none): both workers refuse it with the reason instead."""
    store, index = stores
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))  # tenant "default"
    ids = SnowflakeIds(33)
    good, forged = records(chat, [ids.next_id(), ids.next_id()], "tenantcheck")
    claim = MessageRecord.model_validate_json(forged.value).model_copy(
        update={"tenant_id": "other"}
    )
    forged = RawRecord("t", 0, 1, claim.key(), claim.value())

    for rejected in (
        encrypt_and_store([good, forged], keys, store, keys.repo),
        index_batch([good, forged], index, keys.repo),
    ):
        assert [(r.record.offset, r.reason) for r in rejected] == [
            (1, "tenant_id: not the tenant of this chat")
        ]
    index.refresh()
    good_id = MessageRecord.model_validate_json(good.value).message_id
    assert store.get(chat, good_id) is not None and store.get(chat, claim.message_id) is None
    assert index.searchable_ids([good_id, claim.message_id]) == {good_id}
