"""Time-ordered 64-bit message ids (Snowflake style) and the Cassandra time bucket of an id.

Layout (most significant first): 1 bit zero | 41 bits milliseconds since 2026-01-01T00:00Z |
10 bits worker id | 12 bits sequence. Ids sort by time, so Cassandra clusters a chat newest first
by id alone, and the bucket of a message can be computed from its id without a lookup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
WORKER_BITS = 10
SEQUENCE_BITS = 12
MAX_WORKER = (1 << WORKER_BITS) - 1
BUCKET_MS = 10 * 24 * 3600 * 1000  # ten days per partition bucket, as Discord does


def id_millis(message_id: int) -> int:
    """Unix time in ms at which the id was made."""
    return (message_id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS


def bucket_of(message_id: int) -> int:
    return (message_id >> (WORKER_BITS + SEQUENCE_BITS)) // BUCKET_MS


def bucket_at(unix_ms: int) -> int:
    return max(0, unix_ms - EPOCH_MS) // BUCKET_MS


def first_id_at(unix_ms: int) -> int:
    """The smallest id any worker can make at `unix_ms` (ids below it are strictly older)."""
    return max(0, unix_ms - EPOCH_MS) << (WORKER_BITS + SEQUENCE_BITS)


class SnowflakeIds:
    """Thread-safe id generator for one worker id. Ids are unique only while no other process
    uses the same worker id: processes lease theirs (`sealstream.worker_ids`)."""

    def __init__(self, worker_id: int, clock_ms: Callable[[], int] | None = None) -> None:
        if not 0 <= worker_id <= MAX_WORKER:
            raise ValueError(f"worker_id must be within 0..{MAX_WORKER}")
        self.worker_id = worker_id
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._last_ms = -1
        self._sequence = 0

    def next_id(self) -> int:
        with self._lock:
            return self._next_locked()

    def _next_locked(self) -> int:
        """The next id; the caller holds `self._lock`."""
        now = self._clock() - EPOCH_MS
        if now < self._last_ms:
            now = self._last_ms  # clock went backwards: keep ids monotonic
        if now == self._last_ms:
            self._sequence = (self._sequence + 1) & ((1 << SEQUENCE_BITS) - 1)
            if self._sequence == 0:
                while now <= self._last_ms:  # 4096 ids in this ms: wait for the next one
                    now = self._clock() - EPOCH_MS
        else:
            self._sequence = 0
        self._last_ms = now
        return (
            (now << (WORKER_BITS + SEQUENCE_BITS))
            | (self.worker_id << SEQUENCE_BITS)
            | (self._sequence)
        )


def id_time(message_id: int) -> datetime:
    """The time (UTC, ms precision) at which the id was made: the one clock of record for a
    message (retention, row times), whatever the producer's `sent_at` says."""
    return datetime.fromtimestamp(id_millis(message_id) / 1000, tz=UTC)
