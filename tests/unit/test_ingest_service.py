"""IngestService with small in-memory fakes of its ports (no servers)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ingest.ports import Claim, ClaimConflict, Granted
from ingest.service import (
    MAX_BATCH,
    MAX_PARTICIPANTS,
    Accepted,
    CachedChats,
    Change,
    IngestService,
    NewMessage,
)
from schemas.events import MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds, first_id_at, id_time
from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.postgres import ChatRow
from sealstream.crypto import TextFingerprints
from sealstream.errors import KeyNotFound, StoreUnavailable
from sealstream.http import ApiError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeChats:
    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, ChatRow] = {}
        self.gets = 0

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        self.gets += 1
        return self.rows.get(chat_id)

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        if tenant_id not in (None, "default", "acme"):
            raise KeyNotFound(f"unknown tenant '{tenant_id}'")
        if chat_id not in self.rows:  # like KeyService: an existing chat is returned as is
            self.rows[chat_id] = ChatRow(
                chat_id, tenant_id or "default", participants, "active", NOW, NOW
            )
        return self.rows[chat_id]


class FakePublisher:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.fail = False
        self.calls = 0

    async def publish(self, topic: str, records: Sequence[MessageRecord]) -> None:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable("Kafka did not acknowledge")
        self.records += [(topic, r.key(), r.value()) for r in records]

    def decoded(self) -> list[MessageRecord]:
        return [MessageRecord.model_validate_json(v) for _, _, v in self.records]


class FakeClaims:
    """Durable claims with fingerprints, like the Postgres store."""

    def __init__(self) -> None:
        self.rows: dict[tuple[uuid.UUID, str, str], tuple[int, bytes, datetime, bool]] = {}
        self.fail_acknowledge = False

    def claim(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Claim]) -> list[Granted]:
        granted, added = [], {}
        for index, c in enumerate(claims):
            row = self.rows.get((chat_id, sender, c.client_id))
            if row is None:
                added[(chat_id, sender, c.client_id)] = (
                    c.message_id,
                    c.fingerprint,
                    c.sent_at,
                    False,
                )
                granted.append(Granted(c.client_id, c.message_id, c.sent_at))
            elif row[1] != c.fingerprint:
                raise ClaimConflict(index)  # nothing of this call is kept
            else:
                granted.append(
                    Granted(c.client_id, row[0], row[2], earlier=True, acknowledged=row[3])
                )
        self.rows |= added
        return granted

    def acknowledge(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Granted]) -> None:
        if self.fail_acknowledge:
            raise StoreUnavailable("Postgres unavailable")
        for c in claims:
            message_id, fingerprint, sent_at, _ = self.rows[(chat_id, sender, c.client_id)]
            self.rows[(chat_id, sender, c.client_id)] = (message_id, fingerprint, sent_at, True)


class Sync:
    """The service with `post` run to completion: these tests are synchronous."""

    def __init__(self, service: IngestService) -> None:
        self.service = service

    def post(self, *args: Any, **kwargs: Any) -> list[Accepted]:
        return asyncio.run(self.service.post(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)


Parts = tuple[Sync, FakeChats, FakePublisher, FakeClaims]


@pytest.fixture
def parts() -> Parts:
    chats, publisher, claims = FakeChats(), FakePublisher(), FakeClaims()
    service = IngestService(
        chats,
        publisher,
        SnowflakeIds(7),
        claims,
        TextFingerprints(b"unit-test fingerprint secret"),
        topic="messages",
        clock=lambda: NOW,
    )
    return Sync(service), chats, publisher, claims


def error_of(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fn(*args, **kwargs)
    return caught.value


def counted(kind: str) -> float:
    return REGISTRY.get_sample_value("sealstream_ingest_messages_total", {"kind": kind}) or 0.0


# --- chats -------------------------------------------------------------------------------------


def test_creator_is_participant_and_duplicates_collapse(parts: Parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", ["bob", "alice", "bob"])
    assert chat.participants == ("alice", "bob") and chat.tenant_id == "default"
    assert service.create_chat("carol", []).participants == ("carol",)


@pytest.mark.parametrize(
    ("participants", "tenant", "field"),
    [
        (["bob", "x" * 129], None, "participants.1"),
        (["  "], None, "participants.0"),
        (["bob", "bad\ud800"], None, "participants.1"),
        (["nul\x00"], None, "participants.0"),
        ([f"u{i}" for i in range(MAX_PARTICIPANTS)], None, "participants"),  # + creator = 1001
        (["bob"], "t" * 129, "tenant_id"),
    ],
)
def test_create_chat_rejects_bad_participants(
    parts: Parts, participants: list[str], tenant: str | None, field: str
) -> None:
    service, chats, *_ = parts
    err = error_of(service.create_chat, "alice", participants, tenant)
    assert (err.status, err.field) == (422, field) and not chats.rows
    assert "\ud800" not in err.message and "x" * 129 not in err.message


def test_create_chat_limits_include_the_creator(parts: Parts) -> None:
    service, *_ = parts
    others = [f"u{i}" for i in range(MAX_PARTICIPANTS - 1)]
    assert len(service.create_chat("alice", others).participants) == MAX_PARTICIPANTS


def test_unknown_tenant_is_a_422_on_the_tenant_field(parts: Parts) -> None:
    service, *_ = parts
    err = error_of(service.create_chat, "alice", ["bob"], "nope")
    assert (err.status, err.code, err.field) == (422, "unknown_tenant", "tenant_id")
    assert service.create_chat("alice", ["bob"], "acme").tenant_id == "acme"


def test_a_taken_chat_id_is_409_and_reveals_nothing(parts: Parts) -> None:
    service, *_ = parts
    chat_id = uuid.uuid4()
    first = service.create_chat("alice", ["bob"], chat_id=chat_id)
    # A safe retry of the same creation returns the chat again.
    assert service.create_chat("alice", ["bob"], chat_id=chat_id) == first
    for user, others in [("mallory", ["alice"]), ("alice", ["bob", "eve"]), ("bob", [])]:
        err = error_of(service.create_chat, user, others, None, chat_id)
        assert (err.status, err.code, err.field) == (409, "chat_exists", "chat_id")
        assert "bob" not in err.message and "alice" not in err.message


# --- posting -----------------------------------------------------------------------------------


def test_post_publishes_complete_records_keyed_by_chat(parts: Parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", ["bob"], "acme").chat_id
    accepted = service.post("bob", chat, [NewMessage("one"), NewMessage("two ✓", "c-2")])
    assert [(a.duplicate, a.client_message_id) for a in accepted] == [(False, None), (False, "c-2")]
    assert all(t == "messages" and k == str(chat).encode() for t, k, _ in publisher.records)
    records = publisher.decoded()
    assert [r.message_id for r in records] == [a.message_id for a in accepted]
    assert [(r.text, r.client_message_id) for r in records] == [("one", None), ("two ✓", "c-2")]
    for record in records:
        assert (record.chat_id, record.tenant_id, record.sender_id) == (chat, "acme", "bob")
        assert record.sent_at == NOW and record.schema_version == 1
        assert (record.message_id >> 12) & 0x3FF == 7  # the gateway's worker id


def test_ids_increase_across_and_within_requests(parts: Parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", []).chat_id
    ids = [a.message_id for _ in range(50) for a in service.post("alice", chat, [NewMessage("m")])]
    ids += [a.message_id for a in service.post("alice", chat, [NewMessage("m")] * 100)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("user", "chat_known", "deleted", "status", "code"),
    [
        ("mallory", True, False, 403, "not_participant"),
        ("alice", False, False, 404, "unknown_chat"),
        ("alice", True, True, 410, "gone"),
    ],
)
def test_access_rules(
    parts: Parts, user: str, chat_known: bool, deleted: bool, status: int, code: str
) -> None:
    service, chats, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    if deleted:
        chats.rows[chat] = replace(chats.rows[chat], state="deleted")
    target = chat if chat_known else uuid.uuid4()
    err = error_of(service.post, user, target, [NewMessage("hello")])
    assert (err.status, err.code) == (status, code) and not publisher.records


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("", "invalid_message", "non-blank"),
        ("  \t\n", "invalid_message", "non-blank"),
        ("x" * (MAX_TEXT_BYTES + 1), "message_too_large", f"the limit is {MAX_TEXT_BYTES}"),
        ("é" * (MAX_TEXT_BYTES // 2 + 1), "message_too_large", f"{MAX_TEXT_BYTES + 2} bytes"),
        ("bad \ud800 surrogate", "invalid_message", "not valid UTF-8"),
    ],
)
def test_invalid_text_names_field_and_limit_and_never_echoes(
    parts: Parts, text: str, code: str, needle: str
) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    err = error_of(service.post, "alice", chat, [NewMessage(text)])
    assert (err.status, err.code, err.field) == (422, code, "text") and needle in err.message
    assert "xxxx" not in err.message and "éé" not in err.message and "\ud800" not in err.message
    assert not publisher.records


def test_text_of_exactly_the_limit_is_accepted(parts: Parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    service.post("alice", chat, [NewMessage("€" * (MAX_TEXT_BYTES // 3) + "x")])  # 16384 bytes
    assert len(publisher.decoded()[0].text.encode()) == MAX_TEXT_BYTES


def test_client_message_id_is_checked(parts: Parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", []).chat_id
    err = error_of(service.post, "alice", chat, [NewMessage("hi", "k" * 129)])
    assert (err.status, err.field) == (422, "client_message_id")
    err = error_of(
        service.post, "alice", chat, [NewMessage("hi", "ok"), NewMessage("hi", "\ud800")]
    )
    assert err.field == "messages.1.client_message_id"


def test_batch_limits_and_field_index_in_errors(parts: Parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    assert error_of(service.post, "alice", chat, []).field == "messages"
    too_many = [NewMessage("m")] * (MAX_BATCH + 1)
    assert error_of(service.post, "alice", chat, too_many).field == "messages"
    err = error_of(service.post, "alice", chat, [NewMessage("ok"), NewMessage(" ")])
    assert err.field == "messages.1.text"
    err = error_of(service.post, "alice", chat, [NewMessage(" ")], batch=True)
    assert err.field == "messages.0.text"
    assert not publisher.records  # one bad message rejects the whole batch
    assert len(service.post("alice", chat, [NewMessage("m")] * MAX_BATCH)) == MAX_BATCH
    assert publisher.calls == 1  # a batch is one publish: all acknowledged before answering


def test_metrics_count_new_and_duplicate_messages(parts: Parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", []).chat_id
    new, duplicate = counted("new"), counted("duplicate")
    service.post("alice", chat, [NewMessage("a", "m-1"), NewMessage("b")])
    service.post("alice", chat, [NewMessage("a", "m-1")])
    assert (counted("new") - new, counted("duplicate") - duplicate) == (2, 1)


# --- idempotency -------------------------------------------------------------------------------


def test_retry_with_client_id_returns_same_id_and_publishes_once(parts: Parts) -> None:
    service, _, publisher, claims = parts
    chat = service.create_chat("alice", ["bob"]).chat_id
    first = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    again = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    assert again.message_id == first.message_id and again.duplicate and not first.duplicate
    assert len(publisher.records) == 1
    assert claims.rows[(chat, "alice", "c-1")][3] is True  # acknowledged
    # The same client id from another sender is another message.
    other = service.post("bob", chat, [NewMessage("hello", "c-1")])[0]
    assert not other.duplicate and other.message_id != first.message_id


def test_a_batch_retry_publishes_only_what_is_new(parts: Parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    first = service.post("alice", chat, [NewMessage("a", "k1"), NewMessage("b", "k2")])
    retry = service.post(
        "alice", chat, [NewMessage("a", "k1"), NewMessage("b", "k2"), NewMessage("c", "k3")]
    )
    assert [a.message_id for a in retry[:2]] == [a.message_id for a in first]
    assert [a.duplicate for a in retry] == [True, True, False]
    assert [r.text for r in publisher.decoded()] == ["a", "b", "c"]


def test_the_same_client_id_twice_in_one_batch_is_one_message(parts: Parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    accepted = service.post("alice", chat, [NewMessage("a", "k"), NewMessage("a", "k")])
    assert accepted[0].message_id == accepted[1].message_id
    assert [a.duplicate for a in accepted] == [False, True] and len(publisher.records) == 1
    err = error_of(service.post, "alice", chat, [NewMessage("a", "j"), NewMessage("b", "j")])
    assert (err.status, err.code, err.field) == (
        409,
        "idempotency_conflict",
        "messages.1.client_message_id",
    )


def test_an_unknown_outcome_keeps_the_claim_and_the_retry_republishes_the_same_record(
    parts: Parts,
) -> None:
    service, _, publisher, claims = parts
    chat = service.create_chat("alice", []).chat_id
    publisher.fail = True  # e.g. no acknowledgement within the deadline: maybe published
    with pytest.raises(StoreUnavailable) as caught:
        service.post("alice", chat, [NewMessage("hello", "c-9"), NewMessage("x", "c-10")])
    assert caught.value.retriable and len(claims.rows) == 2 and not publisher.records
    claimed = claims.rows[(chat, "alice", "c-9")][0]
    publisher.fail = False
    retry = service.post("alice", chat, [NewMessage("hello", "c-9")])[0]
    assert retry.message_id == claimed and not retry.duplicate  # published by this request
    [record] = publisher.decoded()
    assert (record.message_id, record.text, record.client_message_id) == (claimed, "hello", "c-9")
    assert record.sent_at == NOW  # the first request's record, byte for byte
    again = service.post("alice", chat, [NewMessage("hello", "c-9")])[0]
    assert again.message_id == claimed and again.duplicate and len(publisher.records) == 1


def test_the_same_client_id_with_another_text_is_a_conflict_and_claims_nothing(
    parts: Parts,
) -> None:
    service, _, publisher, claims = parts
    chat = service.create_chat("alice", []).chat_id
    service.post("alice", chat, [NewMessage("original", "busy")])
    err = error_of(service.post, "alice", chat, [NewMessage("changed", "busy")])
    assert (err.status, err.code, err.field) == (409, "idempotency_conflict", "client_message_id")
    assert "changed" not in err.message and "original" not in err.message
    err = error_of(
        service.post, "alice", chat, [NewMessage("a", "k1"), NewMessage("changed", "busy")]
    )
    assert err.field == "messages.1.client_message_id"
    assert (chat, "alice", "k1") not in claims.rows and len(publisher.records) == 1


def test_an_unacknowledged_claim_mark_still_answers_accepted(parts: Parts) -> None:
    service, _, publisher, claims = parts
    chat = service.create_chat("alice", []).chat_id
    claims.fail_acknowledge = True  # Postgres fails after Kafka's ack: the message is durable
    accepted = service.post("alice", chat, [NewMessage("hello", "c-1")])
    assert not accepted[0].duplicate and len(publisher.records) == 1


def test_text_fingerprints_are_keyed() -> None:
    one, other = TextFingerprints(b"secret number one!"), TextFingerprints(b"secret number two!")
    assert one.of("hi", "c") == one.of("hi", "c") and len(one.of("hi", "c")) == 32
    assert one.of("hi", "c") != one.of("hi ", "c") and one.of("hi", "c") != other.of("hi", "c")
    # Bound to the claim, unambiguously: equal texts of two claims do not show.
    assert one.of("hi", "c") != one.of("hi", "d") and one.of("ahi", "c") != one.of("hi", "ca")
    with pytest.raises(ValueError, match="16 bytes"):
        TextFingerprints(b"short")


# --- chat cache --------------------------------------------------------------------------------


def test_chat_cache_serves_repeats_but_not_unknown_chats() -> None:
    directory = FakeChats()
    chats = CachedChats(directory, ttl_seconds=60)
    chat = chats.create(uuid.uuid4(), ("alice",), None).chat_id
    assert chats.get(chat) is not None and chats.get(chat) is not None and directory.gets == 0
    unknown = uuid.uuid4()
    assert chats.get(unknown) is None
    directory.create(unknown, ("bob",), None)
    assert chats.get(unknown) is not None  # a new chat accepts posts at once


class ThreadRecordingIds(SnowflakeIds):
    """Ids that remember on which thread each was made."""

    def __init__(self) -> None:
        super().__init__(7)
        self.threads: list[int] = []

    def next_id(self) -> int:
        self.threads.append(threading.get_ident())
        return super().next_id()


def test_posts_served_from_the_chat_cache_keep_every_rule_without_a_worker_thread() -> None:
    directory, publisher, claims = FakeChats(), FakePublisher(), FakeClaims()
    chats = CachedChats(directory, ttl_seconds=60)
    ids = ThreadRecordingIds()
    fingerprints = TextFingerprints(b"unit-test fingerprint secret")
    service = Sync(
        IngestService(chats, publisher, ids, claims, fingerprints, topic="m", clock=lambda: NOW)
    )
    chat = service.create_chat("alice", ["bob"]).chat_id  # cached by its creation
    gets = directory.gets
    [accepted] = service.post("bob", chat, [NewMessage("from the cache")])
    assert not accepted.duplicate and publisher.decoded()[0].sender_id == "bob"
    # No Postgres work: served by the cache, the id made on the event loop's own thread.
    assert directory.gets == gets and ids.threads == [threading.get_ident()]
    assert (error_of(service.post, "mallory", chat, [NewMessage("x")]).status) == 403
    assert error_of(service.post, "bob", chat, [NewMessage(" ")]).code == "invalid_message"
    # A client id is claimed in a worker thread, as before.
    service.post("bob", chat, [NewMessage("claimed", "c1")])
    assert ids.threads[-1] != threading.get_ident() and len(claims.rows) == 1
    # A deletion announced to this process: the next post reads the row again, then the cache.
    directory.rows[chat] = replace(directory.rows[chat], state="deleted")
    chats.forget(chat)
    for _ in range(2):
        err = error_of(service.post, "bob", chat, [NewMessage("after deletion")])
        assert (err.status, err.code) == (410, "gone")
    assert directory.gets == gets + 1 and len(publisher.records) == 2


# --- edits and deletions by the sender ---------------------------------------------------------


class FakeMessages:
    """The message store's rows, read only (`MessageLookup`)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[uuid.UUID, int], StoredMessage] = {}

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        return self.rows.get((chat_id, message_id))

    def add(self, chat_id: uuid.UUID, message_id: int, sender: str) -> int:
        self.rows[(chat_id, message_id)] = StoredMessage(
            chat_id, message_id, sender, 1, b"sealed", id_time(message_id)
        )
        return message_id


