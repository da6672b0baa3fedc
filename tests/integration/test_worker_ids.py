"""Worker-id leases on the real Postgres: no two holders share an id, an expired lease is taken
over above the previous holder's fence, a lost or unrenewable lease stops the generator, and a
configured id that another live process holds is refused."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from prometheus_client import REGISTRY

from schemas.events import MessageRecord
from schemas.ids import SEQUENCE_BITS, id_millis
from sealstream.adapters.kafka import Publisher
from sealstream.adapters.postgres import Database, WorkerLeaseRepository
from sealstream.auth import mint_token
from sealstream.errors import WorkerIdConflict, WorkerIdUnavailable
from sealstream.record_seal import record_sealer
from sealstream.settings import KafkaSettings, Settings, WorkerLeaseSettings
from sealstream.worker_ids import WorkerIdLease, lease_worker_id

# Short leases, so that expiries and outages show within seconds; renewed every second, a
# holder makes ids until 6 s after its last renewal was sent, so a renewal may come 5 s late
# (a loaded machine) before a healthy holder refuses ids (with a TTL of 3 s it was 1 s).
SHORT = WorkerLeaseSettings(ttl_seconds=8, renew_seconds=1, margin_seconds=2)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def refuses(lease: WorkerIdLease) -> bool:
    try:
        lease.ids.next_id()
    except WorkerIdUnavailable:
        return True
    return False


@pytest.fixture
def leases(database: Database) -> Iterator[Callable[..., WorkerIdLease]]:
    """`make(**kwargs)` builds a lease on the run's schema; every one is closed after the test."""
    made: list[WorkerIdLease] = []

    def make(settings: WorkerLeaseSettings = SHORT, **kwargs: object) -> WorkerIdLease:
        lease = WorkerIdLease(
            WorkerLeaseRepository(database),
            settings,
            service="test",
            **kwargs,  # type: ignore[arg-type]
        )
        made.append(lease)
        return lease

    yield make
    for lease in made:
        lease.close()


