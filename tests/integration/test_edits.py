"""Edits and sender deletion through the workers' own logic on the real stack (issue 15).

Each change is a message-topic record handed to the encryptor's `store_batch` (real key service,
real Cassandra) and the indexer's `index_batch` (real OpenSearch), as the two workers would get
it; the outcome is read through the reader's HTTP API and the stores themselves: what a user
sees (text, revision, edited_at, search), what a replay or a forged record can no longer do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from encryptor.logic import STORED_ROW_TAMPERED, store_batch
from indexer.logic import index_batch
from reader.wiring import build
from schemas.changes import ChangeEvent
from schemas.events import MessageRecord
from schemas.ids import EPOCH_MS, SnowflakeIds, bucket_of, id_millis, id_time
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.auth import mint_token
from sealstream.keys.service import KeyService
from sealstream.lifecycle import reencrypt_chat
from sealstream.settings import Settings
from sealstream.streaming import RawRecord, Rejected
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_index, fresh_store, module_stores, text_message

WINDOW = 3600  # seconds: the edit window these tests run with


@pytest.fixture(scope="module")
def edit_settings(settings: Settings) -> Settings:
    return module_stores(settings, "edits")


@pytest.fixture(scope="module")
def store(edit_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(edit_settings) as store:
        yield store


@pytest.fixture(scope="module")
def index(edit_settings: Settings) -> Iterator[SearchIndex]:
    with fresh_index(edit_settings) as index:
        yield index


@pytest.fixture(scope="module")
def keys(edit_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(edit_settings.vault.default_key)
    with key_service(edit_settings, database) as service:
        yield service


@pytest.fixture(scope="module")
def client(
    edit_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[TestClient]:
    app, close = build(edit_settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


@pytest.fixture(scope="module")
def as_user(edit_settings: Settings) -> Callable[[str], dict[str, str]]:
    return lambda user: {"Authorization": f"Bearer {mint_token(edit_settings.auth, user)}"}


_IDS = SnowflakeIds(worker_id=911)


def _old_id(seconds_ago: int) -> int:
    """An id made `seconds_ago` seconds ago (worker 912: never equal to a `_IDS` id)."""
    ms = int(datetime.now(UTC).timestamp() * 1000) - seconds_ago * 1000 - EPOCH_MS
    return (ms << 22) | (912 << 12) | (uuid.uuid4().int & 0xFFF)


def raw(record: MessageRecord) -> RawRecord:
    return RawRecord("sealstream.messages.v1", 0, 0, record.key(), record.value())


def post(chat: uuid.UUID, sender: str, text: str, message_id: int | None = None) -> MessageRecord:
    return MessageRecord(
        message_id=message_id or _IDS.next_id(),
        chat_id=chat,
        sender_id=sender,
        text=text,
        sent_at=datetime.now(UTC),
    )


def edit(original: MessageRecord, text: str, sender: str | None = None) -> MessageRecord:
    return MessageRecord(
        kind="edit",
        message_id=original.message_id,
        event_id=_IDS.next_id(),
        chat_id=original.chat_id,
        sender_id=sender or original.sender_id,
        text=text,
        sent_at=datetime.now(UTC),
    )


def delete(original: MessageRecord, sender: str | None = None) -> MessageRecord:
    return MessageRecord(
        kind="delete",
        message_id=original.message_id,
        event_id=_IDS.next_id(),
        chat_id=original.chat_id,
        sender_id=sender or original.sender_id,
        sent_at=datetime.now(UTC),
    )


def run(
    keys: KeyService, store: MessageStore, index: SearchIndex, *records: MessageRecord
) -> tuple[list[Rejected], list[ChangeEvent]]:
    """One batch through both workers; the encryptor's dead letters and change events (the
    indexer dead-letters none of these)."""
    batch = [raw(r) for r in records]
    stored = store_batch(batch, keys, store, keys.repo, WINDOW)
    assert index_batch(batch, index, keys.repo, None, WINDOW) == []
    index.refresh()
    return stored.rejected, stored.changes


def read(client: TestClient, user: str, as_user: Any, chat: uuid.UUID, message_id: int) -> Any:
    return client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=as_user(user))


def found(client: TestClient, as_user: Any, chat: uuid.UUID, q: str) -> list[str]:
    answer = client.get(f"/v1/chats/{chat}/search", params={"q": q}, headers=as_user("bob"))
    assert answer.status_code == 200, answer.text
    return [m["message_id"] for m in answer.json()["messages"]]


# Absent words are checked in the index itself (`search_chat`): the reader drops a hit whose
# decrypted text lacks the words, so it would hide a document that still holds them.


@pytest.fixture
def chat(keys: KeyService) -> uuid.UUID:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob", "mallory"))
    return chat


def test_an_edit_shows_the_new_text_revision_and_time_and_search_follows(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "meet at the lighthouse")
    assert run(keys, store, index, original)[0] == []
    before = read(client, "bob", as_user, chat, original.message_id).json()
    assert (before["revision"], before["edited_at"]) == (1, None)

    change = edit(original, "meet at the harbour")
    rejected, events = run(keys, store, index, change)
    assert rejected == []
    body = read(client, "bob", as_user, chat, original.message_id).json()
    assert body["text"] == "meet at the harbour"
    assert body["revision"] == 2
    assert change.event_id is not None
    assert datetime.fromisoformat(body["edited_at"]) == id_time(change.event_id)
    assert found(client, as_user, chat, "harbour") == [str(original.message_id)]
    assert index.search_chat(chat, "lighthouse") == []

    [event] = events
    assert (event.kind, event.event_id, event.revision) == ("edit", change.event_id, 2)
    assert event.edited_at == id_time(change.event_id) and event.envelope is not None
    row = store.get(chat, original.message_id)
    assert (
        row is not None and row.envelope == event.envelope and row.last_event_id == event.event_id
    )

    # The same edit again (a batch retried after a crash before its events went out): nothing
    # changes, and its change event is published again with the same envelope.
    rejected, again = run(keys, store, index, change)
    assert rejected == [] and again == [event]


def test_a_replayed_older_edit_or_post_never_wins(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "version apple")
    first = edit(original, "version banana")
    second = edit(original, "version cherry")
    rejected, events = run(keys, store, index, original, first, second)
    assert rejected == []
    assert [(e.kind, e.revision) for e in events] == [("post", 1), ("edit", 2), ("edit", 3)]

    # Replays of the first edit, then of the post (each in its own batch, as after a reset of
    # the consumer group's offsets): skipped by both workers, no dead letter, no event.
    assert run(keys, store, index, first) == ([], [])
    rejected, events = run(keys, store, index, original)
    assert rejected == [] and [e.kind for e in events] == ["post"]  # a post's event: idempotent
    body = read(client, "bob", as_user, chat, original.message_id).json()
    assert (body["text"], body["revision"]) == ("version cherry", 3)
    assert found(client, as_user, chat, "cherry") == [str(original.message_id)]
    assert index.search_chat(chat, "banana") == []
    assert index.search_chat(chat, "apple") == []


def test_an_edit_by_another_sender_is_dead_lettered_and_changes_nothing(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "the real words")
    run(keys, store, index, original)
    forged = edit(original, "forged words", sender="mallory")
    rejected, events = run(keys, store, index, forged)
    assert [r.reason for r in rejected] == ["sender_id: not the sender of this message"]
    assert events == []
    assert read(client, "bob", as_user, chat, original.message_id).json()["text"] == (
        "the real words"
    )
    assert index.search_chat(chat, "forged") == []
    assert found(client, as_user, chat, "real") == [str(original.message_id)]

    # Not a deletion either.
    rejected, _ = run(keys, store, index, delete(original, sender="mallory"))
    assert [r.reason for r in rejected] == ["sender_id: not the sender of this message"]
    assert read(client, "bob", as_user, chat, original.message_id).status_code == 200
    assert found(client, as_user, chat, "real") == [str(original.message_id)]


def test_an_edit_of_an_unknown_message_is_dead_lettered(
    keys: KeyService, store: MessageStore, index: SearchIndex, chat
) -> None:
    rejected, events = run(keys, store, index, edit(post(chat, "alice", "never sent"), "x"))
    assert [r.reason for r in rejected] == ["message_id: no such message in this chat"]
    assert events == []


def test_an_edit_past_the_window_is_dead_lettered(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "written long ago", message_id=_old_id(WINDOW + 60))
    assert run(keys, store, index, original)[0] == []
    rejected, events = run(keys, store, index, edit(original, "rewritten history"))
    assert len(rejected) == 1 and rejected[0].reason.startswith("event_id: made more than")
    assert events == []
    assert read(client, "bob", as_user, chat, original.message_id).json()["revision"] == 1
    assert index.search_chat(chat, "rewritten") == []


def test_an_edit_made_in_the_future_is_dead_lettered(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """An edit id ten minutes ahead (a producer's clock, or a forged id) would make every later
    edit look stale: refused by the encryptor, ignored by the indexer."""
    original = post(chat, "alice", "present tense")
    run(keys, store, index, original)
    ahead = edit(original, "future tense").model_copy(update={"event_id": _old_id(-600)})
    rejected, events = run(keys, store, index, ahead)
    assert len(rejected) == 1 and rejected[0].reason.startswith("event_id: made in the future")
    assert events == []
    assert read(client, "bob", as_user, chat, original.message_id).json()["revision"] == 1
    assert index.search_chat(chat, "future") == []
    # A later edit made now still applies.
    rejected, _ = run(keys, store, index, edit(original, "past tense"))
    assert rejected == [] and index.search_chat(chat, "past") == [original.message_id]


def test_an_edit_of_a_deleted_message_is_skipped(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "soon gone")
    removal = delete(original)
    late_edit = edit(original, "back from the dead")
    rejected, events = run(keys, store, index, original, removal, late_edit)
    assert rejected == []
    assert [e.kind for e in events] == ["post", "delete"]
    assert read(client, "bob", as_user, chat, original.message_id).status_code == 404
    assert index.search_chat(chat, "dead") == []


def test_a_sender_deletion_holds_against_replays(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "regrettable remark")
    run(keys, store, index, original)
    assert found(client, as_user, chat, "regrettable") == [str(original.message_id)]
    removal = delete(original)
    rejected, events = run(keys, store, index, removal)
    assert rejected == []
    [event] = events
    assert (event.kind, event.event_id, event.envelope) == ("delete", removal.event_id, None)
    assert removal.event_id is not None and event.deleted_at == id_time(removal.event_id)
    assert read(client, "bob", as_user, chat, original.message_id).status_code == 404
    assert index.search_chat(chat, "regrettable") == []
    row = store.get(chat, original.message_id)
    assert row is not None and row.deleted_at is not None and row.envelope == b""

    # The deletion again: re-published, not re-applied. The post again: stays deleted.
    assert run(keys, store, index, removal)[1] == [event]
    run(keys, store, index, original)
    assert read(client, "bob", as_user, chat, original.message_id).status_code == 404
    assert index.search_chat(chat, "regrettable") == []
    row = store.get(chat, original.message_id)
    assert row is not None and row.deleted_at is not None and row.envelope == b""


def test_an_older_revision_written_back_into_the_row_does_not_open(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    original = post(chat, "alice", "the first draft")
    run(keys, store, index, original)
    first_row = store.get(chat, original.message_id)
    assert first_row is not None
    run(keys, store, index, edit(original, "the final text"))
    assert read(client, "bob", as_user, chat, original.message_id).json()["revision"] == 2

    # An attacker with Cassandra access puts revision 1's envelope back (revision column left
    # at 2, as the edit wrote it): the reader refuses the row instead of showing the old text.
    store.overwrite_envelope(chat, original.message_id, first_row.envelope)
    answer = read(client, "bob", as_user, chat, original.message_id)
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "integrity_error"
    assert "first draft" not in answer.text


def test_post_and_edit_write_timestamps_order_by_id_time(
    keys: KeyService, store: MessageStore, index: SearchIndex, chat
) -> None:
    """The mechanism behind "a replayed post never wins": the post's cells carry its id's time,
    an edit's a strictly later one."""
    original = post(chat, "alice", "timestamps", message_id=_old_id(600))  # ten minutes ago
    run(keys, store, index, original)
    [(_, posted)] = store.rows_for_change({(chat, original.message_id)}).items()
    assert posted.envelope_written == id_millis(original.message_id) * 1000
    # The benchmarks' "when was it stored" is Cassandra's clock at the write, not the id's time.
    stored = store.written_at(chat, original.message_id)
    assert stored is not None and abs(stored - time.time()) < 60
    change = edit(original, "timestamps edited")
    run(keys, store, index, change)
    [(_, edited)] = store.rows_for_change({(chat, original.message_id)}).items()
    assert change.event_id is not None and edited.envelope_written is not None
    assert edited.envelope_written >= id_millis(change.event_id) * 1000
    assert edited.envelope_written > posted.envelope_written


def test_an_edited_document_is_replaced_by_a_rewrite_of_that_edit_but_never_an_older_one(
    keys: KeyService, store: MessageStore, index: SearchIndex, chat
) -> None:
    """What the blind re-index relies on for an edited message (sealstream/search_reindex.py):
    a rewrite at the row's `last_event_id` with `external_gte` replaces the document of that
    edit (re-keyed words), one at an older edit's id does not, and the tombstone still wins."""
    original = post(chat, "alice", "first words")
    change = edit(original, "second words")
    run(keys, store, index, original, change)
    assert change.event_id is not None
    document = index.current_documents([original.message_id])[original.message_id]
    assert document.version == change.event_id and document.sender_id == "alice"

    def rewrite(word: str, version: int) -> list[Any]:
        written = text_message(
            index, original.message_id, chat, "default", "alice", id_time(original.message_id), word
        )
        return index.index_many([replace(written, version=version)], version_type="external_gte")

    assert rewrite("rekeyed", change.event_id) == []
    index.refresh()
    assert index.search_chat(chat, "rekeyed") == [original.message_id]
    assert rewrite("older", change.event_id - 1) == []  # a conflict: done, nothing written
    index.refresh()
    assert index.search_chat(chat, "older") == []
    assert index.search_chat(chat, "rekeyed") == [original.message_id]
    run(keys, store, index, delete(original))
    assert rewrite("resurrected", change.event_id) == []
    index.refresh()
    assert index.search_chat(chat, "resurrected") == []


def test_a_post_replayed_after_a_key_rotation_leaves_a_row_that_opens(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """The replay writes at the first write's timestamp, where Cassandra keeps the greater value
    of each cell: envelope and DEK version must still come from one write (both the greater)."""
    original = post(chat, "alice", "sealed twice")
    run(keys, store, index, original)
    first = store.get(chat, original.message_id)
    assert first is not None
    new_version = keys.rotate(chat, "test")
    assert keys.current_key(chat).version == new_version > first.dek_version
    run(keys, store, index, original)
    row = store.get(chat, original.message_id)
    assert row is not None and row.dek_version == new_version  # the replay's cells won the tie
    answer = read(client, "bob", as_user, chat, original.message_id)
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == "sealed twice"


def test_changes_of_a_message_past_its_chat_retention_are_skipped(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """Retention (and a deleted chat) applies to edits and deletions as to posts: skipped, not
    dead-lettered, nothing written (the row is the retention job's to delete)."""
    original = post(chat, "alice", "kept for a while", message_id=_old_id(2 * 86400))
    assert run(keys, store, index, original)[0] == []
    keys.repo.set_retention(1, chat_id=chat)
    rejected, events = run(
        keys, store, index, edit(original, "edited after expiry"), delete(original)
    )
    assert (rejected, events) == ([], [])
    row = store.get(chat, original.message_id)
    assert row is not None and row.revision == 1 and row.deleted_at is None
    assert index.search_chat(chat, "expiry") == []


class _ResealBetweenReadAndWrite:
    """The real store, with history re-encryption of one chat run after an edit's row has been
    read and before the edit is written: the race between the admin job and the encryptor."""

    def __init__(self, store: MessageStore, keys: KeyService, chat: uuid.UUID) -> None:
        self.store, self.keys, self.chat = store, keys, chat
        self.resealed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def rows_for_change(self, messages: Any) -> Any:
        rows = self.store.rows_for_change(messages)
        report = reencrypt_chat(self.keys, self.store, self.chat, retire=False)
        self.resealed += report.rows_reencrypted
        return rows

    def rows_resealed(self) -> int:
        return self.resealed


def test_an_edit_racing_history_reencryption_still_opens_with_its_text(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """History re-encryption's conditional write, made between the encryptor's read of an
    edit's row and its write, lands at Cassandra's clock, above the edit's (its id's time):
    before, its re-sealed revision 1 shadowed the edit's envelope while the revision column was
    the edit's, and the message answered 500 until a next edit. The encryptor now reads the
    edited rows back and writes such an edit again just above."""
    original = post(chat, "alice", "before the rotation")
    run(keys, store, index, original)
    keys.rotate(chat, "test: re-encryption racing an edit")
    change = edit(original, "after the rotation")  # made (its id) before the job runs
    racing = _ResealBetweenReadAndWrite(store, keys, chat)
    time.sleep(0.01)  # the job's write lands after the edit's id time, as it would in Kafka lag
    stored = store_batch([raw(change)], keys, racing, keys.repo, WINDOW)
    assert stored.rejected == [] and racing.rows_resealed() == 1
    answer = read(client, "bob", as_user, chat, original.message_id)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["text"], answer.json()["revision"]) == ("after the rotation", 2)


def test_an_edit_never_launders_a_row_whose_sender_was_rewritten(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """An attacker with write access to Cassandra moves alice's message to mallory (the
    `sender_id` column): the reader refuses the row. mallory then edits "her" message through
    the gateway, which finds her the row's sender: the encryptor must not seal a new revision
    bound to the forged sender (it would open, as mallory's, at alice's place in the history)."""
    original = post(chat, "alice", "said by alice")
    run(keys, store, index, original)
    store.session.execute(
        f"UPDATE {store.keyspace}.messages SET sender_id = 'mallory'"
        " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
        (chat, bucket_of(original.message_id), original.message_id),
    )
    assert read(client, "bob", as_user, chat, original.message_id).status_code == 500

    batch = [raw(edit(original, "said by mallory", sender="mallory"))]
    stored = store_batch(batch, keys, store, keys.repo, WINDOW)
    assert [r.reason for r in stored.rejected] == [STORED_ROW_TAMPERED]
    assert stored.changes == []
    answer = read(client, "bob", as_user, chat, original.message_id)
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "integrity_error"
    assert "mallory" not in answer.text


def test_a_row_holding_only_a_deletion_marker_reads_as_not_found(
    client: TestClient, keys: KeyService, store: MessageStore, as_user, chat
) -> None:
    """A deletion marker without the message's columns (the shape `rows_for_change` already
    treats as "no message": a marker written before the post, or the other cells removed by
    someone with Cassandra access) is no message for `get` either: the reader answers 404, not
    an unhandled 500 (and the gateway's edit check, which uses `get`, finds no message)."""
    message_id = _IDS.next_id()
    store.mark_deleted(chat, message_id, datetime.now(UTC))
    assert store.rows_for_change({(chat, message_id)}) == {}
    assert store.get(chat, message_id) is None
    answer = read(client, "bob", as_user, chat, message_id)
    assert answer.status_code == 404, answer.text


def test_reencryption_never_counts_a_row_it_did_not_change(
    client: TestClient, keys: KeyService, store: MessageStore, index: SearchIndex, as_user, chat
) -> None:
    """A post whose id is ahead of Cassandra's clock (a producer's clock ten minutes fast) is
    written at that id's time: history re-encryption's conditional write (Cassandra's clock)
    lands below it. The job must not count such a row as re-sealed, since `left == 0` is what
    lets it destroy the old DEK version the row still needs."""
    ahead = post(chat, "alice", "from a fast clock", message_id=_old_id(-600))
    assert run(keys, store, index, ahead)[0] == []
    old_version = keys.current_key(chat).version
    new_version = keys.rotate(chat, "test: re-encrypt a row written ahead")
    report = reencrypt_chat(keys, store, chat, retire=False)
    row = store.get(chat, ahead.message_id)
    assert row is not None
    resealed = row.dek_version == new_version
    assert report.rows_reencrypted == (1 if resealed else 0), (row.dek_version, old_version)
    answer = read(client, "bob", as_user, chat, ahead.message_id)
    assert answer.status_code == 200 and answer.json()["text"] == "from a fast clock"
