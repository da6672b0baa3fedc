"""IngestService with small in-memory fakes of its ports (no servers)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from ingest.service import MAX_BATCH, IngestService, NewMessage
from schemas.events import MAX_TEXT_BYTES, MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.postgres import ChatRow
from sealstream.errors import StoreUnavailable
from sealstream.http import ApiError


class FakeChats:
    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, ChatRow] = {}

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        return self.rows.get(chat_id)

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        now = datetime.now(UTC)
        row = ChatRow(chat_id, tenant_id or "default", participants, "active", now, now)
        self.rows[chat_id] = row
        return row


class FakePublisher:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.fail = False

    def publish(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        if self.fail:
            raise StoreUnavailable("Kafka did not acknowledge")
        self.records += [(topic, k, v) for k, v in items]


class FakeIdempotency:
    def __init__(self) -> None:
        self.claims: dict[tuple[uuid.UUID, str, str], int] = {}

    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        key = (chat_id, sender, client_id)
        if key in self.claims:
            return self.claims[key]
        self.claims[key] = message_id
        return None

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str) -> None:
        self.claims.pop((chat_id, sender, client_id), None)


@pytest.fixture
def parts() -> tuple[IngestService, FakeChats, FakePublisher, FakeIdempotency]:
    chats, publisher, idem = FakeChats(), FakePublisher(), FakeIdempotency()
    service = IngestService(chats, publisher, SnowflakeIds(1), idem, topic="messages")
    return service, chats, publisher, idem


def error_of(fn, *args) -> ApiError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as caught:
        fn(*args)
    return caught.value


def test_creator_is_participant_and_duplicates_collapse(parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", ["bob", "alice", "bob"])
    assert chat.participants == ("alice", "bob")


def test_post_publishes_records_keyed_by_chat_with_increasing_ids(parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", ["bob"]).chat_id
    accepted = service.post("bob", chat, [NewMessage("one"), NewMessage("two ✓")])
    assert [a.duplicate for a in accepted] == [False, False]
    assert accepted[0].message_id < accepted[1].message_id
    records = [MessageRecord.model_validate_json(v) for _, _, v in publisher.records]
    assert [(r.text, r.sender_id, r.chat_id) for r in records] == [
        ("one", "bob", chat),
        ("two ✓", "bob", chat),
    ]
    assert all(k == str(chat).encode() and t == "messages" for t, k, _ in publisher.records)


@pytest.mark.parametrize(
    ("user", "chat_known", "deleted", "status", "code"),
    [
        ("mallory", True, False, 403, "not_participant"),
        ("alice", False, False, 404, "unknown_chat"),
        ("alice", True, True, 410, "gone"),
    ],
)
def test_access_rules(
    parts, user: str, chat_known: bool, deleted: bool, status: int, code: str
) -> None:
    service, chats, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    if deleted:
        row = chats.rows[chat]
        chats.rows[chat] = ChatRow(
            row.chat_id, row.tenant_id, row.participants, "deleted", row.created_at, row.updated_at
        )
    target = chat if chat_known else uuid.uuid4()
    err = error_of(service.post, user, target, [NewMessage("hello")])
    assert (err.status, err.code) == (status, code) and not publisher.records


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("", "invalid_message", "non-blank"),
        ("  \t\n", "invalid_message", "non-blank"),
        ("x" * (MAX_TEXT_BYTES + 1), "message_too_large", str(MAX_TEXT_BYTES)),
        ("bad \ud800 surrogate", "invalid_message", "UTF-8"),
    ],
)
def test_invalid_text_names_field_and_limit_and_never_echoes(
    parts, text: str, code: str, needle: str
) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    err = error_of(service.post, "alice", chat, [NewMessage(text)])
    assert err.status == 422 and err.code == code and err.field == "text" and needle in err.message
    assert (
        "surrogate" not in err.message.replace("lone surrogate", "") and "xxxx" not in err.message
    )
    assert not publisher.records


def test_batch_limits_and_field_index_in_errors(parts) -> None:
    service, *_ = parts
    chat = service.create_chat("alice", []).chat_id
    assert error_of(service.post, "alice", chat, []).field == "messages"
    too_many = [NewMessage("m")] * (MAX_BATCH + 1)
    assert error_of(service.post, "alice", chat, too_many).field == "messages"
    err = error_of(service.post, "alice", chat, [NewMessage("ok"), NewMessage(" ")])
    assert err.field == "messages.1.text"


def test_retry_with_client_id_returns_same_id_and_publishes_once(parts) -> None:
    service, _, publisher, _ = parts
    chat = service.create_chat("alice", []).chat_id
    first = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    again = service.post("alice", chat, [NewMessage("hello", "c-1")])[0]
    assert again.message_id == first.message_id and again.duplicate and not first.duplicate
    assert len(publisher.records) == 1


def test_unacknowledged_publish_releases_claims_and_is_retriable(parts) -> None:
    service, _, publisher, idem = parts
    chat = service.create_chat("alice", []).chat_id
    publisher.fail = True
    with pytest.raises(StoreUnavailable) as caught:
        service.post("alice", chat, [NewMessage("hello", "c-9")])
    assert caught.value.retriable and not idem.claims
    publisher.fail = False
    accepted = service.post("alice", chat, [NewMessage("hello", "c-9")])[0]
    assert not accepted.duplicate and len(publisher.records) == 1
    assert json.loads(publisher.records[0][2])["client_message_id"] == "c-9"
