"""The consumer-runtime benchmark runs end to end on the real Kafka (small count; no timing
is asserted, only that both consumers read every record and the figures exist)."""

from __future__ import annotations

import math

from sealstream.bench import consumer_bench
from sealstream.settings import Settings


def test_consumer_bench_reads_every_record_with_both_runtimes(settings: Settings) -> None:
    figures = consumer_bench.run(count=2_000, settings=settings)
    assert figures["records"] == 2_000
    for name in (
        "runtime_cpu_ms_per_record",
        "runtime_records_per_s",
        "confluent_cpu_ms_per_record",
        "confluent_records_per_s",
    ):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