def test_concurrent_holders_never_get_the_same_id(
    leases: Callable[..., WorkerIdLease], database: Database
) -> None:
    holders = [leases(WorkerLeaseSettings()) for _ in range(24)]
    start = threading.Barrier(len(holders))
    errors: list[BaseException] = []

    def take(lease: WorkerIdLease) -> None:
        start.wait()
        try:
            lease.acquire()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    worker_ids = [lease.worker_id for lease in holders]
    assert len(set(worker_ids)) == len(holders), sorted(w or -1 for w in worker_ids)

    made: list[list[int]] = [[] for _ in holders]

    def make_ids(i: int) -> None:
        made[i] = [holders[i].ids.next_id() for _ in range(2_000)]

    threads = [threading.Thread(target=make_ids, args=(i,)) for i in range(len(holders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [message_id for ids in made for message_id in ids]
    assert len(every) == 2_000 * len(holders) and len(set(every)) == len(every)

    repo = WorkerLeaseRepository(database)
    for lease in holders:
        worker_id = lease.worker_id
        assert worker_id is not None
        holder = repo.holder_of(worker_id)
        assert holder is not None and holder.pid == os.getpid() and holder.service == "test"
        lease.close()
        assert repo.holder_of(worker_id) is None  # released at once


def test_an_expired_lease_is_taken_over_above_the_previous_fence(
    leases: Callable[..., WorkerIdLease], database: Database
) -> None:
    first = leases()
    taken = first.acquire()  # never renewed: it expires after the TTL
    before = [first.ids.next_id() for _ in range(100)]

    # While it lives, nobody else gets it, not even by asking for it by number.
    with pytest.raises(WorkerIdConflict, match=f"worker id {taken} "):
        leases(worker_id=taken).acquire()

    # The holder stops on its own (local deadline: TTL - margin) before the lease expires.
    wait_for(lambda: refuses(first), timeout=30, what="the unrenewed holder to stop")
    repo = WorkerLeaseRepository(database)
    wait_for(lambda: repo.holder_of(taken) is None, timeout=30, what="the lease to expire")

    second = leases(worker_id=taken)
    assert second.acquire() == taken
    after = [second.ids.next_id() for _ in range(100)]
    assert min(id_millis(m) for m in after) > max(id_millis(m) for m in before)
    assert not set(before) & set(after)

    # The first holder's next renewal finds the id gone and leases another; ids resume with it.
    assert first.renew_once()
    assert first.worker_id is not None and first.worker_id != taken
    resumed = first.ids.next_id()
    assert first.ids.worker_id == first.worker_id and resumed not in after
    assert REGISTRY.get_sample_value("sealstream_worker_id") == first.worker_id


def test_a_lost_lease_makes_the_generator_refuse(
    leases: Callable[..., WorkerIdLease], database: Database
) -> None:
    """A configured id taken over while its holder could not renew: the holder refuses ids until
    the id is free again, then resumes above the other holder's ids."""
    holder = leases(worker_id=701)
    holder.acquire()
    holder.ids.next_id()
    with database.connection() as conn:  # as if the holder had stalled past the TTL
        conn.execute(
            "UPDATE worker_leases SET expires_at = now() - interval '1 second'"
            " WHERE worker_id = 701"
        )
    thief = leases(worker_id=701)
    assert thief.acquire() == 701
    stolen = [thief.ids.next_id() for _ in range(20)]

    assert not holder.renew_once()  # finds it lost; 701 is held live: nothing to lease
    assert refuses(holder) and holder.worker_id is None
    assert not holder.renew_once() and refuses(holder)  # still held: still refused

    thief.close()
    assert holder.renew_once() and holder.worker_id == 701
    assert holder.ids.next_id() > max(stolen)
    # The process's gauges follow the lease that acquired last (one per process outside tests).
    assert REGISTRY.get_sample_value("sealstream_worker_id") == 701
    assert REGISTRY.get_sample_value("sealstream_worker_lease_valid") == 1.0


class TcpRelay:
    """A TCP relay to Postgres that the test can cut and restore: a real network outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown first: a bare close() does not wake the thread blocked in accept(), and
            # the socket would go on accepting.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass


def test_postgres_outage_stops_ids_until_the_lease_is_renewed(
    leases: Callable[..., WorkerIdLease], settings: Settings
) -> None:
    relay = TcpRelay((settings.postgres.host, settings.postgres.port))
    db = Database(settings.postgres.model_copy(update={"port": relay.port}), max_size=2)
    db.open()
    lease = WorkerIdLease(WorkerLeaseRepository(db), SHORT, service="test")
    try:
        taken = lease.acquire()
        lease.start()
        time.sleep(SHORT.ttl_seconds)  # renewals keep it valid past one TTL
        assert not refuses(lease)
        relay.cut()
        wait_for(lambda: refuses(lease), timeout=60, what="ids refused during the outage")
        relay.restore()
        wait_for(lambda: not refuses(lease), timeout=90, what="ids again once Postgres answers")
        assert lease.worker_id == taken  # nobody took it meanwhile: the same id resumes
    finally:
        lease.close()
        relay.cut()
        db.close()


def test_no_free_id_is_refused_as_retriable(
    leases: Callable[..., WorkerIdLease], database: Database
) -> None:
    repo = WorkerLeaseRepository(database)
    squatter = uuid.uuid4()
    try:
        while repo.acquire(squatter, "test", 0, "squatter", 60, 0) is not None:
            pass
        with pytest.raises(WorkerIdUnavailable, match="every worker id"):
            leases().acquire()
    finally:
        with database.connection() as conn:
            conn.execute(
                "UPDATE worker_leases SET holder = NULL, expires_at = '-infinity'"
                " WHERE holder = %s",
                (squatter,),
            )


def test_a_released_configured_id_is_taken_again_at_once(
    leases: Callable[..., WorkerIdLease],
) -> None:
    first = leases(worker_id=700)
    first.acquire()
    last = max(first.ids.next_id() for _ in range(50))
    with pytest.raises(WorkerIdConflict) as refused:
        leases(worker_id=700).acquire()
    message = str(refused.value)
    assert "is leased by test pid" in message and socket.gethostname() in message
    first.close()

    second = leases(worker_id=700)
    assert second.acquire() == 700
    assert second.ids.next_id() > last


def test_gateway_answers_503_while_it_holds_no_lease(
    leases: Callable[..., WorkerIdLease],
    kafka_topic_factory: Callable[[str], KafkaSettings],
    settings: Settings,
    database: Database,
) -> None:
    """The gateway with a configured id that another process took over: 503 + Retry-After (and
    not ready) until it has the id again, then 202 with ids above the other holder's."""
    from ingest.wiring import build

    cfg = settings.model_copy(
        update={"kafka": kafka_topic_factory("leases"), "worker_id": 702, "worker_lease": SHORT}
    )
    headers = {"Authorization": f"Bearer {mint_token(cfg.auth, 'quinn')}"}
    app, close = build(cfg)
    try:
        with TestClient(app) as client:
            created = client.post("/v1/chats", json={"participants": []}, headers=headers)
            assert created.status_code == 201, created.text
            url = f"/v1/chats/{created.json()['chat_id']}/messages"

            def post() -> Response:
                return client.post(url, json={"text": "hello"}, headers=headers)

            first = post()
            assert first.status_code == 202, first.text
            assert (int(first.json()["message_id"]) >> SEQUENCE_BITS) & 1023 == 702

            with database.connection() as conn:  # as if the gateway had stalled past the TTL
                conn.execute(
                    "UPDATE worker_leases SET expires_at = now() - interval '1 second'"
                    " WHERE worker_id = 702"
                )
            thief = leases(worker_id=702)
            thief.acquire()
            stolen = thief.ids.next_id()
            wait_for(lambda: post().status_code == 503, timeout=60, what="503 without a lease")
            refused = post()
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "unavailable"
            assert client.get("/readyz").status_code == 503

            thief.close()
            wait_for(lambda: client.get("/readyz").status_code == 200, 60, "lease back")
            again = post()
            assert again.status_code == 202, again.text
            assert int(again.json()["message_id"]) > stolen
    finally:
        close()


def test_direct_producers_lease_their_own_ids(
    kafka_topic_factory: Callable[[str], KafkaSettings],
    settings: Settings,
    database: Database,
    kms: Any,
) -> None:
    """The docs' example for a process that publishes to Kafka itself (docs/operations.md,
    "Message ids across processes"), run twice at once: two ids, released on exit."""
    kms.ensure_key(settings.vault.default_key)  # as `sealstream migrate` does
    cfg = settings.model_copy(update={"kafka": kafka_topic_factory("producers")})
    publisher = Publisher(cfg.kafka, client_id="importer")
    sealer = record_sealer(cfg)
    topic = cfg.kafka.messages_topic
    repo = WorkerLeaseRepository(database)
    try:
        with (
            lease_worker_id(cfg, service="importer") as ids,
            lease_worker_id(cfg, service="importer") as other,
        ):
            assert ids.worker_id != other.worker_id
            record = MessageRecord(
                message_id=ids.next_id(),
                chat_id=uuid.uuid4(),
                sender_id="importer",
                text="imported",
                sent_at=datetime.now(UTC),
            )
            value, headers = sealer.seal(topic, record.key(), record.change_id, record.value())
            publisher.publish(topic, [(record.key(), value)], headers=headers)
            held = (ids.worker_id, other.worker_id)
            assert all(repo.holder_of(w) is not None for w in held)
            with pytest.raises(WorkerIdConflict):  # a configured id is leased too
                with lease_worker_id(cfg.model_copy(update={"worker_id": ids.worker_id})):
                    pass
        assert all(repo.holder_of(w) is None for w in held)
    finally:
        sealer.close()
        publisher.close()


def test_a_clock_stepped_back_neither_hangs_nor_stops_ids(
    leases: Callable[..., WorkerIdLease], database: Database
) -> None:
    """The host's clock steps back an hour (an operator, a VM restored, NTP stepping): the
    generator keeps its ids unique and increasing without waiting for the clock to catch up. It
    used to spin, holding its lock, once a millisecond's 4,096 sequence numbers were used (every
    post hung, and the renewal thread, blocked on the lock, let the lease lapse), and after the
    next renewal it refused every id until the clock was back (503 for an hour)."""
    wall = [int(time.time() * 1000)]
    lease = leases(
        WorkerLeaseSettings(ttl_seconds=30, renew_seconds=10, margin_seconds=5),
        clock_ms=lambda: wall[0],
    )
    lease.acquire()
    before = [lease.ids.next_id() for _ in range(10)]
    stepped_from = wall[0]
    wall[0] -= 3_600_000  # stepped back one hour, and it stays there for the test

    made: list[int] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            made.extend(lease.ids.next_id() for _ in range(10_000))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=make, daemon=True)
    worker.start()
    worker.join(timeout=60)
    hung = worker.is_alive()
    if hung:
        wall[0] = stepped_from + 1  # let the old code's spin end so teardown can run
        worker.join(timeout=60)
    assert not hung, f"next_id hung after {len(made)} ids with the clock stepped back"
    assert errors == []
    assert len(set(made)) == 10_000 and made == sorted(made) and made[0] > max(before)

    # A renewal with the clock still back: ids go on (the fence recorded in Postgres only grows).
    assert lease.renew_once()
    more = [lease.ids.next_id() for _ in range(10)]
    assert more[0] > made[-1] and len(set(more)) == 10
