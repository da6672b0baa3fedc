"""ReaderService with in-memory fakes of its ports and the real envelope crypto."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from reader.service import (
    DEFAULT_CLOCK_SKEW_MS,
    CachedChatDirectory,
    EnvelopeOpener,
    ReaderService,
    decode_cursor,
    encode_cursor,
)
from schemas.ids import EPOCH_MS, SnowflakeIds, id_millis
from sealstream.adapters.cassandra import AttachmentRow, StoredMessage
from sealstream.adapters.object_store import ObjectNotFound, ObjectStoreError
from sealstream.adapters.opensearch import SearchHit, SearchHits, SearchRequest, WordMatch
from sealstream.adapters.postgres import ChatRow
from sealstream.crypto import ChatKey
from sealstream.errors import DecryptionError, KeyDestroyed, KeyNotFound, MessageGone
from sealstream.http import ApiError
from tests.fake_analysis import StandInAnalyzer, analyze_one
from tests.sealed_rows import sealed_row

NOW_MS = EPOCH_MS + 40 * 24 * 3600 * 1000  # 40 days after the id epoch: a few buckets in


class FakeChats:
    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, ChatRow] = {}
        self.lookups = 0
        self.member_lookups = 0

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        self.lookups += 1
        return self.rows.get(chat_id)

    def member_chats(
        self, user_id: str, limit: int, chat_ids: Collection[uuid.UUID] | None = None
    ) -> list[ChatRow]:
        """Same contract as ChatKeyRepository.member_chats: not deleted, newest first."""
        self.member_lookups += 1
        rows = [
            r
            for r in self.rows.values()
            if user_id in r.participants
            and r.state != "deleted"
            and (chat_ids is None or r.chat_id in chat_ids)
        ]
        rows.sort(key=lambda r: (-r.created_at.timestamp(), str(r.chat_id)))
        return rows[:limit]


class FakeMessages:
    """Same contract as MessageStore: history is newest first, exclusive, skips deleted rows."""

    def __init__(self) -> None:
        self.rows: dict[tuple[uuid.UUID, int], StoredMessage] = {}
        self.touched = 0
        self.history_calls: list[tuple[uuid.UUID, int, int, int]] = []

    def add(self, message: StoredMessage) -> None:
        self.rows[(message.chat_id, message.message_id)] = message

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        self.touched += 1
        return self.rows.get((chat_id, message_id))

    def history(
        self, chat_id: uuid.UUID, before_id: int, oldest_ms: int, limit: int
    ) -> Iterator[StoredMessage]:
        self.touched += 1
        self.history_calls.append((chat_id, before_id, oldest_ms, limit))
        rows = sorted(
            (
                m
                for (c, i), m in self.rows.items()
                if c == chat_id and i < before_id and m.deleted_at is None
            ),
            key=lambda m: m.message_id,
            reverse=True,
        )
        yield from rows[:limit]


class FakeKeys:
    def __init__(self) -> None:
        self.keys: dict[tuple[uuid.UUID, int], ChatKey] = {}
        self.destroyed: set[tuple[uuid.UUID, int]] = set()

    def new_version(self, chat_id: uuid.UUID) -> ChatKey:
        version = 1 + max((v for c, v in self.keys if c == chat_id), default=0)
        key = ChatKey(version=version, material=os.urandom(32))
        self.keys[(chat_id, version)] = key
        return key

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
        if (chat_id, version) in self.destroyed:
            raise KeyDestroyed("destroyed")
        try:
            return self.keys[(chat_id, version)]
        except KeyError:
            raise KeyNotFound("no such version") from None


class FakeSearch:
    """Same contract as SearchIndex.search_messages over documents of index terms (each word's
    `term` and `folded`, as the indexer stores them); `docs` may hold stale documents (rows the
    store no longer has), as the real index does until it catches up."""

    def __init__(self) -> None:
        self.docs: dict[int, tuple[uuid.UUID, str, set[str]]] = {}
        self.requests: list[SearchRequest] = []

    def add(self, chat_id: uuid.UUID, message_id: int, sender: str, text: str) -> None:
        terms = {form for t in analyze_one(text) for form in (t.term, t.folded)}
        self.docs[message_id] = (chat_id, sender, terms)

    def search_messages(self, request: SearchRequest) -> SearchHits:
        self.requests.append(request)

        def holds(terms: set[str], word: WordMatch) -> bool:
            return bool(terms & set(word.any_of)) or bool(
                word.prefix and any(t.startswith(word.prefix) for t in terms)
            )

        hits = []
        for message_id, (chat, sender, terms) in self.docs.items():
            if chat not in request.chat_ids or not all(holds(terms, w) for w in request.words):
                continue
            if request.sender_id is not None and sender != request.sender_id:
                continue
            if request.min_id is not None and message_id < request.min_id:
                continue
            if request.max_id is not None and message_id >= request.max_id:
                continue
            score = (
                float(sum(1 for w in request.words if terms & set(w.exact)))
                if request.sort == "relevance"
                else 0.0
            )
            hits.append(SearchHit(message_id, chat, score))
        hits.sort(key=lambda h: (-h.score, -h.message_id))
        if request.after is not None:
            after = (-request.after.score, -request.after.message_id)
            hits = [h for h in hits if (-h.score, -h.message_id) > after]
        page = hits[: request.size]
        return SearchHits(page, exhausted=len(page) < request.size)


class World:
    """A reader service over fakes, plus helpers to create chats and seal messages into them."""

    def __init__(self) -> None:
        self.chats = FakeChats()
        self.messages = FakeMessages()
        self.keys = FakeKeys()
        self.search = FakeSearch()
        self.clock = NOW_MS - 30 * 24 * 3600 * 1000  # messages are made over the past 30 days
        self.ids = SnowflakeIds(3, clock_ms=lambda: self.clock)
        self.service = ReaderService(
            self.chats,
            self.messages,
            self.keys,
            self.search,
            clock_ms=lambda: NOW_MS,
            analyzer=StandInAnalyzer(),
        )

    def chat(
        self, participants: tuple[str, ...] = ("alice", "bob"), state: str = "active"
    ) -> uuid.UUID:
        chat_id = uuid.uuid4()
        created = datetime.fromtimestamp(self.clock / 1000, UTC)
        self.chats.rows[chat_id] = ChatRow(
            chat_id, "default", participants, state, created, created
        )
        self.keys.new_version(chat_id)
        return chat_id

    def post(
        self,
        chat_id: uuid.UUID,
        text: str,
        sender: str = "alice",
        step_ms: int = 1,
        indexed: bool = True,
    ) -> int:
        """Seal `text` into the store and (like the indexer) its terms into the index."""
        self.clock += step_ms
        message_id = self.ids.next_id()
        version = max(v for c, v in self.keys.keys if c == chat_id)
        key = self.keys.keys[(chat_id, version)]
        self.messages.add(
            sealed_row(
                chat_id,
                message_id,
                sender,
                key,
                text,
                datetime.fromtimestamp(id_millis(message_id) / 1000, UTC),
            )
        )
        if indexed:
            self.search.add(chat_id, message_id, sender, text)
        return message_id

    def tamper(self, chat_id: uuid.UUID, message_id: int, position: int = -5) -> None:
        row = self.messages.rows[(chat_id, message_id)]
        envelope = bytearray(row.envelope)
        envelope[position] ^= 0x01
        self.messages.add(replace(row, envelope=bytes(envelope)))

    def delete(self, chat_id: uuid.UUID, message_id: int) -> None:
        row = self.messages.rows[(chat_id, message_id)]
        self.messages.add(replace(row, deleted_at=datetime.now(UTC)))


@pytest.fixture
def world() -> World:
    return World()


def api_error(excinfo: pytest.ExceptionInfo[ApiError]) -> tuple[int, str, str | None]:
    return excinfo.value.status, excinfo.value.code, excinfo.value.field


# --- single messages ---------------------------------------------------------------------------


def test_message_reads_back_exact_text_and_metadata(world: World) -> None:
    chat = world.chat()
    text = "café 世界 🚀 ✓ — ünïcödé"
    message_id = world.post(chat, text, sender="bob")
    read = world.service.message("alice", chat, message_id)
    assert read.text == text
    assert read.message_id == str(message_id)
    assert read.chat_id == chat and read.sender_id == "bob"
    assert read.sent_at == datetime.fromtimestamp(id_millis(message_id) / 1000, UTC)
    assert not hasattr(read, "dek_version")


@pytest.mark.parametrize(
    ("state", "participants", "user", "status", "code"),
    [
        ("active", ("alice", "bob"), "mallory", 403, "forbidden"),
        ("deleted", ("alice", "bob"), "alice", 410, "gone"),
        ("deleted", ("alice", "bob"), "mallory", 410, "gone"),
    ],
)
def test_access_rules_are_checked_before_any_message_is_touched(
    world: World, state: str, participants: tuple[str, ...], user: str, status: int, code: str
) -> None:
    chat = world.chat(participants, state)
    message_id = world.post(chat, "secret")
    world.messages.touched = 0
    calls: list[Callable[[], object]] = [
        lambda: world.service.message(user, chat, message_id),
        lambda: world.service.history(user, chat),
        lambda: world.service.search(user, chat, "secret"),
    ]
    for call in calls:
        with pytest.raises(ApiError) as excinfo:
            call()
        assert api_error(excinfo)[:2] == (status, code)
        assert "secret" not in excinfo.value.message
    assert world.messages.touched == 0
    assert world.search.requests == []


def test_unknown_chat_is_404(world: World) -> None:
    for call in (
        lambda: world.service.message("alice", uuid.uuid4(), 1),
        lambda: world.service.history("alice", uuid.uuid4()),
        lambda: world.service.search("alice", uuid.uuid4(), "x"),
    ):
        with pytest.raises(ApiError) as excinfo:
            call()
        assert api_error(excinfo)[:2] == (404, "not_found")
    assert world.messages.touched == 0


def test_unknown_or_deleted_message_is_404(world: World) -> None:
    chat = world.chat()
    message_id = world.post(chat, "soon gone")
    with pytest.raises(ApiError) as excinfo:
        world.service.message("alice", chat, message_id + 1)
    assert api_error(excinfo)[:2] == (404, "not_found")
    world.delete(chat, message_id)
    with pytest.raises(ApiError) as excinfo:
        world.service.message("alice", chat, message_id)
    assert api_error(excinfo)[:2] == (404, "not_found")


def test_message_of_another_chat_is_not_found(world: World) -> None:
    mine, theirs = world.chat(), world.chat(("carol", "dave"))
    foreign = world.post(theirs, "not for alice")
    with pytest.raises(ApiError) as excinfo:
        world.service.message("alice", mine, foreign)
    assert excinfo.value.status == 404


# --- history -----------------------------------------------------------------------------------


def page_through(world: World, chat: uuid.UUID, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = world.service.history("bob", chat, cursor, limit)
        pages.append([m.text for m in page.messages])
        cursor = page.next_cursor
        if cursor is None:
            return pages
        assert len(pages) < 10, "paging does not end"


def test_history_pages_newest_first_with_cursors(world: World) -> None:
    chat = world.chat()
    texts = [f"message {i} ✓" for i in range(120)]
    for text in texts:
        world.post(chat, text, step_ms=6 * 3600 * 1000)  # 120 x 6 h: spans three 10-day buckets
    pages = page_through(world, chat, 50)
    assert [len(p) for p in pages] == [50, 50, 20]
    assert [t for p in pages for t in p] == list(reversed(texts))
    # The store is asked for one row more than the page (to know whether more exist), down to
    # the chat's creation time minus the clock-skew allowance.
    created_ms = int(world.chats.rows[chat].created_at.timestamp() * 1000)
    assert {c[2] for c in world.messages.history_calls} == {created_ms - DEFAULT_CLOCK_SKEW_MS}
    assert {c[3] for c in world.messages.history_calls} == {51}


def test_history_exact_multiple_of_the_limit_has_no_empty_last_page(world: World) -> None:
    chat = world.chat()
    for i in range(100):
        world.post(chat, f"m{i}")
    assert [len(p) for p in page_through(world, chat, 50)] == [50, 50]


def test_history_of_an_empty_chat_and_default_limit(world: World) -> None:
    chat = world.chat()
    page = world.service.history("alice", chat)
    assert page.messages == [] and page.next_cursor is None
    for i in range(60):
        world.post(chat, f"m{i}")
    page = world.service.history("alice", chat)
    assert len(page.messages) == 50 and page.next_cursor is not None


def test_history_first_page_includes_messages_from_a_clock_slightly_ahead(world: World) -> None:
    chat = world.chat()
    world.clock = NOW_MS + 60_000  # the gateway's clock runs a minute ahead of the reader's
    world.post(chat, "from the future")
    assert [m.text for m in world.service.history("alice", chat).messages] == ["from the future"]


def test_history_skips_deleted_messages(world: World) -> None:
    chat = world.chat()
    ids = [world.post(chat, f"m{i}") for i in range(5)]
    world.delete(chat, ids[2])
    texts = [m.text for m in world.service.history("alice", chat).messages]
    assert texts == ["m4", "m3", "m1", "m0"]


def test_cursor_round_trip_and_opacity() -> None:
    for message_id in (1, 123456789, 2**63 - 1):
        cursor = encode_cursor(message_id)
        assert decode_cursor(cursor) == message_id
        assert str(message_id) not in cursor
        assert cursor.replace("-", "").replace("_", "").isalnum()


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        "not a cursor",
        "!!!!!!!!!!!!",
        "AQAAAAAAAAAA",  # id 0
        "AgAAAAAAAAAB",  # unknown cursor format version
        "AYAAAAAAAAAA",  # id >= 2**63
        "AQAAAAAAAAAB=",  # padded spelling
        "AQAAAAAAAA+/",  # standard-alphabet spelling of a valid cursor
        "AQAAAAAAAA.B",  # characters the lenient decoder would drop
        "AQAAAAAAAAAé",
        "x" * 64,
    ],
)
def test_bad_cursor_is_422_naming_the_field(world: World, cursor: str) -> None:
    chat = world.chat()
    with pytest.raises(ApiError) as excinfo:
        world.service.history("alice", chat, cursor)
    assert api_error(excinfo) == (422, "invalid_request", "query.before")


@pytest.mark.parametrize("limit", [0, -1, 101])
def test_history_limit_is_1_to_100(world: World, limit: int) -> None:
    with pytest.raises(ApiError) as excinfo:
        world.service.history("alice", world.chat(), None, limit)
    assert api_error(excinfo) == (422, "invalid_request", "query.limit")


# --- search ------------------------------------------------------------------------------------


def test_search_returns_decrypted_messages_newest_first_skipping_gone_rows(
    world: World,
) -> None:
    chat = world.chat()
    ids = [world.post(chat, f"lantern number {i} — ünï") for i in range(5)]
    world.delete(chat, ids[1])  # the index still has it
    world.search.add(chat, 987654321, "alice", "lantern of a row the store never had")
    page = world.service.search("bob", chat, "lantern", 10)
    assert [m.message.message_id for m in page.found] == [
        str(i) for i in (ids[4], ids[3], ids[2], ids[0])
    ]
    assert [m.message.text for m in page.found] == [
        "lantern number 4 — ünï",
        "lantern number 3 — ünï",
        "lantern number 2 — ünï",
        "lantern number 0 — ünï",
    ]
    assert page.next_cursor is None
    [request] = world.search.requests
    assert request.chat_ids == [chat] and request.size == 11  # one more: is there a next page?


@pytest.mark.parametrize(
    ("q", "limit", "field"),
    [
        ("", 20, "query.q"),
        ("   ", 20, "query.q"),
        ("x" * 257, 20, "query.q"),
        ("ok", 0, "query.limit"),
        ("ok", 51, "query.limit"),
    ],
)
def test_search_validates_q_and_limit(world: World, q: str, limit: int, field: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        world.service.search("alice", world.chat(), q, limit)
    assert api_error(excinfo) == (422, "invalid_request", field)
    assert world.search.requests == []


def test_search_accepts_256_characters(world: World) -> None:
    assert world.service.search("alice", world.chat(), "y" * 256, 50).found == []


# --- integrity and key versions ----------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 4, 10, 40, 70, -1, -5])
def test_tampered_envelope_raises_decryption_error_without_text(
    world: World, position: int, caplog: pytest.LogCaptureFixture
) -> None:
    chat = world.chat()
    message_id = world.post(chat, "meet at the old mill at noon")
    world.tamper(chat, message_id, position)
    caplog.set_level(logging.DEBUG)
    for call in (
        lambda: world.service.message("alice", chat, message_id),
        lambda: world.service.history("alice", chat),
        lambda: world.service.search("alice", chat, "mill"),
    ):
        with pytest.raises(DecryptionError) as excinfo:
            call()
        assert "mill" not in str(excinfo.value)
        assert excinfo.value.__cause__ is None
    assert caplog.records, "an integrity failure is logged"
    for record in caplog.records:
        assert "mill" not in record.getMessage() and "mill" not in str(record.__dict__)


def test_row_version_disagreeing_with_envelope_is_an_integrity_error(world: World) -> None:
    chat = world.chat()
    message_id = world.post(chat, "v1 text")
    world.keys.new_version(chat)
    row = world.messages.rows[(chat, message_id)]
    world.messages.add(replace(row, dek_version=2))
    with pytest.raises(DecryptionError):
        world.service.message("alice", chat, message_id)


def test_envelope_naming_a_version_the_chat_never_had_is_an_integrity_error(
    world: World,
) -> None:
    chat = world.chat()
    message_id = world.post(chat, "text")
    del world.keys.keys[(chat, 1)]
    with pytest.raises(DecryptionError):
        world.service.message("alice", chat, message_id)


@pytest.mark.parametrize(
    "change",
    [
        {"sender_id": "mallory"},  # a row moved to another sender (envelope v2 binds it)
        {"revision": 2},
        {"created_at": datetime(2026, 1, 2, tzinfo=UTC)},
        {"sender_id": ""},  # values no envelope can bind: not a genuine row either
        {"sender_id": "x" * 2000},
        {"revision": 0},
    ],
    ids=lambda c: next(iter(c)),
)
def test_row_columns_the_envelope_does_not_bind_are_an_integrity_error(
    world: World, change: dict[str, object]
) -> None:
    chat = world.chat()
    message_id = world.post(chat, "who said it", sender="alice")
    assert world.service.message("bob", chat, message_id).sender_id == "alice"
    world.messages.add(replace(world.messages.rows[(chat, message_id)], **change))
    with pytest.raises(DecryptionError):
        world.service.message("bob", chat, message_id)


def test_destroyed_key_version_is_gone(world: World) -> None:
    chat = world.chat()
    message_id = world.post(chat, "shredded")
    world.keys.destroyed.add((chat, 1))
    with pytest.raises(KeyDestroyed):
        world.service.message("alice", chat, message_id)


def test_moved_envelope_does_not_open_under_another_message_id(world: World) -> None:
    chat = world.chat()
    first = world.post(chat, "first")
    second = world.post(chat, "second")
    envelope = world.messages.rows[(chat, first)].envelope
    world.messages.add(replace(world.messages.rows[(chat, second)], envelope=envelope))
    with pytest.raises(DecryptionError):
        world.service.message("alice", chat, second)


def test_messages_of_every_key_version_read_after_rotation(world: World) -> None:
    chat = world.chat()
    old = [world.post(chat, f"old {i}") for i in range(3)]
    world.keys.new_version(chat)
    new = [world.post(chat, f"new {i}") for i in range(3)]
    versions = {world.messages.rows[(chat, i)].dek_version for i in old + new}
    assert versions == {1, 2}
    texts = [m.text for m in world.service.history("alice", chat).messages]
    assert texts == ["new 2", "new 1", "new 0", "old 2", "old 1", "old 0"]


# --- chat directory cache ----------------------------------------------------------------------


def test_chat_directory_caches_found_chats_briefly_and_never_unknown_ones() -> None:
    chats = FakeChats()
    known = uuid.uuid4()
    now = datetime.now(UTC) - timedelta(days=1)
    chats.rows[known] = ChatRow(known, "default", ("a",), "active", now, now)
    directory = CachedChatDirectory(chats.get, ttl_seconds=60)
    assert directory.get(known) is chats.rows[known]
    assert directory.get(known) is chats.rows[known]
    assert chats.lookups == 1
    unknown = uuid.uuid4()
    assert directory.get(unknown) is None
    chats.rows[unknown] = chats.rows[known]
    assert directory.get(unknown) is not None
    assert chats.lookups == 3


# --- attachments -------------------------------------------------------------------------------


class FakeFiles:
    """Our own `AttachmentSource` port: rows by (chat, id), and what `read` does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[uuid.UUID, int], AttachmentRow] = {}
        self.failure: Exception | None = None
        self.reads = 0

    def get(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        return self.rows.get((chat_id, file_id))

    def read(
        self, row: AttachmentRow, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return iter([b"genuine", b"bytes"])


def files_world() -> tuple[World, FakeFiles, AttachmentRow]:
    world = World()
    files = FakeFiles()
    world.service.attachments = files
    chat = world.chat(("alice", "bob"))
    row = AttachmentRow(
        chat,
        77,
        "alice",
        12,
        140,
        "image/png",
        1,
        65536,
        f"chats/{chat}/files/77",
        datetime.now(UTC),
        shared_at=datetime.now(UTC),  # sent in a message: the chat may read it
    )
    files.rows[(chat, 77)] = row
    return world, files, row


def test_attachment_downloads_take_the_chat_checks_of_the_message_routes() -> None:
    world, files, row = files_world()
    assert world.service.attachment("bob", row.chat_id, 77) == row
    with pytest.raises(ApiError) as refused:
        world.service.attachment("mallory", row.chat_id, 77)
    assert refused.value.status == 403
    with pytest.raises(ApiError) as unknown:
        world.service.attachment("bob", row.chat_id, 78)
    assert unknown.value.status == 404
    gone = world.chat(("bob",), state="deleted")
    with pytest.raises(ApiError) as deleted:
        world.service.attachment("bob", gone, 77)
    assert deleted.value.status == 410
    draft = replace(row, file_id=79, shared_at=None)  # no message references it yet
    files.rows[(row.chat_id, 79)] = draft
    assert world.service.attachment("alice", row.chat_id, 79) == draft
    with pytest.raises(ApiError) as unsent:
        world.service.attachment("bob", row.chat_id, 79)
    assert unsent.value.status == 404
    assert files.reads == 0  # no object touched on any refusal


def test_attachment_bytes_map_the_store_failures() -> None:
    world, files, row = files_world()
    assert b"".join(world.service.attachment_bytes(row)) == b"genuinebytes"
    files.failure = ObjectNotFound("gone", code="NoSuchKey")
    with pytest.raises(ApiError) as missing:
        world.service.attachment_bytes(row)
    assert missing.value.status == 404
    for failure in (
        ObjectStoreError("short", code="InvalidRange"),
        DecryptionError(),
        KeyNotFound("no such version"),
    ):
        files.failure = failure
        with pytest.raises(ApiError) as damaged:
            world.service.attachment_bytes(row)
        assert (damaged.value.status, damaged.value.code) == (500, "integrity_error")
    files.failure = ObjectStoreError("down", retriable=True, code="ConnectTimeoutError")
    with pytest.raises(ObjectStoreError):
        world.service.attachment_bytes(row)


def test_a_reader_without_attachments_answers_503() -> None:
    world = World()
    chat = world.chat()
    with pytest.raises(ApiError) as unavailable:
        world.service.attachment("alice", chat, 1)
    assert unavailable.value.status == 503


def test_a_row_reencrypted_while_it_was_read_is_read_under_its_new_version(
    world: World,
) -> None:
    """`sealstream keys reencrypt` re-seals every row with the newest DEK, then destroys the old
    versions once no row uses them. A read that fetched a row before its re-seal and opens it
    after the destruction must read the re-sealed row, not answer 410 for a live message."""
    chat = world.chat()
    ids = [world.post(chat, f"message {i}") for i in range(3)]
    fetched = [world.messages.rows[(chat, i)] for i in ids]  # read before the job
    newest = world.keys.new_version(chat)
    for row, text in zip(fetched, ["message 0", "message 1", "message 2"], strict=True):
        world.messages.add(
            sealed_row(chat, row.message_id, row.sender_id, newest, text, row.created_at)
        )
    world.keys.destroyed.add((chat, 1))
    world.messages.history = lambda *args: iter(sorted(fetched, key=lambda r: -r.message_id))  # type: ignore[method-assign]

    page = world.service.history("alice", chat)

    assert [m.text for m in page.messages] == ["message 2", "message 1", "message 0"]


def test_a_shredded_chat_read_mid_history_is_still_gone(world: World) -> None:
    """The re-read is for a row moved to a newer version only: when every version is destroyed
    (chat deletion), or the row still names the destroyed one, `KeyDestroyed` stands."""
    chat = world.chat()
    world.post(chat, "shredded")
    world.keys.destroyed.add((chat, 1))
    with pytest.raises(KeyDestroyed):
        world.service.history("alice", chat)


def test_a_row_reencrypted_then_shredded_or_deleted_meanwhile_stays_unreadable(
    world: World,
) -> None:
    """The re-read opens a re-sealed row only: one re-sealed and then shredded too, or deleted
    since, keeps `KeyDestroyed`; one extra store read, no loop."""
    chat = world.chat()
    message_id = world.post(chat, "secret")
    fetched = world.messages.rows[(chat, message_id)]
    newest = world.keys.new_version(chat)
    world.messages.add(
        sealed_row(chat, message_id, fetched.sender_id, newest, "secret", fetched.created_at)
    )
    world.keys.destroyed.update({(chat, 1), (chat, 2)})
    opener = EnvelopeOpener(world.keys, world.messages.get)
    before = world.messages.touched
    with pytest.raises(KeyDestroyed):
        opener.open(fetched)
    assert world.messages.touched == before + 1
    world.keys.destroyed.discard((chat, 2))
    world.delete(chat, message_id)
    with pytest.raises(KeyDestroyed):
        opener.open(fetched)


def test_a_message_deleted_while_its_page_was_read_is_left_out_not_a_410(world: World) -> None:
    """Fetched, then deleted, then its version destroyed by re-encryption (deleted rows do not
    hold a version back), then opened: the page of a live chat leaves that message out instead
    of answering 410, and a single read of it answers 404."""
    chat = world.chat()
    kept, doomed = world.post(chat, "kept"), world.post(chat, "deleted meanwhile")
    fetched = {i: world.messages.rows[(chat, i)] for i in (kept, doomed)}
    newest = world.keys.new_version(chat)
    world.messages.add(sealed_row(chat, kept, "alice", newest, "kept", fetched[kept].created_at))
    world.delete(chat, doomed)
    world.keys.destroyed.add((chat, 1))
    world.messages.history = lambda *args: iter(  # type: ignore[method-assign]
        sorted(fetched.values(), key=lambda r: -r.message_id)
    )

    page = world.service.history("alice", chat)

    assert [m.text for m in page.messages] == ["kept"]
    opener = EnvelopeOpener(world.keys, world.messages.get)
    with pytest.raises(MessageGone):
        opener.open(fetched[doomed])