def changes(now: datetime, ids: SnowflakeIds | None = None) -> tuple[Any, FakeMessages, Any]:
    """A service with a one-hour edit window whose clock reads `now`."""
    chats, publisher, messages = FakeChats(), FakePublisher(), FakeMessages()
    service = IngestService(
        chats,
        publisher,
        ids or SnowflakeIds(7),
        FakeClaims(),
        TextFingerprints(b"unit-test fingerprint secret"),
        topic="messages",
        clock=lambda: now,
        messages=messages,
        edit_window=timedelta(hours=1),
    )
    return Sync(service), messages, publisher


def change(service: Sync, *args: Any) -> Change:
    return asyncio.run(service.service.change(*args))


def change_error(service: Sync, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        change(service, *args)
    return caught.value


def test_a_change_is_allowed_up_to_the_end_of_the_window_and_refused_after() -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # ids have milliseconds
    service, messages, publisher = changes(now)
    chat = service.create_chat("alice", ["bob"]).chat_id
    sent = int(now.timestamp() * 1000) - 3600 * 1000  # exactly one window ago
    at_edge = messages.add(chat, first_id_at(sent), "alice")
    past = messages.add(chat, first_id_at(sent - 1), "alice")  # one millisecond more

    done = change(service, "alice", chat, at_edge, "new text")
    assert done.kind == "edit" and done.message_id == at_edge and done.event_id > at_edge
    err = change_error(service, "alice", chat, past)
    assert (err.status, err.code, err.field) == (422, "edit_window_passed", "message_id")
    assert "for 3600 s" in err.message and "3601 s ago" in err.message
    [record] = publisher.decoded()
    assert (record.kind, record.event_id, record.text) == ("edit", done.event_id, "new text")


def test_a_change_is_checked_in_order_chat_row_sender_deletion() -> None:
    now = datetime.now(UTC)
    service, messages, publisher = changes(now)
    chat = service.create_chat("alice", ["bob"]).chat_id
    mine = messages.add(chat, SnowflakeIds(3).next_id(), "alice")
    # Someone else's deleted message: "not yours" comes before "deleted".
    messages.rows[(chat, mine)] = replace(messages.rows[(chat, mine)], deleted_at=now)
    assert change_error(service, "bob", chat, mine).code == "not_sender"
    assert change_error(service, "alice", chat, mine).code == "message_deleted"
    assert change_error(service, "carol", chat, mine).code == "not_participant"
    assert change_error(service, "alice", chat, mine + 1).code == "message_not_found"
    # Invalid text is refused before anything is read.
    assert change_error(service, "carol", chat, mine, " ").field == "text"
    assert publisher.records == []


def test_a_change_is_a_retriable_error_without_a_store_or_with_a_clock_behind_the_message() -> None:
    service = Sync(
        IngestService(
            FakeChats(),
            FakePublisher(),
            SnowflakeIds(7),
            FakeClaims(),
            TextFingerprints(b"unit-test fingerprint secret"),
            topic="m",
        )
    )
    chat = service.create_chat("alice", []).chat_id
    with pytest.raises(StoreUnavailable):
        change(service, "alice", chat, SnowflakeIds(3).next_id())

    now = datetime.now(UTC)
    late_clock = SnowflakeIds(7, clock_ms=lambda: int(now.timestamp() * 1000) - 60_000)
    service, messages, publisher = changes(now, late_clock)
    chat = service.create_chat("alice", []).chat_id
    ahead = messages.add(chat, first_id_at(int(now.timestamp() * 1000)), "alice")
    with pytest.raises(StoreUnavailable):  # its event id would sort before the message
        change(service, "alice", chat, ahead)
    assert publisher.records == []
