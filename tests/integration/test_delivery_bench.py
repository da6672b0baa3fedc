"""`sealstream bench delivery` runs end to end on the real stack at a tiny size (no timing is
asserted: only that every client subscribed, every post was delivered and the figures exist)."""

from __future__ import annotations

import math

from sealstream.bench import delivery_bench
from sealstream.settings import Settings


def test_delivery_bench_delivers_every_post_and_prints_its_figures(settings: Settings) -> None:
    figures = delivery_bench.run(
        clients=30, rate=40.0, seconds=2.0, hot_chats=3, senders=4, settings=settings
    )
    assert figures["idle_clients"] == 30
    assert figures["delivered"] == figures["posted"] == 80
    for name in ("rss_per_client_kib", "post_to_delivery_p50_ms", "post_to_delivery_p99_ms"):
        assert math.isfinite(figures[name]), name
    assert figures["post_to_delivery_p99_ms"] > 0
