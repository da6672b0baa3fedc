"""A Postgres restart (or a failover, or an operator's `pg_terminate_backend`) closes every
connection the pool holds. The next use of the pool must get a live connection, not the dead
one: otherwise each pooled connection fails one request after every restart (the fault drills
saw `AdminShutdown` from an idle pool long after Postgres was back)."""

from __future__ import annotations

from sealstream.adapters.postgres import Database
from sealstream.settings import Settings


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
