"""The throughput bench's pieces without I/O: the plaintext baseline writer's batch, the load
generator's refusal of non-local targets, and the bench's configuration checks."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from schemas.events import MessageRecord
from sealstream.adapters.cassandra import RefusedRow, StoredMessage
from sealstream.bench.load_generator import batch_load, websocket_load
from sealstream.bench.plaintext_baseline import write_plain
from sealstream.bench.throughput_bench import QUICK, ThroughputConfig
from sealstream.streaming import RawRecord


class _Store:
    def __init__(self) -> None:
        self.rows: list[StoredMessage] = []

    def write_many(self, messages: Sequence[StoredMessage]) -> list[RefusedRow]:
        self.rows.extend(messages)
        return []


class _States:
    def __init__(self, known: dict[uuid.UUID, str]) -> None:
        self.known = known

    def chat_states(
        self, chat_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[str, int | None]]:
        return {c: (self.known[c], None) for c in chat_ids if c in self.known}


def _record(chat: uuid.UUID, message_id: int, text: str, offset: int) -> RawRecord:
    message = MessageRecord(
        message_id=message_id,
        chat_id=chat,
        sender_id="bench",
        text=text,
        sent_at=datetime.now(UTC),
    )
    return RawRecord("t", 0, offset, message.key(), message.value())


def test_plain_writer_stores_text_of_live_chats_and_refuses_the_rest() -> None:
    live, deleted, unknown = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    records = [
        _record(live, 1 << 30, "hello plain", 0),
        _record(deleted, (1 << 30) + 1, "gone", 1),
        _record(unknown, (1 << 30) + 2, "who", 2),
        RawRecord("t", 0, 3, live.bytes, b"not json"),
    ]
    store = _Store()

    rejected = write_plain(records, store, _States({live: "active", deleted: "deleted"}))

    assert [(r.chat_id, r.envelope) for r in store.rows] == [(live, b"hello plain")]
    assert sorted(r.record.offset for r in rejected) == [2, 3]
    assert any(str(unknown) in r.reason for r in rejected)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://localhost:8000"])
def test_load_generator_refuses_targets_other_than_127_0_0_1(url: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        websocket_load([url], "t", ["c"], clients=1, seconds=1)
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        batch_load([url], "t", ["c"], clients=1, seconds=1)


@pytest.mark.parametrize(
    "change",
    [
        {"gateways": ()},
        {"gateways": (0,)},
        {"encryptors": (7,)},
        {"clients": 0},
        {"seconds": 0},
        {"sweep": (0.0,)},
    ],
)
def test_config_refuses_out_of_range_values(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(ThroughputConfig(), **change)  # type: ignore[arg-type]


def test_quick_mode_is_the_smallest_run() -> None:
    assert QUICK.seconds <= ThroughputConfig().seconds
    assert QUICK.gateways == (1,) and QUICK.encryptors == (1,)
