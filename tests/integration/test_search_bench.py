"""`sealstream bench search` runs end to end on the real OpenSearch (a small corpus; no timing is
asserted, only that both indexes hold the corpus, searches find messages and the figures exist)."""

from __future__ import annotations

import math

from sealstream.bench import search_bench
from sealstream.settings import Settings


def test_search_bench_loads_both_indexes_and_finds_messages(settings: Settings) -> None:
    figures = search_bench.run(messages=3_000, chats=40, queries=30, sample=300, settings=settings)
    assert figures["plain_documents"] == figures["blind_documents"] == 3_000
    assert figures["user_chats"] == 20
    for name in ("plain", "blind"):
        # Zipf-drawn words: the common ones match many messages of the user's 20 chats.
        assert figures[f"{name}_words_all_chats_mean_hits"] > 0, name
        for figure in (
            f"{name}_words_one_chat_p50_ms",
            f"{name}_words_all_chats_p99_ms",
            f"{name}_load_msgs_per_s",
            f"{name}_index_cpu_ms_per_msg",
            f"{name}_opensearch_cpu_ms_per_msg",
        ):
            assert math.isfinite(figures[figure]) and figures[figure] > 0, figure
    # Search-as-you-type on the plain index only (keyed terms have no prefixes).
    assert figures["plain_typing_all_chats_mean_hits"] > 0
    assert not any(name.startswith("blind_typing") for name in figures)
