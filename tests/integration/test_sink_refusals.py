"""One bad record never stops a stage: what a sink refuses for one item is reported for that item
(and dead-lettered by the stage), the rest is written. Real OpenSearch, Cassandra, OpenBao."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from encryptor.logic import encrypt_and_store
from indexer.logic import index_batch
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import IndexedMessage, SearchIndex
from sealstream.keys.service import KeyService
from sealstream.settings import Settings
from sealstream.streaming import RawRecord
from sealstream.wiring import key_service
from tests.search_terms import plain_terms


def raw(record: MessageRecord, offset: int, **replace: Any) -> RawRecord:
    value = json.loads(record.value())
    value.update(replace)
    return RawRecord("t", 0, offset, record.key(), json.dumps(value).encode())


def message(chat: uuid.UUID, ids: SnowflakeIds, text: str) -> MessageRecord:
    return MessageRecord(
        message_id=ids.next_id(),
        chat_id=chat,
        sender_id="alice",
        text=text,
        sent_at=datetime.now(UTC),
    )


# --- OpenSearch ----------------------------------------------------------------------------------


def test_index_refuses_one_document_and_indexes_the_others(search_index: SearchIndex) -> None:
    chat = uuid.uuid4()
    now = datetime.now(UTC)
    far_east = datetime.now(timezone(timedelta(hours=20)))  # Python takes it, Java does not
    refused = search_index.index_many(
        [
            IndexedMessage(201, chat, "default", "alice", now, plain_terms("first of three")),
            IndexedMessage(
                202, chat, "default", "alice", far_east, plain_terms("secret words here")
            ),
            IndexedMessage(203, chat, "default", "alice", now, plain_terms("third of three")),
        ]
    )
    assert [r.message_id for r in refused] == [202]
    assert "400" in refused[0].reason and "sent_at" in refused[0].reason
    assert "secret" not in refused[0].reason and "+20" not in refused[0].reason  # no values
    search_index.refresh()
    assert sorted(search_index.search_chat(chat, "three")) == [201, 203]


def test_indexer_dead_letters_what_no_sink_can_store_and_indexes_the_rest(
    search_index: SearchIndex,
) -> None:
    chat, ids = uuid.uuid4(), SnowflakeIds(61)
    records = [message(chat, ids, f"valid number {i} marmalade") for i in range(3)]
    raws = [raw(r, i) for i, r in enumerate(records)]
    raws[1] = raw(records[1], 1, sent_at="2026-01-01T12:00:00+20:00")

    rejected = index_batch(raws, search_index)

    assert [r.record.offset for r in rejected] == [1]
    assert "sent_at" in rejected[0].reason and "18:00" in rejected[0].reason
    search_index.refresh()
    found = search_index.search_chat(chat, "marmalade")
    assert sorted(found) == sorted([records[0].message_id, records[2].message_id])


# --- Cassandra -----------------------------------------------------------------------------------


def test_store_refuses_one_row_and_writes_the_others(message_store: MessageStore) -> None:
    chat, ids = uuid.uuid4(), SnowflakeIds(63)
    now = datetime.now(UTC).replace(microsecond=0)
    good = [StoredMessage(chat, ids.next_id(), "alice", 1, b"envelope", now) for _ in range(2)]
    # Larger than half a commit-log segment: a mutation Cassandra refuses whatever happens.
    # Over native_transport_max_message_size (8 MiB): Cassandra refuses it (InvalidRequest), and
    # with it the batch of its partition, whatever happens.
    huge = StoredMessage(chat, ids.next_id(), "alice", 1, b"\0" * (9 * 1024 * 1024), now)

    refused = message_store.write_many([good[0], huge, good[1]])

    assert [r.message_id for r in refused] == [huge.message_id]
    assert "refused" in refused[0].reason
    assert [message_store.get(chat, m.message_id) for m in good] == good
    assert message_store.get(chat, huge.message_id) is None


def test_store_takes_the_extreme_times_the_schema_accepts(message_store: MessageStore) -> None:
    chat, ids = uuid.uuid4(), SnowflakeIds(64)
    extremes = [datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)]
    rows = [StoredMessage(chat, ids.next_id(), "alice", 1, b"e", at) for at in extremes]
    assert message_store.write_many(rows) == []
    assert [message_store.get(chat, r.message_id) for r in rows] == rows


@pytest.fixture(scope="module")
def keys(smoke_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(smoke_settings.vault.default_key)  # the kms fixture deletes it at the end
    with key_service(smoke_settings, database) as service:
        yield service


def test_encryptor_dead_letters_times_no_sink_can_store_and_writes_the_rest(
    keys: KeyService, message_store: MessageStore
) -> None:
    chat, ids = uuid.uuid4(), SnowflakeIds(65)
    keys.create_chat(chat, ("alice",))
    records = [message(chat, ids, f"message {i}") for i in range(10)]
    raws = [raw(r, i) for i, r in enumerate(records)]
    raws[7] = raw(records[7], 7, sent_at="2026-01-01T12:00:00-19:00")

    rejected = encrypt_and_store(raws, keys, message_store)

    assert [(r.record.offset, "sent_at" in r.reason) for r in rejected] == [(7, True)]
    stored = [message_store.get(chat, r.message_id) for r in records]
    assert [s is not None for s in stored] == [i != 7 for i in range(10)]
