"""A Postgres restart (or a failover, or an operator's `pg_terminate_backend`) closes every
connection the pool holds. The next use of the pool must get a live connection, not the dead
one: otherwise each pooled connection fails one request after every restart (the fault drills
saw `AdminShutdown` from an idle pool long after Postgres was back)."""

from __future__ import annotations

import threading
import time

from sealstream.adapters.postgres import Database
from sealstream.errors import StoreUnavailable
from sealstream.settings import Settings
from tests.tcp_proxy import proxy


def _terminate_backends(other: Database, application_pids: list[int]) -> None:
    with other.connection() as conn:
        for pid in application_pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_pool_replaces_connections_the_server_closed(settings: Settings) -> None:
    for deadline in (None, 2.0):  # workers' pools and the gateway's
        pool = Database(settings.postgres, max_size=4, deadline=deadline)
        admin = Database(settings.postgres, max_size=1)
        pool.open()
        admin.open()
        try:
            # Fill the pool with several connections, then have the server close all of them.
            held = [pool.connection() for _ in range(3)]
            pids = [cm.__enter__().info.backend_pid for cm in held]
            for cm in held:
                cm.__exit__(None, None, None)
            _terminate_backends(admin, pids)

            for _ in range(6):  # more uses than the pool has dead connections
                with pool.connection() as conn:
                    assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        finally:
            pool.close()
            admin.close()


def test_checking_a_pooled_connection_on_a_hung_server_keeps_the_deadline(
    settings: Settings,
) -> None:
    """The liveness check of a pooled connection is a round trip too: on a hung server (the
    process stopped, the network black-holed: bytes accepted, nothing answered) it must end
    within the deadline like any other use, with `StoreUnavailable`, not wait forever."""
    deadline = 2.0
    with proxy(settings.postgres.host, settings.postgres.port) as postgres:
        db = Database(
            settings.postgres.model_copy(update={"port": postgres.port}),
            max_size=2,
            deadline=deadline,
        )
        db.open()
        try:
            with db.connection() as conn:  # an idle pooled connection from now on
                conn.execute("SELECT 1")
            postgres.pause()
            outcome: list[object] = []

            def use() -> None:
                started = time.monotonic()
                try:
                    with db.connection() as conn:
                        conn.execute("SELECT 1")
                    outcome.append("answered")
                except StoreUnavailable as exc:
                    outcome.append((exc, time.monotonic() - started))

            worker = threading.Thread(target=use, daemon=True)
            worker.start()
            worker.join(30)  # far beyond the bound: a hang, not a slow answer
            assert not worker.is_alive(), "a use of the pool hung on a hung Postgres"
            assert len(outcome) == 1 and isinstance(outcome[0], tuple), outcome
            _, seconds = outcome[0]
            # The deadline for the check and the deadline (plus the watchdog's grace) for the
            # statement; generous for a loaded machine (the gateway tests' bound for the same
            # 2 s deadline: a 2-core machine under load answered in up to 11 s), and below the
            # 30 s that tells a hang.
            assert seconds < 20
        finally:
            postgres.forward()
            db.close()
