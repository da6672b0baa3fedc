"""The adapters live delivery adds, each against its real server: the change-topic tail (every
reader sees every record published after it opened), participant changes audited and NOTIFYed in
one transaction and heard by the listener, and the resume read of Cassandra rows."""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from schemas.ids import BUCKET_MS, EPOCH_MS, first_id_at
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import Publisher, TopicTail, delete_topics, ensure_topics
from sealstream.adapters.postgres import MembershipListener
from sealstream.errors import MembershipRefused
from sealstream.keys.service import KeyService
from sealstream.settings import KafkaSettings, Settings
from tests.integration.conftest import fresh_store, module_stores
from tests.integration.test_keys import make_service


@pytest.fixture(scope="module")
def changes(settings: Settings) -> Iterator[KafkaSettings]:
    suffix = secrets.token_hex(3)
    cfg = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.tail{suffix}",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.tail{suffix}",
            "changes_topic": f"{settings.kafka.changes_topic}.tail{suffix}",
        }
    )
    ensure_topics(cfg)
    yield cfg
    delete_topics(cfg, [cfg.messages_topic, cfg.dead_letter_topic, cfg.changes_topic])


def _drain(tail: TopicTail, want: int) -> list[bytes]:
    """What the tail gets until `want` records came or 60 s passed (a budget of time, not of
    polls: on a loaded machine the first fetches after `open()` can be slow)."""
    got: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(got) < want and time.monotonic() < deadline:
        got += tail.poll(0.2)
    return got


def test_every_tail_sees_every_record_published_after_it_opened(changes: KafkaSettings) -> None:
    publisher = Publisher(changes, client_id="tail-test")
    try:
        publisher.publish(changes.changes_topic, [(b"early", b"before any tail")])
        tails = [TopicTail(changes, changes.changes_topic, client_id="t") for _ in range(2)]
        try:
            for tail in tails:
                assert tail.open() == changes.partitions
            records = [(str(uuid.uuid4()).encode(), f"change {i}".encode()) for i in range(40)]
            publisher.publish(changes.changes_topic, records)
            for tail in tails:
                # Every partition (the keys spread over them), nothing from before open().
                assert sorted(_drain(tail, 40)) == sorted(v for _, v in records)
        finally:
            for tail in tails:
                tail.close()
    finally:
        publisher.close()


@pytest.fixture
def keys(settings, database, kms) -> Iterator[KeyService]:
    service = make_service(settings, database, kms)
    yield service
    service.close()


def test_a_participant_change_is_audited_and_announced_once_committed(
    keys: KeyService, settings: Settings
) -> None:
    heard: list[uuid.UUID | None] = []
    arrived = threading.Event()

    def on_change(chat_id: uuid.UUID | None) -> None:
        heard.append(chat_id)
        arrived.set()

    listener = MembershipListener(settings.postgres, on_change)
    listener.start()
    try:
        assert listener.listening
        chat = uuid.uuid4()
        keys.create_chat(chat, ("alice", "bob"))
        result = keys.set_participant(chat, "bob", present=False)
        assert result is not None
        row, changed = result
        assert changed and row.participants == ("alice",)
        assert arrived.wait(30)
        assert heard == [chat]
        # Removing again changes nothing: no audit row, no announcement.
        arrived.clear()
        assert keys.set_participant(chat, "bob", present=False) == (row, False)
        added = keys.set_participant(chat, "carol", present=True)
        assert added is not None and added[0].participants == ("alice", "carol")
        assert arrived.wait(30)
        assert heard == [chat, chat]
        actions = [e.action for e in keys.repo.audit_entries(chat)]
        assert actions.count("participant_removed") == 1
        assert actions.count("participant_added") == 1
        assert keys.set_participant(uuid.uuid4(), "bob", present=True) is None
    finally:
        listener.close()


@pytest.fixture(scope="module")
def store(settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(module_stores(settings, "dlv")) as store:
        yield store


def test_rows_after_reads_every_row_above_an_id_oldest_first_across_buckets(
    store: MessageStore,
) -> None:
    chat = uuid.uuid4()
    start_ms = EPOCH_MS + 3 * BUCKET_MS - 60_000  # a minute before a bucket boundary
    ids = [first_id_at(start_ms + i * 30_000) for i in range(5)]  # two buckets
    rows = [
        StoredMessage(chat, i, "alice", 1, b"sealed", datetime.fromtimestamp(0, UTC)) for i in ids
    ]
    assert store.write_many(rows) == []
    store.mark_deleted(chat, ids[3], datetime.now(UTC))
    # A deletion of a message never stored leaves a bare marker (no created_at): not a row.
    store.mark_deleted(chat, ids[4] + 1, datetime.now(UTC))
    found = list(store.rows_after(chat, ids[0], start_ms + 10 * 60_000, page_size=2))
    assert [r.message_id for r in found] == ids[1:]
    assert [r.deleted_at is not None for r in found] == [False, False, True, False]
    assert found[0] == replace(rows[1], created_at=found[0].created_at)


def test_a_chat_never_loses_its_last_participant_nor_passes_the_limit(keys: KeyService) -> None:
    # Found by the gateway's fuzzer: the sole participant leaving reached the table's CHECK and
    # answered 500. Both bounds of the CHECK are refused by name, and nothing changes.
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice",))
    with pytest.raises(MembershipRefused, match="last participant"):
        keys.set_participant(chat, "alice", present=False)
    full = uuid.uuid4()
    keys.create_chat(full, tuple(f"user-{i}" for i in range(1000)))
    with pytest.raises(MembershipRefused, match="at most 1000"):
        keys.set_participant(full, "one-too-many", present=True)
    assert keys.repo.chat(chat).participants == ("alice",)  # type: ignore[union-attr]
    assert len(keys.repo.chat(full).participants) == 1000  # type: ignore[union-attr]
    actions = [e.action for e in keys.repo.audit_entries(chat)]
    assert "participant_removed" not in actions
