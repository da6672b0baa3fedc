"""The gateway bench's split of CPU by thread (sealstream.bench.gateway_bench._cpu_by_kind)."""

from __future__ import annotations

import pytest

from sealstream.bench.gateway_bench import _cpu_by_kind


def test_a_thread_that_ended_in_the_window_does_not_make_other_negative() -> None:
    # A worker thread (tid 3) used 0.5 s before the window and ended during it; the process's
    # total grew by 1.0 s, of which the loop took 0.6 s and librdkafka 0.1 s.
    before = {"1": ("loop", 2.0), "2": ("kafka", 1.0), "3": ("other", 0.5)}
    after = {"1": ("loop", 2.6), "2": ("kafka", 1.1), "4": ("other", 0.05)}
    split = _cpu_by_kind(before, after, total=1.0)
    assert split["loop"] == pytest.approx(0.6)
    assert split["kafka"] == pytest.approx(0.1)
    assert split["other"] == pytest.approx(0.3)  # the rest: the ended thread's and tid 4's


def test_threads_started_in_the_window_count_from_zero() -> None:
    before = {"1": ("loop", 1.0)}
    after = {"1": ("loop", 1.2), "5": ("kafka", 0.3)}
    split = _cpu_by_kind(before, after, total=0.5)
    assert split == pytest.approx({"loop": 0.2, "kafka": 0.3, "other": 0.0})
