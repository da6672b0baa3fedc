"""Dead-letter tools without I/O (fakes of our own ports): what a letter's metadata shows and
hides, the filters and limits, the replay rules (once unless forced, refusals, dry runs), the
republished headers, and the operator's time and coordinate syntax."""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest

from sealstream.adapters.kafka import Delivery, Headers, StoredLetter
from sealstream.adapters.postgres import ReplayDone, ReplayRow
from sealstream.dead_letters import (
    ALREADY_REPLAYED,
    NOT_FOUND,
    REFUSED,
    REPLAYED,
    REPLAYED_FROM,
    WOULD_REPLAY,
    LetterFilter,
    describe,
    list_letters,
    parse_coordinates,
    parse_when,
    replay,
    replay_headers,
    select,
)

TOPIC = "sealstream.messages.v1"
CHAT = str(uuid.uuid4())
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def letter(
    offset: int,
    *,
    stage: str = "encryptor",
    reason: str = "message_id: Input should be a valid integer",
    key: bytes | None = CHAT.encode(),
    value: bytes | None = b"zqvaluex sealed or not",
    origin: str = TOPIC,
    extra: Sequence[tuple[str, bytes | None]] = (),
    minutes: int = 0,
) -> StoredLetter:
    headers: list[tuple[str, bytes | None]] = [
        ("sealstream.key_id", b"zqkeyidx"),
        ("dlq.stage", stage.encode()),
        ("dlq.reason", reason.encode()),
        ("dlq.topic", origin.encode()),
        ("dlq.partition", b"2"),
        ("dlq.offset", str(100 + offset).encode()),
        *extra,
    ]
    stamp = int((T0 + timedelta(minutes=minutes)).timestamp() * 1000)
    return StoredLetter(0, offset, stamp, key, value, tuple(headers))


class FakeTopic:
    topic = "sealstream.messages.dlq.v1"

    def __init__(self, letters: list[StoredLetter]) -> None:
        self.letters = letters

    def scan(self, since_ms: int | None = None) -> Generator[StoredLetter, None, None]:
        yield from (x for x in self.letters if since_ms is None or x.timestamp_ms >= since_ms)

    def read(self, partition: int, offset: int) -> StoredLetter | None:
        return next(
            (x for x in self.letters if (x.partition, x.offset) == (partition, offset)), None
        )


class FakeSink:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bytes | None, Headers | None]] = []

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
    ) -> list[Delivery]:
        for key, value in items:
            self.published.append((topic, key, value, headers))
        return [Delivery(topic, 3, len(self.published))]


class FakeLedger:
    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], ReplayRow] = {}

    def replayed(
        self, dlq_topic: str, coordinates: Sequence[tuple[int, int]]
    ) -> dict[tuple[int, int], ReplayRow]:
        return {c: self.rows[c] for c in coordinates if c in self.rows}

    def claim(self, dlq_topic: str, partition: int, offset: int) -> AbstractContextManager[bool]:
        return nullcontext(True)

    def record(self, done: ReplayDone, actor: str) -> int:
        key = (done.dlq_partition, done.dlq_offset)
        times = self.rows[key].replays + 1 if key in self.rows else 1
        self.rows[key] = ReplayRow(
            done.dlq_topic, key[0], key[1], done.origin_topic, 3, done.replayed_offset,
            T0, actor, T0, actor, times,
        )  # fmt: skip
        return times


def test_metadata_holds_no_value_no_header_value_and_no_key_but_a_chat_id() -> None:
    info = describe(letter(1, extra=[("trace", b"zqtracex"), ("dlq.value", None)]))
    assert (info.stage, info.origin_topic, info.origin_partition, info.origin_offset) == (
        "encryptor",
        TOPIC,
        2,
        101,
    )
    assert info.chat_id == CHAT and info.value_bytes == len(b"zqvaluex sealed or not")
    assert info.headers == ("sealstream.key_id", "trace") and info.at == T0
    assert "zq" not in repr(asdict(info))
    odd_key = describe(letter(2, key=b"zqkeytextx: someone's words"))
    assert odd_key.chat_id is None and odd_key.key_bytes == 27 and "zq" not in repr(odd_key)


