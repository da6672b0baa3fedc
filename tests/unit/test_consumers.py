"""The consumer stages' rules, without servers: what the schema refuses and normalises, how a
sink's per-item refusals become dead letters, how retry loops end on a stop signal, how the
dead-letter writer handles a letter the topic refuses, and what text becomes as search tokens."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import pytest

from encryptor.logic import encrypt_and_store
from indexer.logic import index_batch
from schemas.events import MessageRecord, decode_record
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import RefusedRow, StoredMessage
from sealstream.adapters.kafka import Headers, RecordRefused
from sealstream.adapters.opensearch import IndexedMessage, RefusedDocument
from sealstream.crypto import ChatKey
from sealstream.errors import StoreUnavailable
from sealstream.streaming import (
    DeadLetterWriter,
    RawRecord,
    Rejected,
    Stopped,
    run_until_done,
)
from sealstream.tokens import MAX_TOKEN_CHARS, analyzer, unicode_words

IDS = SnowflakeIds(5)


def record_json(**overrides: object) -> bytes:
    chat = uuid.uuid4()
    fields: dict[str, object] = {
        "message_id": IDS.next_id(),
        "chat_id": str(chat),
        "sender_id": "alice",
        "text": "hello there",
        "sent_at": "2026-03-01T12:00:00+02:00",
    }
    fields.update(overrides)
    return json.dumps(fields).encode()


def keyed(value: bytes) -> tuple[bytes, bytes]:
    """A record value with the key its producer must give it (the chat id)."""
    return value, str(json.loads(value)["chat_id"]).encode()


# --- schema: times ---------------------------------------------------------------------------


def test_sent_at_is_normalised_to_utc() -> None:
    decoded = decode_record(*keyed(record_json(sent_at="2026-03-01T12:00:00+18:00")))
    assert isinstance(decoded, MessageRecord)
    assert decoded.sent_at == datetime(2026, 2, 28, 18, 0, tzinfo=UTC)
    assert decoded.sent_at.utcoffset() == timedelta(0)
    assert '"sent_at":"2026-02-28T18:00:00Z"' in decoded.value().decode()


@pytest.mark.parametrize(
    ("sent_at", "rule"),
    [
        ("2026-03-01T12:00:00+20:00", "18:00"),
        ("2026-03-01T12:00:00-18:01", "18:00"),
        ("2026-03-01T12:00:00", "UTC offset"),
        ("0001-01-01T00:30:00+01:00", "years 1 to 9999"),
        ("9999-12-31T23:30:00-01:00", "years 1 to 9999"),
    ],
)
def test_times_no_sink_can_store_are_refused_naming_the_field(sent_at: str, rule: str) -> None:
    reason = decode_record(record_json(sent_at=sent_at, text="secret words"), None)
    assert isinstance(reason, str)
    assert "sent_at" in reason and rule in reason
    assert "secret" not in reason


# --- tokens ----------------------------------------------------------------------------------


def test_tokens_are_the_sorted_distinct_normalised_words() -> None:
    assert unicode_words(
        "The cat saw THE other cat. \uff23\uff41\uff54!"
    )  # fullwidth "Cat" == ["cat", "other", "saw", "the"]
    assert unicode_words("Straße café e-mail don't 3.14") == [
        "14",
        "3",
        "café",
        "don",
        "e",
        "mail",
        "strasse",
        "t",
    ]
    assert unicode_words("...   — 🚀 ✓") == []


def test_scripts_without_spaces_give_one_token_per_character() -> None:
    assert unicode_words("世界世界") == ["世", "界"]
    assert unicode_words("カタカナとひらがな") == sorted(set("カタカナとひらがな"))
    assert unicode_words("abc東京def") == ["abc", "def", "京", "東"]
    # A Thai consonant keeps the vowel mark written on it.
    assert unicode_words("สวัสดี") == sorted({"ส", "วั", "ดี"})


def test_long_words_are_cut_and_unknown_analyzers_named() -> None:
    tokens = unicode_words("a" * (MAX_TOKEN_CHARS + 10) + " b" * 3)
    assert tokens == ["a" * 10, "a" * MAX_TOKEN_CHARS, "b"]
    assert analyzer("unicode-words-v1") is unicode_words
    with pytest.raises(ValueError, match=r"opensearch\.analyzer"):
        analyzer("icu")


# --- stages: a sink's per-item refusals are dead letters -------------------------------------


class RefusingIndex:
    def __init__(self, refuse: set[int], failures: int = 0) -> None:
        self.refuse = refuse
        self.indexed: list[IndexedMessage] = []
        self.failures = failures

    def index_many(self, messages: list[IndexedMessage]) -> list[RefusedDocument]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("index busy")
        self.indexed += [m for m in messages if m.message_id not in self.refuse]
        return [
            RefusedDocument(m.message_id, "refused (HTTP 400)")
            for m in messages
            if m.message_id in self.refuse
        ]


def raw_records(values: list[bytes]) -> list[RawRecord]:
    def key(value: bytes) -> bytes | None:
        try:
            return str(json.loads(value)["chat_id"]).encode()  # the key producers must set
        except (ValueError, KeyError, TypeError):
            return None

    return [RawRecord("t", 0, offset, key(value), value) for offset, value in enumerate(values)]


def test_indexer_dead_letters_refused_documents_and_bad_records() -> None:
    ids = [IDS.next_id() for _ in range(3)]
    records = raw_records([record_json(message_id=i) for i in ids] + [b"{}"])
    sink = RefusingIndex(refuse={ids[1]})
    rejected = index_batch(records, sink)
    assert sorted((r.record.offset, r.reason.split(":")[0]) for r in rejected) == [
        (1, "refused (HTTP 400)"),
        (3, "invalid record"),
    ]
    assert [m.message_id for m in sink.indexed] == [ids[0], ids[2]]
    assert all(m.sent_at.tzinfo == UTC for m in sink.indexed)


class Keys:
    def __init__(self) -> None:
        self.usage: dict[tuple[uuid.UUID, int], int] = {}

    def current_key(self, chat_id: uuid.UUID) -> ChatKey:
        return ChatKey(1, b"k" * 32)

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]:
        for key, n in counts.items():
            self.usage[key] = self.usage.get(key, 0) + n
        return []


class RefusingStore:
    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.rows: list[StoredMessage] = []

    def write_many(self, messages: Sequence[StoredMessage]) -> list[RefusedRow]:
        self.rows += [m for m in messages if m.message_id not in self.refuse]
        return [
            RefusedRow(m.message_id, "the message store refused the row (InvalidRequest)")
            for m in messages
            if m.message_id in self.refuse
        ]


def test_encryptor_dead_letters_rows_the_store_refuses_and_counts_only_written_ones() -> None:
    chat = uuid.uuid4()
    ids = [IDS.next_id() for _ in range(3)]
    records = [
        RawRecord("t", 0, n, str(chat).encode(), record_json(message_id=i, chat_id=str(chat)))
        for n, i in enumerate(ids)
    ]
    keys, store = Keys(), RefusingStore(refuse={ids[2]})
    rejected = encrypt_and_store(records, keys, store)
    assert [(r.record.offset, "InvalidRequest" in r.reason) for r in rejected] == [(2, True)]
    assert [m.message_id for m in store.rows] == ids[:2]
    assert keys.usage == {(chat, 1): 2}


# --- retry loops end on the stop signal ------------------------------------------------------


def test_retry_loop_retries_a_failing_batch_until_it_succeeds() -> None:
    sink = RefusingIndex(refuse=set(), failures=2)
    records = raw_records([record_json()])
    assert run_until_done("t", lambda b: index_batch(b, sink), records, threading.Event()) == []
    assert len(sink.indexed) == 1


def test_retry_loop_ends_with_stopped_when_the_stop_signal_is_set() -> None:
    stop = threading.Event()
    attempts: list[int] = []

    def down(batch: Sequence[RawRecord]) -> list[Rejected]:
        attempts.append(len(batch))
        if len(attempts) == 3:
            stop.set()  # as SIGTERM does, from another thread, while the loop waits
        raise StoreUnavailable("down")

    with pytest.raises(Stopped):
        run_until_done("t", down, raw_records([b"x"]), stop)
    assert attempts == [1, 1, 1]
    with pytest.raises(Stopped):  # once stopped, no new attempt starts
        run_until_done("t", down, raw_records([b"x"]), stop)
    assert len(attempts) == 3


# --- dead-letter publishing ------------------------------------------------------------------


class Topic:
    """A dead-letter topic that refuses values above `max_bytes`, or is down `failures` times."""

    def __init__(self, max_bytes: int, failures: int = 0) -> None:
        self.max_bytes = max_bytes
        self.failures = failures
        self.letters: list[tuple[bytes, bytes | None, dict[str, bytes]]] = []

    def publish(
        self, topic: str, items: Sequence[tuple[bytes, bytes | None]], headers: Headers | None
    ) -> list[object]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("no broker")
        for key, value in items:
            if value is not None and len(value) > self.max_bytes:
                raise RecordRefused("MSG_SIZE_TOO_LARGE")
            header_map = {k: v for k, v in headers or [] if isinstance(v, bytes)}
            self.letters.append((key, value, header_map))
        return []


def test_a_letter_too_large_for_the_topic_is_published_without_its_value() -> None:
    topic = Topic(max_bytes=100, failures=1)
    writer = DeadLetterWriter(topic, "dlq")  # type: ignore[arg-type]
    small, large = RawRecord("t", 2, 10, b"k1", b"x" * 50), RawRecord("t", 2, 11, b"k2", b"y" * 500)
    writer.write(
        "indexer", [Rejected(small, "bad small"), Rejected(large, "bad large")], threading.Event()
    )
    [(k1, v1, h1), (k2, v2, h2)] = topic.letters
    assert (k1, v1, h1["dlq.reason"], h1["dlq.offset"]) == (b"k1", small.value, b"bad small", b"10")
    assert (k2, v2, h2["dlq.reason"], h2["dlq.offset"]) == (b"k2", None, b"bad large", b"11")
    assert b"MSG_SIZE_TOO_LARGE" in h2["dlq.value"] and "dlq.value" not in h1


def test_dead_letter_publishing_ends_with_stopped_when_stopping() -> None:
    stop = threading.Event()
    stop.set()
    writer = DeadLetterWriter(Topic(max_bytes=100, failures=10**6), "dlq")  # type: ignore[arg-type]
    with pytest.raises(Stopped):
        writer.write("indexer", [Rejected(RawRecord("t", 0, 0, None, b"x"), "bad")], stop)


def test_far_offsets_round_trip_only_within_java_limits() -> None:
    at = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-18)))
    ok = decode_record(*keyed(record_json(sent_at=at.isoformat())))
    assert isinstance(ok, MessageRecord) and ok.sent_at == at
