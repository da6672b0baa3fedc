"""The throughput bench's pieces without I/O: the plaintext baseline writer's batch, the load
generator's refusal of non-local targets, the bench's configuration checks, and the report built
from measured phases (figures beside their baselines, plots)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.events import MessageRecord
from sealstream.adapters.cassandra import RefusedRow, StoredMessage
from sealstream.bench.load_generator import LoadResult, batch_load, websocket_load
from sealstream.bench.plaintext_baseline import write_plain
from sealstream.bench.throughput_bench import (
    QUICK,
    Phase,
    SweepPoint,
    ThroughputConfig,
    ThroughputReport,
    _fill,
)
from sealstream.bench.throughput_plots import LATENCY_PNG, THROUGHPUT_PNG, write_plots
from sealstream.deletion_state import ChatState
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

    def chat_states(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, ChatState]:
        return {c: ChatState(self.known[c], None, "default") for c in chat_ids if c in self.known}


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


def _phase(rate: float, roles: dict[str, float]) -> Phase:
    load = LoadResult(acked=int(rate * 10), started=0.0, ended=10.0, cpu_seconds=1.0)
    return Phase(load, rate, rate, roles, 1.5)


def test_report_puts_each_figure_beside_its_baseline_and_plots_the_sweep(tmp_path: Path) -> None:
    sealed = {"encryptor": 0.2, "indexer": 0.2, "gateway": 0.3}
    plain = {"plain-writer": 0.15, "plain-indexer": 0.2, "gateway": 0.3}
    report = ThroughputReport(
        sweep=[SweepPoint(r, r, 10, 20, 30, 40, 100, int(r * 5), 0) for r in (500.0, 1000.0)]
    )
    config = ThroughputConfig(gateways=(1, 2), encryptors=(1, 2))

    _fill(
        report,
        config,
        {1: _phase(1000, sealed), 2: _phase(800, sealed)},
        1,
        {1: _phase(2000, sealed), 2: _phase(2500, sealed)},
        _phase(1250, plain),
        _phase(2500, plain),
    )

    figures = report.figures
    assert figures["ratio_batch"] == 2000 / 2500 and figures["ratio_ws"] == 1000 / 1250
    assert figures["cpu_ratio_batch"] == pytest.approx(0.35 / 0.4)
    assert figures["half_rate_written_p99_ms"] == 40
    assert any("plaintext pipeline: 1,250 msg/s" in row.baseline for row in report.rows)
    paths = write_plots(report.sweep, 1000.0, tmp_path)
    assert sorted(p.name for p in paths) == sorted([LATENCY_PNG, THROUGHPUT_PNG])
