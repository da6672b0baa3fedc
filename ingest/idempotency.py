"""Durable idempotency claims of client message ids, in Postgres (table `message_claims`).

One row per (chat, sender, client message id), keyed by sha256 of the three (ids may contain
any character; none is stored, though a guessed triple can be confirmed). The row holds the
message id given to the first request, a keyed fingerprint of its text bound to the claim, its
`sent_at` and whether Kafka acknowledged it. The claims of a request are one transaction, shared
with the requests arriving at the same time (`GroupCommit`), each keeping its own rules. A
claim is written before publishing and is never released: whatever crashed or timed out, a
retry finds the message id and re-publishes the same record under it (the sinks store by id),
so at most one message exists per client message id. No message text is stored here.

Redis is not used: the claim must be durable before publishing, so every post with a client
id costs one Postgres round trip anyway, and a Redis "fast path" in front could only add a
second one (docs/operations.md, "Deadlines and idempotency").
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from ingest.ports import Claim, ClaimConflict, Granted
from sealstream.adapters.postgres import Database
from sealstream.errors import StoreUnavailable

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 60.0
# Requests whose claims (or acknowledgements) share one transaction at most.
ROUND_REQUESTS = 256
_PURGE_BATCH = 10_000

# One statement (one round trip) for every claim of every request of a round (requests of a
# round never share a claim key): read the earlier claims, and insert the new ones of each
# request unless an earlier claim of *that request* has another fingerprint (a conflict refuses
# the whole request, so it must claim nothing). `existing` sees the table as it was before this
# statement, i.e. the earlier claims only; `fresh` marks the rows this statement inserted.
_CLAIM = """
WITH wanted AS (
    SELECT * FROM unnest(%s::int[], %s::bytea[], %s::bigint[], %s::bytea[], %s::timestamptz[])
        AS w(request, claim_key, message_id, fingerprint, sent_at)
), existing AS (
    SELECT w.request, c.claim_key, c.message_id, c.fingerprint, c.sent_at, c.acknowledged,
        c.fingerprint <> w.fingerprint AS conflicting
    FROM message_claims c JOIN wanted w USING (claim_key)
), inserted AS (
    INSERT INTO message_claims (claim_key, message_id, fingerprint, sent_at)
    SELECT claim_key, message_id, fingerprint, sent_at FROM wanted w
    WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.request = w.request AND e.conflicting)
    ON CONFLICT (claim_key) DO NOTHING
    RETURNING claim_key, message_id, fingerprint, sent_at, acknowledged
)
SELECT claim_key, message_id, fingerprint, sent_at, acknowledged, true AS fresh FROM inserted
UNION ALL
SELECT claim_key, message_id, fingerprint, sent_at, acknowledged, false AS fresh FROM existing
"""
_EARLIER = """
SELECT claim_key, message_id, fingerprint, sent_at, acknowledged
FROM message_claims WHERE claim_key = ANY(%s)
"""


def claim_key(chat_id: uuid.UUID, sender: str, client_id: str) -> bytes:
    return hashlib.sha256("\0".join((str(chat_id), sender, client_id)).encode()).digest()


_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _Waiting(Generic[_In, _Out]):
    """One caller's work in a `GroupCommit`, and how it ended."""

    __slots__ = ("done", "lead", "outcome", "work")

    def __init__(self, work: _In) -> None:
        self.work = work
        self.done = threading.Event()
        self.lead = False  # set (with `done`) when this caller must run the next round
        self.outcome: _Out | BaseException | None = None


