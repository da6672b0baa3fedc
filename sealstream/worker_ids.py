"""Snowflake worker ids leased from Postgres, so that no two processes making message ids (gateway
replicas, autoscaled containers, producers writing straight to Kafka) ever share one.

Public entry point for a process that makes message ids itself::

    from sealstream.settings import Settings
    from sealstream.worker_ids import lease_worker_id

    with lease_worker_id(Settings(), service="importer") as ids:
        message_id = ids.next_id()   # WorkerIdUnavailable (retriable) while no valid lease

How it stays unique (docs/operations.md, "Message ids across processes"):

* Postgres (`worker_leases`, database clock) hands each id to one live holder at a time; the
  holder renews every `renew_seconds` for `ttl_seconds`, and an id whose lease expired (a crashed
  holder) can be taken by another process.
* The holder makes ids only until a local monotonic deadline, `ttl - margin` after the moment it
  *sent* its last successful renewal: the database's expiry comes later than that whatever the
  two clocks read, so it has stopped before anyone may take the id over.
* The same renewal raises the row's fence, `last_ms`, to the holder's clock + ttl, and the holder
  refuses to make an id stamped later than the fence it has recorded. A new holder waits until its
  own clock is past the fence it took over. So the ids of two holders of one worker id fall into
  disjoint millisecond ranges even if their clocks disagree by minutes or one steps backwards.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge

from schemas.ids import EPOCH_MS, SEQUENCE_BITS, WORKER_BITS, SnowflakeIds
from sealstream.adapters.postgres import Database, LeaseHolder, WorkerLeaseRepository
from sealstream.errors import WorkerIdConflict, WorkerIdUnavailable
from sealstream.settings import Settings, WorkerLeaseSettings

log = logging.getLogger(__name__)

WORKER_ID = Gauge(
    "sealstream_worker_id", "Snowflake worker id leased by this process (-1: none held)"
)
WORKER_LEASE_VALID = Gauge(
    "sealstream_worker_lease_valid",
    "1 while this process holds a worker-id lease known to be valid (it may make message ids)",
)
LEASE_RENEWALS = Counter(
    "sealstream_worker_lease_renewals",
    "Worker-id lease renewals by outcome (ok, failed: Postgres error, lost: taken by another)",
    ["outcome"],
)
WORKER_ID.set(-1)

_SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1


class LeaseStore(Protocol):
    """Where leases live (`sealstream.adapters.postgres.WorkerLeaseRepository`)."""

    def acquire(
        self,
        holder: uuid.UUID,
        host: str,
        pid: int,
        service: str,
        ttl_seconds: float,
        fence_ms: int,
        worker_id: int | None = None,
    ) -> tuple[int, int] | None: ...

    def renew(
        self, worker_id: int, holder: uuid.UUID, ttl_seconds: float, fence_ms: int
    ) -> bool: ...

    def release(self, worker_id: int, holder: uuid.UUID, last_ms: int) -> bool: ...

    def holder_of(self, worker_id: int) -> LeaseHolder | None: ...


@dataclass(frozen=True)
class _Grant:
    worker_id: int
    deadline: float  # time.monotonic() from which no id may be made
    ceiling_ms: int  # Unix ms: the fence recorded in Postgres; no id may be stamped later


class LeasedIds(SnowflakeIds):
    """`SnowflakeIds` that make ids only under a worker-id lease known to be valid.

    `next_id()` raises the retriable `WorkerIdUnavailable` (the gateway answers 503 with
    Retry-After) when no lease is held or its local deadline passed. The lease itself is kept by
    `WorkerIdLease`, which grants, extends and revokes it here.
    """

    def __init__(
        self,
        clock_ms: Callable[[], int] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(0, clock_ms)
        self._monotonic = monotonic
        self._grant: _Grant | None = None

    @property
    def valid(self) -> bool:
        grant = self._grant
        return grant is not None and self._monotonic() < grant.deadline

    def check(self) -> None:
        """Raise `WorkerIdUnavailable` unless ids can be made now (for readiness checks)."""
        if not self.valid:
            raise WorkerIdUnavailable("no valid worker-id lease; message ids cannot be made")

    def next_id(self) -> int:
        with self._lock:
            grant = self._grant
            if grant is None or self._monotonic() >= grant.deadline:
                raise WorkerIdUnavailable("no valid worker-id lease; message ids cannot be made")
            now = self._clock() - EPOCH_MS
            if now > self._last_ms:
                self._last_ms, self._sequence = now, 0
            else:
                # The same millisecond, or the clock stepped back: go on from the last stamp.
                # A full millisecond moves on to the next one at once instead of waiting for the
                # clock (which, after a step back, would hang every caller on the lock for as
                # long as the step); the fence below bounds how far ahead that can go.
                self._sequence = (self._sequence + 1) & _SEQUENCE_MASK
                if self._sequence == 0:
                    self._last_ms += 1
            if self._last_ms + EPOCH_MS > grant.ceiling_ms:
                # The wall clock jumped forward (or ids ran ahead of a stepped-back clock up to
                # the fence): this id is dropped, never handed out.
                raise WorkerIdUnavailable("the clock passed the worker-id lease's fence")
            return (
                (self._last_ms << (WORKER_BITS + SEQUENCE_BITS))
                | (grant.worker_id << SEQUENCE_BITS)
                | self._sequence
            )

    def grant(self, worker_id: int, deadline: float, ceiling_ms: int, floor_ms: int) -> None:
        """Make ids as `worker_id` until `deadline` (monotonic), stamped above `floor_ms` (the
        fence taken over from earlier holders) and at most `ceiling_ms` (Unix ms)."""
        with self._lock:
            self.worker_id = worker_id
            floor = floor_ms - EPOCH_MS
            if floor >= self._last_ms:
                # As if the floor's millisecond were full: the next id moves on past it.
                self._last_ms = floor
                self._sequence = _SEQUENCE_MASK
            self._grant = _Grant(worker_id, deadline, ceiling_ms)

    def extend(self, worker_id: int, deadline: float, ceiling_ms: int) -> bool:
        """Extend the current grant after a renewal; False if `worker_id` is not the one held."""
        with self._lock:
            if self._grant is None or self._grant.worker_id != worker_id:
                return False
            # The fence in Postgres only grows (`greatest`), so a renewal sent with a clock that
            # stepped back keeps the higher fence already recorded: ids may go on up to it.
            ceiling_ms = max(ceiling_ms, self._grant.ceiling_ms)
            self._grant = _Grant(worker_id, deadline, ceiling_ms)
            return True

    def revoke(self) -> int:
        """Stop making ids at once; returns the last millisecond (Unix ms) stamped on an id made
        by this generator (or reserved by a floor), -1 if none."""
        with self._lock:
            self._grant = None
            return self._last_ms + EPOCH_MS if self._last_ms >= 0 else -1


class WorkerIdLease:
    """One process's lease on a worker id: acquire, renew from a daemon thread, release.

    `worker_id` None leases any free id; a number leases exactly that id, and `acquire` raises
    `WorkerIdConflict` (naming the holder) while another live process holds it. A renewal that
    finds the lease taken over (this process was cut off from Postgres for longer than the TTL)
    re-acquires, possibly another id, and logs it; ids are refused until then.
    """

    def __init__(
        self,
        store: LeaseStore,
        settings: WorkerLeaseSettings,
        *,
        worker_id: int | None = None,
        service: str = "producer",
        clock_ms: Callable[[], int] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.settings = settings
        self.wanted = worker_id
        self.service = service
        self.holder = uuid.uuid4()
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._monotonic = monotonic
        self._sleep = sleep
        self.ids = LeasedIds(self._clock, monotonic)
        self.worker_id: int | None = None  # the id held, None while none is
        self._floor_ms = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking an id ----------------------------------------------------------------------------

    def acquire(self) -> int:
        """Lease an id and start making ids with it; returns the worker id.

        Raises `WorkerIdConflict` (explicit id held by a live process), `WorkerIdUnavailable`
        (every id is held) or `StoreUnavailable` (Postgres unreachable).
        """
        ttl, ttl_ms = self.settings.ttl_seconds, int(self.settings.ttl_seconds * 1000)
        while True:
            sent, wall = self._monotonic(), self._clock()
            got = self.store.acquire(
                self.holder,
                socket.gethostname(),
                os.getpid(),
                self.service,
                ttl,
                wall + ttl_ms,
                self.wanted,
            )
            if got is None:
                self._refused()
                continue  # the holder's lease expired in between: try again
            worker_id, floor_ms = got
            wait_ms = floor_ms - self._clock() + 1
            if wait_ms > 0:
                # The previous holder's clock is ahead of ours (or it was released a moment
                # ago): ids of ours stamped at or below its fence could equal ids of its.
                log.warning(
                    "waiting for the clock to pass the previous holder's fence",
                    extra={"worker_id": worker_id, "wait_ms": wait_ms},
                )
                self._sleep(wait_ms / 1000)
                sent, wall = self._monotonic(), self._clock()
                if not self.store.renew(worker_id, self.holder, ttl, wall + ttl_ms):
                    continue  # taken over while we waited (the wait outlasted the lease)
            self._floor_ms = floor_ms
            self.worker_id = worker_id
            self.ids.grant(worker_id, self._deadline(sent), wall + ttl_ms, floor_ms)
            # The process's gauges follow the lease that acquired last (a process has one).
            WORKER_ID.set(worker_id)
            WORKER_LEASE_VALID.set_function(lambda: float(self.ids.valid))
            log.info(
                "worker id leased",
                extra={
                    "worker_id": worker_id,
                    "configured": self.wanted is not None,
                    "ttl_seconds": ttl,
                },
            )
            return worker_id

    def _refused(self) -> None:
        if self.wanted is None:
            raise WorkerIdUnavailable(
                "every worker id (0..1023) is leased by a live process; none is free"
            )
        holder = self.store.holder_of(self.wanted)
        if holder is not None:
            raise WorkerIdConflict(
                f"worker id {self.wanted} (SEALSTREAM_WORKER_ID) is leased by {holder.service} "
                f"pid {holder.pid} on {holder.host} for {max(0.0, holder.seconds_left):.0f} more "
                "seconds; configure another id, or leave SEALSTREAM_WORKER_ID unset to lease a "
                "free one"
            )

    def _deadline(self, sent: float) -> float:
        return sent + self.settings.ttl_seconds - self.settings.margin_seconds

    # --- keeping it ------------------------------------------------------------------------------

    def renew_once(self) -> bool:
        """Renew the lease (re-acquire it if lost or not held); True when one is held after."""
        worker_id = self.worker_id
        if worker_id is None:
            return self._reacquire()
        ttl, ttl_ms = self.settings.ttl_seconds, int(self.settings.ttl_seconds * 1000)
        sent, wall = self._monotonic(), self._clock()
        try:
            renewed = self.store.renew(worker_id, self.holder, ttl, wall + ttl_ms)
        except Exception as exc:  # noqa: BLE001 - any failure: keep the grant until its deadline
            LEASE_RENEWALS.labels("failed").inc()
            log.warning(
                "worker id lease not renewed; retrying",
                extra={"worker_id": worker_id, "error": type(exc).__name__},
            )
            return False
        if renewed and self.ids.extend(worker_id, self._deadline(sent), wall + ttl_ms):
            LEASE_RENEWALS.labels("ok").inc()
            return True
        LEASE_RENEWALS.labels("lost").inc()
        self.ids.revoke()
        self.worker_id = None
        WORKER_ID.set(-1)
        log.error(
            "worker id lease lost to another process; leasing again", extra={"worker_id": worker_id}
        )
        return self._reacquire()

    def _reacquire(self) -> bool:
        try:
            self.acquire()
        except Exception as exc:  # noqa: BLE001 - ids stay refused; the next round tries again
            log.error(
                "no worker id leased; message ids are refused until one is",
                extra={"error": type(exc).__name__, "reason": str(exc)},
            )
            return False
        return True

    def start(self) -> None:
        """Renew from a daemon thread every `renew_seconds` (every second after a failure)."""
        self._thread = threading.Thread(target=self._run, name="worker-id-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self.settings.renew_seconds
        while not self._stop.wait(delay):
            ok = self.renew_once()
            delay = self.settings.renew_seconds if ok else min(1.0, self.settings.renew_seconds)

    def close(self) -> None:
        """Stop renewing, stop making ids, and free the id at once (graceful shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        last_ms = self.ids.revoke()
        worker_id, self.worker_id = self.worker_id, None
        WORKER_ID.set(-1)
        if worker_id is None:
            return
        try:
            # The fence drops to what was really used: the next holder need not wait out ours.
            self.store.release(worker_id, self.holder, max(self._floor_ms, last_ms))
        except Exception as exc:  # noqa: BLE001 - it expires by itself after the TTL
            log.warning(
                "worker id lease not released; it expires by itself",
                extra={"worker_id": worker_id, "error": type(exc).__name__},
            )
            return
        log.info("worker id released", extra={"worker_id": worker_id})


@contextmanager
def lease_worker_id(
    settings: Settings, service: str = "producer", database: Database | None = None
) -> Iterator[LeasedIds]:
    """Lease a worker id (settings.worker_id, else any free one) for the `with` block and yield
    its id generator; the lease is renewed in the background and released on exit.

    Opens a small Postgres pool of its own unless `database` is given. Raises at entry
    `WorkerIdConflict` (the configured id is held by a live process), `WorkerIdUnavailable`
    (none free) or `StoreUnavailable` (Postgres down). Inside the block, `next_id()` raises the
    retriable `WorkerIdUnavailable` while the lease is not known to be valid: retry later.
    """
    own = database is None
    db = database if database is not None else Database(settings.postgres, max_size=2)
    if own:
        db.open()
    try:
        lease = WorkerIdLease(
            WorkerLeaseRepository(db),
            settings.worker_lease,
            worker_id=settings.worker_id,
            service=service,
        )
        lease.acquire()
        lease.start()
        try:
            yield lease.ids
        finally:
            lease.close()
    finally:
        if own:
            db.close()
