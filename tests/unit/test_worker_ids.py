"""The leased id generator on a small in-memory lease store and fake clocks: when it refuses ids,
how it steps over the previous holder's fence, what it hands back on release. The store's SQL is
tested against Postgres in tests/integration/test_worker_ids.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from schemas.ids import EPOCH_MS, MAX_WORKER, SEQUENCE_BITS, WORKER_BITS, id_millis
from sealstream.adapters.postgres import LeaseHolder
from sealstream.errors import StoreUnavailable, WorkerIdConflict, WorkerIdUnavailable
from sealstream.services import settings_env
from sealstream.settings import Settings, WorkerLeaseSettings
from sealstream.worker_ids import WorkerIdLease

LEASE = WorkerLeaseSettings(ttl_seconds=30, renew_seconds=10, margin_seconds=5)
T0 = EPOCH_MS + 1_000_000


class Clocks:
    """Wall clock (Unix ms) and monotonic clock (s) that only move when told to."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += int(seconds * 1000)
        self.mono += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


@dataclass
class Row:
    holder: uuid.UUID | None = None
    expires: float = float("-inf")
    fence: int = 0


class MemoryLeases:
    """`LeaseStore` in memory; `now` is the database clock in seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.rows = {w: Row() for w in range(MAX_WORKER + 1)}
        self.down = False

    def acquire(
        self,
        holder: uuid.UUID,
        host: str,
        pid: int,
        service: str,
        ttl_seconds: float,
        fence_ms: int,
        worker_id: int | None = None,
    ) -> tuple[int, int] | None:
        self._check()
        free = [w for w, r in self.rows.items() if r.expires < self.now and worker_id in (None, w)]
        if not free:
            return None
        chosen = min(free, key=lambda w: (self.rows[w].fence, w))
        row, floor = self.rows[chosen], self.rows[chosen].fence
        row.holder, row.expires, row.fence = holder, self.now + ttl_seconds, max(floor, fence_ms)
        return chosen, floor

    def renew(self, worker_id: int, holder: uuid.UUID, ttl_seconds: float, fence_ms: int) -> bool:
        self._check()
        row = self.rows[worker_id]
        if row.holder != holder:
            return False
        row.expires, row.fence = self.now + ttl_seconds, max(row.fence, fence_ms)
        return True

    def release(self, worker_id: int, holder: uuid.UUID, last_ms: int) -> bool:
        self._check()
        row = self.rows[worker_id]
        if row.holder != holder:
            return False
        row.holder, row.expires, row.fence = None, float("-inf"), last_ms
        return True

    def holder_of(self, worker_id: int) -> LeaseHolder | None:
        row = self.rows[worker_id]
        if row.expires < self.now:
            return None
        return LeaseHolder(worker_id, "host-a", 42, "ingest", row.expires - self.now)

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("Postgres unavailable: OperationalError")


def lease_on(store: MemoryLeases, clocks: Clocks, worker_id: int | None = None) -> WorkerIdLease:
    return WorkerIdLease(
        store,
        LEASE,
        worker_id=worker_id,
        service="ingest",
        clock_ms=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
        sleep=clocks.sleep,
    )


def worker_of(message_id: int) -> int:
    return (message_id >> SEQUENCE_BITS) & ((1 << WORKER_BITS) - 1)


def test_no_ids_before_a_lease_nor_after_its_local_deadline() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease = lease_on(store, clocks)
    with pytest.raises(WorkerIdUnavailable):
        lease.ids.next_id()
    worker = lease.acquire()
    assert worker_of(lease.ids.next_id()) == worker

    clocks.advance(LEASE.ttl_seconds - LEASE.margin_seconds - 0.001)
    lease.ids.next_id()  # still inside ttl - margin
    clocks.advance(0.002)
    with pytest.raises(WorkerIdUnavailable) as refused:
        lease.ids.next_id()
    assert refused.value.retriable  # -> 503 with Retry-After at the gateway
    assert lease.renew_once()
    lease.ids.next_id()  # renewed: valid again, same id
    assert lease.worker_id == worker


def test_failed_renewals_keep_the_grant_until_its_deadline_only() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease = lease_on(store, clocks)
    lease.acquire()
    store.down = True
    clocks.advance(LEASE.renew_seconds)
    assert not lease.renew_once()
    lease.ids.next_id()  # the last renewal still holds
    clocks.advance(LEASE.ttl_seconds - LEASE.margin_seconds - LEASE.renew_seconds)
    with pytest.raises(WorkerIdUnavailable):
        lease.ids.next_id()
    store.down = False
    assert lease.renew_once()
    lease.ids.next_id()


def test_a_new_holder_waits_past_the_previous_fence_even_with_a_slower_clock() -> None:
    store, fast, slow = MemoryLeases(), Clocks(), Clocks()
    slow.wall -= 4_000  # this host's clock is 4 s behind the first holder's
    first = lease_on(store, fast, worker_id=5)
    first.acquire()
    made = [first.ids.next_id() for _ in range(10)]
    store.now += LEASE.ttl_seconds + 1  # the first holder crashed; its lease expired
    fast.advance(LEASE.ttl_seconds - LEASE.margin_seconds - 0.5)
    made.append(first.ids.next_id())  # the latest id it could still make

    fence = store.rows[5].fence
    second = lease_on(store, slow, worker_id=5)
    assert second.acquire() == 5
    later = second.ids.next_id()
    assert id_millis(later) > fence
    assert id_millis(later) > max(id_millis(m) for m in made)


def test_an_id_past_the_recorded_fence_is_never_handed_out() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease = lease_on(store, clocks)
    lease.acquire()
    clocks.wall += int(LEASE.ttl_seconds * 1000) + 1  # wall clock stepped forward, not monotonic
    with pytest.raises(WorkerIdUnavailable, match="fence"):
        lease.ids.next_id()


def test_a_lost_lease_is_leased_again_possibly_as_another_id() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease = lease_on(store, clocks)
    first = lease.acquire()
    store.rows[first].holder = uuid.uuid4()  # taken over by another process
    assert lease.renew_once()
    assert lease.worker_id is not None and lease.worker_id != first
    assert worker_of(lease.ids.next_id()) == lease.worker_id


def test_a_configured_id_held_elsewhere_is_refused_naming_the_holder() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease_on(store, clocks, worker_id=9).acquire()
    with pytest.raises(WorkerIdConflict) as refused:
        lease_on(store, clocks, worker_id=9).acquire()
    assert str(refused.value).startswith(
        "worker id 9 (SEALSTREAM_WORKER_ID) is leased by ingest pid 42 on host-a"
    )
    assert not refused.value.retriable


def test_release_hands_back_the_last_millisecond_really_used() -> None:
    store, clocks = MemoryLeases(), Clocks()
    lease = lease_on(store, clocks)
    worker = lease.acquire()
    assert store.rows[worker].fence == T0 + LEASE.ttl_seconds * 1000  # reserved ahead
    last = max(lease.ids.next_id() for _ in range(5))
    lease.close()
    assert store.rows[worker].holder is None
    assert store.rows[worker].fence == id_millis(last)  # the next holder need not wait
    with pytest.raises(WorkerIdUnavailable):
        lease.ids.next_id()


def test_worker_id_is_leased_unless_configured_and_lease_timings_are_checked() -> None:
    assert Settings().worker_id is None
    assert "SEALSTREAM_WORKER_ID" not in settings_env(Settings())
    assert settings_env(Settings(worker_id=3))["SEALSTREAM_WORKER_ID"] == "3"
    with pytest.raises(ValueError, match="renew_seconds"):
        WorkerLeaseSettings(ttl_seconds=10, renew_seconds=8, margin_seconds=2)


def test_compose_services_do_not_pin_a_worker_id() -> None:
    """A worker id in the shared compose environment would make every scaled gateway replica
    but one refuse to start; they lease theirs."""
    from tests.unit.test_compose import PROJECT_SERVICES, environment

    for service in ("migrate", *PROJECT_SERVICES):
        assert "SEALSTREAM_WORKER_ID" not in environment(service), service
