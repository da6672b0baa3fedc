"""`sealstream bench throughput` in its quick mode, on the real stack: the bench completes, and
every message it posted (product pipeline and plaintext baseline alike) was acknowledged, stored
in Cassandra and indexed. No timing asserts: the figures are printed by the bench, not tested."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sealstream.bench.throughput_bench import QUICK, run
from sealstream.bench.throughput_plots import LATENCY_PNG, THROUGHPUT_PNG
from sealstream.settings import Settings
from tests.conftest import require_port


def test_quick_bench_stores_and_indexes_every_posted_message(
    settings: Settings, tmp_path: Path
) -> None:
    kafka_host, kafka_port = settings.kafka.bootstrap.split(",")[0].rsplit(":", 1)
    require_port("kafka", kafka_host, int(kafka_port))
    require_port("cassandra", settings.cassandra.hosts[0], settings.cassandra.port)

    report = run(replace(QUICK, plots_dir=tmp_path), settings, log=print)

    figures = report.figures
    assert figures["not_acknowledged"] == 0, report.notes
    assert figures["acked"] > 0
    assert (figures["stored"], figures["indexed"]) == (figures["acked"], figures["acked"])
    assert figures["plain_acked"] > 0
    assert (figures["plain_stored"], figures["plain_indexed"]) == (
        figures["plain_acked"],
        figures["plain_acked"],
    )
    assert sorted(p.name for p in report.plots) == sorted([LATENCY_PNG, THROUGHPUT_PNG])
    assert all(p.stat().st_size > 0 for p in report.plots)
    assert report.sweep and report.rows
