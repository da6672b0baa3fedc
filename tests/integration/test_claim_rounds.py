"""Claims of concurrent requests share one transaction (ingest.idempotency.GroupCommit) on the
real Postgres, and each request keeps the rules it had alone: all or nothing, an earlier claim
wins, a conflict claims nothing, whatever else shares the round."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

from ingest.idempotency import PostgresClaims, _ClaimWork, claim_key
from ingest.ports import Claim, ClaimConflict, Granted
from sealstream.adapters.postgres import Database
from sealstream.crypto import TextFingerprints

FINGERPRINTS = TextFingerprints(b"claim-rounds-fingerprint-key")


def _work(chat: uuid.UUID, sender: str, *claims: tuple[str, int, str]) -> _ClaimWork:
    now = datetime.now(UTC)
    wanted = [Claim(cid, mid, FINGERPRINTS.of(text, cid), now) for cid, mid, text in claims]
    return _ClaimWork([claim_key(chat, sender, c.client_id) for c in wanted], wanted)


def _claimed(database: Database, chat: uuid.UUID, sender: str, *client_ids: str) -> set[str]:
    keys = {claim_key(chat, sender, cid): cid for cid in client_ids}
    with database.connection() as conn:
        rows = conn.execute(
            "SELECT claim_key FROM message_claims WHERE claim_key = ANY(%s)", (list(keys),)
        ).fetchall()
    return {keys[bytes(r["claim_key"])] for r in rows}


def test_requests_of_one_round_keep_their_own_rules(database: Database) -> None:
    claims = PostgresClaims(database)
    chat = uuid.uuid4()
    [earlier] = claims.claim(
        chat, "ann", [Claim("x", 1, FINGERPRINTS.of("old", "x"), datetime.now(UTC))]
    )
    assert not earlier.earlier
    outcomes = claims._claim_all(
        [
            _work(chat, "ann", ("a1", 11, "one"), ("a2", 12, "two")),  # new: claimed
            _work(chat, "ann", ("b1", 21, "b"), ("x", 22, "new text")),  # conflicts on x
            _work(chat, "ann", ("a1", 31, "one")),  # a1 again, same text: A's message
            _work(chat, "ann", ("c1", 41, "c"), ("a2", 42, "other")),  # a2, another text
            _work(chat, "ann", ("x", 51, "old")),  # x again, same text: the earlier message
            _work(chat, "bob", ("a1", 61, "one")),  # another sender: another claim
        ]
    )
    first, conflict, again, late_conflict, retry, other_sender = outcomes
    assert isinstance(first, list) and [g.message_id for g in first] == [11, 12]
    assert not any(g.earlier for g in first)
    assert isinstance(conflict, ClaimConflict) and conflict.index == 1
    assert isinstance(again, list) and again[0].message_id == 11 and again[0].earlier
    assert isinstance(late_conflict, ClaimConflict) and late_conflict.index == 1
    assert isinstance(retry, list) and retry[0].message_id == 1 and retry[0].earlier
    assert isinstance(other_sender, list) and other_sender[0].message_id == 61
    # Refused requests claimed nothing, not even their ids that were free.
    assert _claimed(database, chat, "ann", "a1", "a2", "b1", "c1", "x") == {"a1", "a2", "x"}
    assert _claimed(database, chat, "bob", "a1") == {"a1"}


def test_a_conflict_seen_only_after_a_concurrent_commit_refuses_only_its_request(
    database: Database,
) -> None:
    """Request B [x, y] and request C [z] share a round while request A's claim of x (another
    text) is not committed yet: the round waits for A, B finds the conflict only then and must
    claim nothing (y deleted again), C is claimed."""
    claims = PostgresClaims(database)
    chat = uuid.uuid4()
    with database.transaction() as first:
        first.execute(
            "INSERT INTO message_claims (claim_key, message_id, fingerprint, sent_at)"
            " VALUES (%s, 1, %s, now())",
            (claim_key(chat, "amy", "x"), FINGERPRINTS.of("A", "x")),
        )
        a_pid = first.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]  # type: ignore[index]
        outcome: list[list[list[Granted] | BaseException]] = []
        round_ = threading.Thread(
            target=lambda: outcome.append(
                claims._claim_all(
                    [
                        _work(chat, "amy", ("x", 2, "B"), ("y", 3, "y")),
                        _work(chat, "amy", ("z", 4, "z")),
                    ]
                )
            )
        )
        round_.start()
        with database.connection() as watcher:  # until the round waits for A's row lock
            deadline = time.monotonic() + 30
            while not watcher.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (a_pid,),
            ).fetchone()["n"]:  # type: ignore[index]
                assert time.monotonic() < deadline, "the round never waited for request A"
                time.sleep(0.05)
    round_.join(30)
    [(refused, accepted)] = outcome
    assert isinstance(refused, ClaimConflict) and refused.index == 0
    assert isinstance(accepted, list) and accepted[0].message_id == 4
    assert _claimed(database, chat, "amy", "x", "y", "z") == {"x", "z"}


def test_many_threads_claiming_at_once_each_get_their_answer(database: Database) -> None:
    """What the gateway's worker threads do: 64 requests at once, every fourth one a retry of
    an earlier client id with another text. Each gets the answer it would get alone."""
    claims = PostgresClaims(database)
    chat = uuid.uuid4()
    now = datetime.now(UTC)
    claims.claim(
        chat,
        "eve",
        [Claim(f"taken{i}", 1000 + i, FINGERPRINTS.of("t", "x"), now) for i in range(16)],
    )
    results: dict[int, object] = {}
    barrier = threading.Barrier(64)

    def request(i: int) -> None:
        if i % 4 == 0:
            wanted = [Claim(f"taken{i // 4}", 2000 + i, FINGERPRINTS.of("other", "x"), now)]
        else:
            wanted = [Claim(f"new{i}", 2000 + i, FINGERPRINTS.of("n", "x"), now)]
        barrier.wait()
        try:
            results[i] = claims.claim(chat, "eve", wanted)
        except ClaimConflict as conflict:
            results[i] = conflict

    threads = [threading.Thread(target=request, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(64):
        if i % 4 == 0:
            assert isinstance(results[i], ClaimConflict), results[i]
        else:
            granted = results[i]
            assert isinstance(granted, list) and granted[0].message_id == 2000 + i
    assert _claimed(database, chat, "eve", *(f"new{i}" for i in range(64) if i % 4)) == {
        f"new{i}" for i in range(64) if i % 4
    }
