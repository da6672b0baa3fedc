"""GroupCommit (ingest.idempotency): concurrent callers share rounds, each gets its own outcome,
and nobody runs rounds for callers who came later."""

from __future__ import annotations

import threading
import time

import pytest

from ingest.idempotency import GroupCommit


class Refused(Exception):
    pass


def test_concurrent_callers_share_rounds_and_each_gets_its_own_outcome() -> None:
    rounds: list[tuple[int, list[tuple[int, int]]]] = []
    lock = threading.Lock()

    def run(works: list[tuple[int, int]]) -> list[int | BaseException]:
        with lock:
            rounds.append((threading.get_ident(), list(works)))
        time.sleep(0.01)  # a round trip: callers arriving meanwhile queue for the next round
        return [Refused(n) if n % 7 == 0 else n * 10 for _, n in works]

    group: GroupCommit[tuple[int, int], int] = GroupCommit(run, max_round=16)
    results: dict[int, object] = {}

    def caller(n: int) -> None:
        try:
            results[n] = group.submit((threading.get_ident(), n))
        except Refused as refused:
            results[n] = refused

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(1, 101)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for n in range(1, 101):
        if n % 7 == 0:
            assert isinstance(results[n], Refused) and results[n].args == (n,)
        else:
            assert results[n] == n * 10
    assert sorted(n for _, works in rounds for _, n in works) == list(range(1, 101))
    assert len(rounds) < 100 and max(len(w) for _, w in rounds) <= 16  # shared, and bounded
    # Whoever ran a round had its own work in it: nobody works for later callers.
    for runner, works in rounds:
        assert runner in {ident for ident, _ in works}


def test_a_failing_round_fails_its_callers_and_the_next_round_runs() -> None:
    calls = [0]

    def run(works: list[int]) -> list[int | BaseException]:
        calls[0] += 1
        if calls[0] == 1:
            raise ConnectionError("database down")
        return list(works)

    group: GroupCommit[int, int] = GroupCommit(run, max_round=4)
    with pytest.raises(ConnectionError):
        group.submit(1)
    assert group.submit(2) == 2


def test_callers_queued_behind_a_hung_round_give_up_after_their_wait() -> None:
    release = threading.Event()
    hung = threading.Event()

    def run(works: list[int]) -> list[int | BaseException]:
        hung.set()
        release.wait(10)  # the first round hangs, as on a hung database
        return list(works)

    group: GroupCommit[int, int] = GroupCommit(
        run, max_round=4, wait_seconds=0.2, late=lambda: ConnectionError("late")
    )
    first = threading.Thread(target=group.submit, args=(1,))
    first.start()
    assert hung.wait(10)  # the first caller leads the hung round
    outcomes: list[object] = []

    def queued() -> None:
        try:
            outcomes.append(group.submit(2))
        except ConnectionError as late:
            outcomes.append(late)

    waiter = threading.Thread(target=queued)
    waiter.start()
    waiter.join(5)
    assert len(outcomes) == 1 and isinstance(outcomes[0], ConnectionError)
    release.set()
    first.join(5)
    assert group.submit(3) == 3  # the queue it left is not stuck
