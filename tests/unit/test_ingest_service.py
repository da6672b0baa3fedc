"""IngestService with small in-memory fakes of its ports (no servers)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from ingest.ports import ClaimInFlight
from ingest.service import MAX_BATCH, MAX_PARTICIPANTS, CachedChats, IngestService, NewMessage
from schemas.events import MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.postgres import ChatRow
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

    def publish(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        self.calls += 1
        if self.fail:
            raise StoreUnavailable("Kafka did not acknowledge")
        self.records += [(topic, k, v) for k, v in items]

    def decoded(self) -> list[MessageRecord]:
        return [MessageRecord.model_validate_json(v) for _, _, v in self.records]


class FakeIdempotency:
    """Pending claims until confirmed, like the Redis store."""

    def __init__(self) -> None:
        self.claims: dict[tuple[uuid.UUID, str, str], tuple[int, bool]] = {}
        self.fail_confirm = False

    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        key = (chat_id, sender, client_id)
        if key in self.claims:
            earlier, confirmed = self.claims[key]
            if not confirmed:
                raise ClaimInFlight(earlier)
            return earlier
        self.claims[key] = (message_id, False)
        return None

    def confirm(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        if self.fail_confirm:
            raise StoreUnavailable("Redis unavailable")
        if self.claims.get((chat_id, sender, client_id)) == (message_id, False):
            self.claims[(chat_id, sender, client_id)] = (message_id, True)

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        if self.claims.get((chat_id, sender, client_id)) == (message_id, False):
            del self.claims[(chat_id, sender, client_id)]


Parts = tuple[IngestService, FakeChats, FakePublisher, FakeIdempotency]


@pytest.fixture
def parts() -> Parts:
    chats, publisher, idem = FakeChats(), FakePublisher(), FakeIdempotency()
    service = IngestService(
        chats, publisher, SnowflakeIds(7), idem, topic="messages", clock=lambda: NOW
    )
    return service, chats, publisher, idem


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
    service, _, publisher, idem = parts
    chat = service.create_chat("alice", ["bob"]).chat_id
    first = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    again = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    assert again.message_id == first.message_id and again.duplicate and not first.duplicate
    assert len(publisher.records) == 1
    assert idem.claims[(chat, "alice", "c-1")] == (first.message_id, True)  # confirmed
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


def test_unacknowledged_publish_releases_claims_and_is_retriable(parts: Parts) -> None:
    service, _, publisher, idem = parts
    chat = service.create_chat("alice", []).chat_id
    publisher.fail = True
    with pytest.raises(StoreUnavailable) as caught:
        service.post("alice", chat, [NewMessage("hello", "c-9"), NewMessage("x", "c-10")])
    assert caught.value.retriable and not idem.claims and not publisher.records
    publisher.fail = False
    accepted = service.post("alice", chat, [NewMessage("hello", "c-9")])[0]
    assert not accepted.duplicate and len(publisher.records) == 1
    assert json.loads(publisher.records[0][2])["client_message_id"] == "c-9"


def test_a_retry_racing_the_original_gets_409_and_releases_its_own_claims(parts: Parts) -> None:
    service, _, publisher, idem = parts
    chat = service.create_chat("alice", []).chat_id
    idem.claims[(chat, "alice", "busy")] = (123, False)  # another request, not yet acked
    err = error_of(service.post, "alice", chat, [NewMessage("a", "k1"), NewMessage("b", "busy")])
    assert (err.status, err.code, err.field) == (409, "in_flight", "messages.1.client_message_id")
    assert list(idem.claims) == [(chat, "alice", "busy")] and not publisher.records


def test_an_unconfirmed_claim_still_answers_accepted(parts: Parts) -> None:
    service, _, publisher, idem = parts
    chat = service.create_chat("alice", []).chat_id
    idem.fail_confirm = True  # Redis fails after Kafka's ack: the message is durable anyway
    accepted = service.post("alice", chat, [NewMessage("hello", "c-1")])
    assert not accepted[0].duplicate and len(publisher.records) == 1


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