class GroupCommit(Generic[_In, _Out]):
    """Runs the work of concurrent callers (threads) together: one transaction, one round trip,
    for every caller waiting when a round starts, instead of one each.

    No timer: the first caller runs its work at once (alone when the gateway is quiet); callers
    arriving meanwhile wait, and when the round ends the first of them runs the next round for
    all of them. A caller returns as soon as the round holding its work ended: it never runs a
    round for later callers. `run(works)` returns one outcome per work, an exception to raise in
    that caller or its result; an exception raised by `run` ends the whole round's callers.

    A caller still queued after `wait_seconds` (a round hanging on a hung database) leaves the
    queue with `late()` raised, as it would have timed out waiting for a pooled connection: a
    queue behind a hung round must not hold every worker thread for one deadline per round.
    """

    def __init__(
        self,
        run: Callable[[list[_In]], list[_Out | BaseException]],
        max_round: int,
        wait_seconds: float | None = None,
        late: Callable[[], BaseException] = lambda: TimeoutError("not run in time"),
    ) -> None:
        self._run = run
        self.max_round = max_round
        self.wait_seconds = wait_seconds
        self._late = late
        self._lock = threading.Lock()
        self._queue: list[_Waiting[_In, _Out]] = []
        self._busy = False

    def submit(self, work: _In) -> _Out:
        waiting: _Waiting[_In, _Out] = _Waiting(work)
        with self._lock:
            self._queue.append(waiting)
            lead = not self._busy
            self._busy = True
        if not lead:
            if not waiting.done.wait(self.wait_seconds):
                with self._lock:
                    if not waiting.lead and waiting in self._queue:
                        self._queue.remove(waiting)
                        raise self._late()
            # Taken into a round (or made to lead the next): that round ends within the
            # database's deadline.
            waiting.done.wait()
            lead = waiting.lead
        if lead:
            self._lead()
        if isinstance(waiting.outcome, BaseException):
            raise waiting.outcome
        return waiting.outcome  # type: ignore[return-value]

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self.max_round], self._queue[self.max_round :]
        try:
            outcomes = self._run([w.work for w in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the round
            outcomes = [exc] * len(batch)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            waiting.outcome = outcome
            waiting.done.set()
        with self._lock:
            if self._queue:  # the next round is run by the first caller waiting for it
                self._queue[0].lead = True
                self._queue[0].done.set()
            else:
                self._busy = False


@dataclass(frozen=True)
class _ClaimWork:
    keys: list[bytes]
    claims: Sequence[Claim]


class PostgresClaims:
    """`ingest.ports.ClaimStore` on the gateway's Postgres pool."""

    def __init__(self, database: Database, window_hours: float = 24.0) -> None:
        self.database = database
        self.window_seconds = window_hours * 3600
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

        # Concurrent posts (HTTP requests, WebSocket frames) share a transaction: each Postgres
        # use costs a pool checkout, a liveness check, BEGIN and COMMIT, more than the claim.
        def late() -> BaseException:
            return StoreUnavailable("Postgres unavailable: no round of claims in time")

        self._claims: GroupCommit[_ClaimWork, list[Granted]] = GroupCommit(
            self._claim_all, ROUND_REQUESTS, database.deadline, late
        )
        self._acknowledgements: GroupCommit[list[bytes], None] = GroupCommit(
            self._acknowledge_all, ROUND_REQUESTS, database.deadline, late
        )

    def claim(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Claim]) -> list[Granted]:
        keys = [claim_key(chat_id, sender, c.client_id) for c in claims]
        return self._claims.submit(_ClaimWork(keys, claims))

    def acknowledge(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Granted]) -> None:
        self._acknowledgements.submit([claim_key(chat_id, sender, c.client_id) for c in claims])

    def _acknowledge_all(self, works: list[list[bytes]]) -> list[BaseException | None]:
        keys = [key for work in works for key in work]
        with self.database.connection() as conn:
            conn.execute(
                "UPDATE message_claims SET acknowledged = true"
                " WHERE claim_key = ANY(%s) AND NOT acknowledged",
                (keys,),
            )
        return [None] * len(works)

    def _claim_all(self, works: list[_ClaimWork]) -> list[list[Granted] | BaseException]:
        """The claims of several requests: in rounds whose requests share no claim key (a
        request sharing one with an earlier request waits for the next round, and then sees
        that request's claim as an earlier one, as if they had come one after the other)."""
        outcomes: list[list[Granted] | BaseException | None] = [None] * len(works)
        todo = list(range(len(works)))
        while todo:
            taken: set[bytes] = set()
            now, later = [], []
            for index in todo:
                keys = works[index].keys
                if taken.isdisjoint(keys):
                    taken.update(keys)
                    now.append(index)
                else:
                    later.append(index)
            try:
                done = self._claim_round([works[i] for i in now])
            except BaseException as exc:  # noqa: BLE001 - Postgres failed: every request left
                for index in todo:
                    outcomes[index] = exc
                break
            for index, outcome in zip(now, done, strict=True):
                outcomes[index] = outcome
            todo = later
        return [o if o is not None else StoreUnavailable("claim not run") for o in outcomes]

    def _claim_round(self, works: list[_ClaimWork]) -> list[list[Granted] | BaseException]:
        params: tuple[list[Any], ...] = ([], [], [], [], [])
        for request, work in enumerate(works):
            for key, wanted in zip(work.keys, work.claims, strict=True):
                for column, value in zip(
                    params,
                    (request, key, wanted.message_id, wanted.fingerprint, wanted.sent_at),
                    strict=True,
                ):
                    column.append(value)
        # One transaction. A conflict found only by the second statement refuses its request,
        # whose new claims are then deleted again before the commit, so a refused request
        # claims nothing (the other requests of the round are not affected).
        with self.database.transaction() as conn:
            rows = {bytes(r["claim_key"]): r for r in conn.execute(_CLAIM, params).fetchall()}
            fresh = {key for key, row in rows.items() if row["fresh"]}
            # A claim committed by a concurrent request after this statement's snapshot was
            # neither inserted nor seen: read it in a fresh snapshot (READ COMMITTED).
            missing = [k for k in params[1] if k not in rows]
            if missing:
                rows |= {bytes(r["claim_key"]): r for r in conn.execute(_EARLIER, (missing,))}
            outcomes: list[list[Granted] | BaseException] = []
            refused: list[bytes] = []
            for work in works:
                conflict = _first_conflict(work, rows)
                if conflict is None:
                    outcomes.append(_granted(work, rows))
                else:
                    outcomes.append(ClaimConflict(conflict))
                    refused += [key for key in work.keys if key in fresh]
            if refused:
                conn.execute("DELETE FROM message_claims WHERE claim_key = ANY(%s)", (refused,))
        return outcomes

    def purge(self, now: datetime | None = None) -> int:
        """Delete claims older than the window, a batch at a time; returns how many."""
        deleted = 0
        while True:
            with self.database.connection() as conn:
                count = conn.execute(
                    "DELETE FROM message_claims WHERE claim_key IN ("
                    " SELECT claim_key FROM message_claims"
                    " WHERE created_at < coalesce(%s::timestamptz, now()) - make_interval(secs => %s)"
                    " LIMIT %s)",
                    (now, self.window_seconds, _PURGE_BATCH),
                ).rowcount
            deleted += count
            if count < _PURGE_BATCH:
                return deleted

    def start_purging(self, interval: float = PURGE_INTERVAL_SECONDS) -> None:
        """Purge expired claims in a background thread, at most once per `interval`. Several
        gateways may do so at once: each deletes what is still there."""

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.purge()
                except StoreUnavailable as exc:  # retried at the next interval
                    log.warning("claim purge failed", extra={"error": str(exc)})

        self._purger = threading.Thread(target=run, name="claim-purge", daemon=True)
        self._purger.start()

    def close(self) -> None:
        self._stop.set()
        if self._purger is not None:
            self._purger.join(timeout=5)


def _first_conflict(work: _ClaimWork, rows: dict[bytes, Any]) -> int | None:
    """The index of the request's first client id claimed earlier for another text."""
    for index, (key, wanted) in enumerate(zip(work.keys, work.claims, strict=True)):
        if key in rows and bytes(rows[key]["fingerprint"]) != wanted.fingerprint:
            return index
    return None


def _granted(work: _ClaimWork, rows: dict[bytes, Any]) -> list[Granted]:
    granted: list[Granted] = []
    for key, wanted in zip(work.keys, work.claims, strict=True):
        row = rows[key]
        granted.append(
            Granted(
                wanted.client_id,
                row["message_id"],
                row["sent_at"].astimezone(UTC),  # not the session's time zone
                earlier=row["message_id"] != wanted.message_id,
                acknowledged=row["acknowledged"],
            )
        )
    return granted