def test_filters_match_reason_any_case_stage_time_and_origin() -> None:
    source = FakeTopic(
        [
            letter(1, minutes=0),
            letter(2, stage="indexer", reason=f"unknown chat {CHAT}", minutes=10),
            letter(3, origin="elsewhere", minutes=20),
        ]
    )

    def offsets(where: LetterFilter, limit: int = 100) -> list[int]:
        return [i.offset for i in list_letters(source, where, limit).letters]

    assert offsets(LetterFilter()) == [1, 2, 3]
    assert offsets(LetterFilter(reason="UNKNOWN Chat")) == [2]
    assert offsets(LetterFilter(stage="indexer")) == [2]
    assert offsets(LetterFilter(since=T0 + timedelta(minutes=5))) == [2, 3]
    assert offsets(LetterFilter(until=T0 + timedelta(minutes=10))) == [1]
    assert offsets(LetterFilter(origin_topic=TOPIC)) == [1, 2]
    assert offsets(LetterFilter(since=datetime(1, 1, 1, tzinfo=UTC))) == [1, 2, 3]
    page = list_letters(source, LetterFilter(), limit=2)
    assert [i.offset for i in page.letters] == [1, 2] and page.truncated
    assert not list_letters(source, LetterFilter(), limit=3).truncated
    with pytest.raises(ValueError, match="more than 2 dead letters match"):
        select(source, LetterFilter(), limit=2)


def test_replay_once_unless_forced_and_refusals_named() -> None:
    source = FakeTopic(
        [
            letter(1, extra=[(REPLAYED_FROM, b"0:0")]),
            letter(
                2, value=None, extra=[("dlq.value", b"omitted: too large (MSG_SIZE_TOO_LARGE)")]
            ),
            letter(3, origin="sealstream.changes.v1"),
            letter(4, key=b""),
        ]
    )
    sink, ledger = FakeSink(), FakeLedger()

    def run(coords: list[tuple[int, int]], **options: bool) -> list[str]:
        report = replay(
            source, sink, ledger, coords, messages_topic=TOPIC, actor="cli:ops", **options
        )
        return [r.outcome for r in report.results]

    assert run([(0, 1), (0, 2), (0, 3), (0, 4), (0, 9)], dry_run=True) == [
        WOULD_REPLAY,
        REFUSED,
        REFUSED,
        REFUSED,
        NOT_FOUND,
    ]
    assert not sink.published and not ledger.rows
    report = replay(source, sink, ledger, [(0, 2)], messages_topic=TOPIC, actor="a", force=True)
    assert (
        "no value" in report.results[0].detail and "MSG_SIZE_TOO_LARGE" in report.results[0].detail
    )
    assert run([(0, 1), (0, 1)]) == [REPLAYED]  # a letter named twice is replayed once
    assert run([(0, 1)]) == [ALREADY_REPLAYED]
    assert run([(0, 1)], force=True) == [REPLAYED]
    assert ledger.rows[(0, 1)].replays == 2
    assert len(sink.published) == 2
    topic, key, value, headers = sink.published[0]
    assert (topic, key, value) == (TOPIC, CHAT.encode(), b"zqvaluex sealed or not")
    # Own headers kept in order, dlq.* and an earlier replay's mark dropped, this one's added.
    assert headers == [("sealstream.key_id", b"zqkeyidx"), (REPLAYED_FROM, b"0:1")]
    assert replay_headers(letter(7))[-1] == (REPLAYED_FROM, b"0:7")


def test_times_and_coordinates_as_operators_type_them() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_when("15m", now) == now - timedelta(minutes=15)
    assert parse_when("2h", now) == now - timedelta(hours=2)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2026-12-01T10:00:00", now) == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_when("2026-12-01T10:00:00+02:00", now) == datetime(2026, 12, 1, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="duration ago"):
        parse_when("yesterday", now)
    assert parse_coordinates("0:1234") == (0, 1234)
    for bad in ("1234", "a:1", "0:-1", "0:"):
        with pytest.raises(ValueError, match="partition:offset"):
            parse_coordinates(bad)
