"""Durable idempotency claims of client message ids, in Postgres (table `message_claims`).

One row per (chat, sender, client message id), keyed by sha256 of the three (ids may contain
any character; none is stored, though a guessed triple can be confirmed). The row holds the
message id given to the first request, a keyed fingerprint of its text bound to the claim, its
`sent_at` and whether Kafka acknowledged it. The claims of a request are one transaction. A
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
from collections.abc import Sequence
from datetime import UTC, datetime

from ingest.ports import Claim, ClaimConflict, Granted
from sealstream.adapters.postgres import Database
from sealstream.errors import StoreUnavailable

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 60.0
_PURGE_BATCH = 10_000

# One statement (one round trip, atomic) for every claim of a request: read the earlier claims,
# and insert the new ones unless an earlier one has another fingerprint (a conflict refuses the
# whole request, so it must claim nothing). `existing` sees the table as it was before this
# statement, i.e. the earlier claims only.
_CLAIM = """
WITH wanted AS (
    SELECT * FROM unnest(%s::bytea[], %s::bigint[], %s::bytea[], %s::timestamptz[])
        AS w(claim_key, message_id, fingerprint, sent_at)
), existing AS (
    SELECT c.claim_key, c.message_id, c.fingerprint, c.sent_at, c.acknowledged
    FROM message_claims c JOIN wanted USING (claim_key)
), inserted AS (
    INSERT INTO message_claims (claim_key, message_id, fingerprint, sent_at)
    SELECT claim_key, message_id, fingerprint, sent_at FROM wanted
    WHERE NOT EXISTS (
        SELECT 1 FROM existing e JOIN wanted w USING (claim_key)
        WHERE e.fingerprint <> w.fingerprint
    )
    ON CONFLICT (claim_key) DO NOTHING
    RETURNING claim_key, message_id, fingerprint, sent_at, acknowledged
)
SELECT * FROM inserted UNION ALL SELECT * FROM existing
"""
_EARLIER = """
SELECT claim_key, message_id, fingerprint, sent_at, acknowledged
FROM message_claims WHERE claim_key = ANY(%s)
"""


def claim_key(chat_id: uuid.UUID, sender: str, client_id: str) -> bytes:
    return hashlib.sha256("\0".join((str(chat_id), sender, client_id)).encode()).digest()


class PostgresClaims:
    """`ingest.ports.ClaimStore` on the gateway's Postgres pool."""

    def __init__(self, database: Database, window_hours: float = 24.0) -> None:
        self.database = database
        self.window_seconds = window_hours * 3600
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    def claim(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Claim]) -> list[Granted]:
        keys = [claim_key(chat_id, sender, c.client_id) for c in claims]
        params = (
            keys,
            [c.message_id for c in claims],
            [c.fingerprint for c in claims],
            [c.sent_at for c in claims],
        )
        # One transaction: a conflict found only by the second statement rolls back the new
        # claims of the first, so a refused request claims nothing.
        with self.database.transaction() as conn:
            rows = {bytes(r["claim_key"]): r for r in conn.execute(_CLAIM, params).fetchall()}
            # A claim committed by a concurrent request after this statement's snapshot was
            # neither inserted nor seen: read it in a fresh snapshot (READ COMMITTED).
            missing = [k for k in keys if k not in rows]
            if missing:
                rows |= {bytes(r["claim_key"]): r for r in conn.execute(_EARLIER, (missing,))}
            for index, (key, wanted) in enumerate(zip(keys, claims, strict=True)):
                if key in rows and bytes(rows[key]["fingerprint"]) != wanted.fingerprint:
                    raise ClaimConflict(index)  # rolls back what this request inserted
        granted: list[Granted] = []
        for key, wanted in zip(keys, claims, strict=True):
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

    def acknowledge(self, chat_id: uuid.UUID, sender: str, claims: Sequence[Granted]) -> None:
        keys = [claim_key(chat_id, sender, c.client_id) for c in claims]
        with self.database.connection() as conn:
            conn.execute(
                "UPDATE message_claims SET acknowledged = true"
                " WHERE claim_key = ANY(%s) AND NOT acknowledged",
                (keys,),
            )

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
