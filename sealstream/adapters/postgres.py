"""Postgres adapter: the connection pool, schema migrations, and the chat / DEK history tables.

Only wrapped DEKs (Transit ciphertext) are stored here; a plaintext DEK never reaches Postgres.
psycopg errors are translated at this boundary: connection trouble becomes the retriable
`StoreUnavailable`, everything else stays a programming error.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from sealstream.deletion_state import ChatState
from sealstream.errors import (
    KeyDestroyed,
    KeyNotFound,
    MembershipRefused,
    SealstreamError,
    StoreUnavailable,
)
from sealstream.settings import PostgresSettings

Row = dict[str, Any]
log = logging.getLogger(__name__)
# NOTIFY channel of membership changes (payload: the chat id), sent in the transaction that adds
# or removes a participant or deletes a chat: live delivery re-checks its subscribers at once.
MEMBERSHIP_CHANNEL = "sealstream_membership"
MAX_CHAT_PARTICIPANTS = 1000  # the chats table's CHECK (schemas/postgres/001_keys.sql)
_MIGRATION_LOCK = 0x5EA15
_TRANSIENT = (psycopg.OperationalError, psycopg.errors.AdminShutdown)


@dataclass(frozen=True)
class ChatRow:
    chat_id: uuid.UUID
    tenant_id: str
    participants: tuple[str, ...]
    state: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TenantRow:
    tenant_id: str
    kms_key_name: str
    region: str | None  # `tenants.kms_address`: a region name, None for the default KMS


@dataclass(frozen=True)
class DekRow:
    chat_id: uuid.UUID
    dek_version: int
    encrypted_dek: str | None
    kms_key_name: str
    state: str
    valid_from: datetime
    valid_to: datetime | None


@dataclass(frozen=True)
class AuditRecord:
    """An audit row to write in the same transaction as the key change it records: the change
    and its record commit together or not at all (a reason Postgres refuses undoes the change).
    Methods that destroy DEK versions append ` (DEK versions destroyed: [...])` to `reason`."""

    actor: str
    action: str
    reason: str


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str
    action: str
    chat_id: uuid.UUID | None
    dek_version: int | None
    reason: str


class Database:
    """A pool of connections to one schema of one Postgres database.

    With a `deadline` (seconds; the gateway's), no use of the database waits longer than about
    that: pool checkout and connection set-up time out, the server cancels longer statements
    (`statement_timeout`) and ends transactions idle that long
    (`idle_in_transaction_session_timeout`), and a watchdog shuts the socket of a connection
    held longer than the deadline plus a grace, since a hung server answers nothing, not even
    a cancellation.
    Each case raises `StoreUnavailable`. Without one (CLI jobs, workers), only the defaults of
    libpq and the pool apply: a long migration or rewrap must not be cut short.
    """

    def __init__(
        self, settings: PostgresSettings, max_size: int = 8, deadline: float | None = None
    ) -> None:
        self.settings = settings
        self.deadline = deadline
        kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if deadline is not None:
            kwargs |= {
                "connect_timeout": max(1, math.ceil(deadline)),  # libpq: whole seconds
                # A server that vanished (host down, partition) is noticed by TCP itself.
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 1,
                "keepalives_count": 3,
                "tcp_user_timeout": int(deadline * 1000),
            }
        self._pool = ConnectionPool(
            settings.conninfo(),
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs=kwargs,
            configure=self._configure if deadline is not None else None,
            timeout=deadline if deadline is not None else 30.0,
        )
        self._max_size = max_size
        self._watchdog = _Watchdog() if deadline is not None else None

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        assert self.deadline is not None
        conn.execute(f"SET statement_timeout = {int(self.deadline * 1000)}")
        # A transaction whose client went silent (the watchdog shut our side, but a hung
        # network never told the server) is ended by the server, with its row locks.
        conn.execute(f"SET idle_in_transaction_session_timeout = {int(self.deadline * 1000)}")

    def open(self, timeout: float = 10.0) -> None:
        try:
            self._pool.open(wait=True, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - psycopg_pool raises its own PoolTimeout
            raise StoreUnavailable(
                f"Postgres at {self.settings.host}:{self.settings.port} did not accept a "
                f"connection ({type(exc).__name__}); is the stack up? `sealstream stack up`"
            ) from None

    def close(self) -> None:
        self._pool.close()
        if self._watchdog is not None:
            self._watchdog.stop()

    def _checkout(self) -> psycopg.Connection[Any]:
        """A pooled connection that answered an empty query just now.

        A Postgres restart, a failover or `pg_terminate_backend` closes every connection the
        pool holds; unchecked, each would fail the next use made of it. A dead one is handed
        back (the pool discards it and opens a new one) and the next is tried at once: the
        pool's own `check=` waits a back-off of a second or more between two dead connections,
        longer than the gateway's deadline.
        """
        timeout = self.deadline if self.deadline is not None else 30.0
        give_up = time.monotonic() + timeout
        for _ in range(self._max_size + 1):
            conn = self._pool.getconn(timeout=max(0.001, give_up - time.monotonic()))
            try:
                if self._watchdog is None:
                    ConnectionPool.check_connection(conn)
                else:
                    # The check is a round trip like any other: on a hung server it would wait
                    # forever, so it runs under the watchdog for the time left.
                    severed = threading.Event()
                    left = max(0.001, give_up - time.monotonic())
                    with self._watchdog.guard(conn, left + _WATCHDOG_GRACE, severed):
                        ConnectionPool.check_connection(conn)
            except psycopg.Error:
                self._pool.putconn(conn)
                if time.monotonic() >= give_up:
                    break
                continue
            return conn
        raise psycopg.OperationalError("no pooled connection answered in time")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Row]]:
        try:
            conn = self._checkout()
            try:
                with conn:  # commits, or rolls back on an error; the pool keeps it open
                    if self._watchdog is None or self.deadline is None:
                        yield cast("psycopg.Connection[Row]", conn)
                        return
                    severed = threading.Event()
                    try:
                        with self._watchdog.guard(conn, self.deadline + _WATCHDOG_GRACE, severed):
                            yield cast("psycopg.Connection[Row]", conn)
                    finally:
                        # Severed while its holder was not waiting on it (descheduled, or
                        # between two statements), the use may have ended without an error:
                        # close it so that the pool never hands out a connection whose socket
                        # is shut.
                        if severed.is_set():
                            conn.close()
            finally:
                self._pool.putconn(conn)
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"Postgres unavailable: {type(exc).__name__}") from None

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Row]]:
        with self.connection() as conn, conn.transaction():
            yield conn

    # --- migrations -------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply the SQL files of schemas/postgres in order; returns those newly applied."""
        schema = self.settings.schema_name
        files = sorted(
            (f for f in resources.files("schemas").joinpath("postgres").iterdir()),
            key=lambda f: f.name,
        )
        applied: list[str] = []
        with self.transaction() as conn:
            # Serialises concurrent `migrate` runs (two workers starting together).
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            conn.execute(f'SET LOCAL search_path TO "{schema}"')
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in conn.execute("SELECT name FROM schema_migrations")}
            for file in files:
                if not file.name.endswith(".sql") or file.name in done:
                    continue
                conn.execute(file.read_text())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (file.name,))
                applied.append(file.name)
        return applied

    def drop_schema(self) -> None:
        """Tests only: remove this run's schema entirely."""
        with self.connection() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.settings.schema_name}" CASCADE')


# Lets the server's statement_timeout answer first when the server is alive but slow.
_WATCHDOG_GRACE = 0.25


class _Watchdog:
    """One thread that shuts down the socket of any connection held past its deadline.

    psycopg has no client-side query timeout: a statement sent to a hung server (stopped
    process, black-holed network) waits forever, and a cancel request would hang the same way.
    Shutting the socket down makes the blocked call fail at once with an `OperationalError`;
    the pool then discards the broken connection.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._armed: dict[int, tuple[float, psycopg.Connection[Any], threading.Event]] = {}
        self._next_token = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pg-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(
        self, conn: psycopg.Connection[Any], seconds: float, severed: threading.Event
    ) -> Iterator[None]:
        """Shut `conn`'s socket if still held after `seconds`; `severed` is then set (final
        once this context has exited)."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._armed[token] = (time.monotonic() + seconds, conn, severed)
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._armed.pop(token, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                expired = [t for t, (when, _, _) in self._armed.items() if when <= now]
                for token in expired:
                    _, conn, severed = self._armed.pop(token)
                    _sever(conn)
                    severed.set()
                upcoming = [when for when, _, _ in self._armed.values()]
                self._lock.wait(timeout=min(upcoming) - now if upcoming else None)


def _sever(conn: psycopg.Connection[Any]) -> None:
    """Shut down the connection's socket (not close: libpq still owns the descriptor)."""
    try:
        duplicate = socket.socket(fileno=os.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return  # already closed
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


def _chat(row: Row) -> ChatRow:
    return ChatRow(
        chat_id=row["chat_id"],
        tenant_id=row["tenant_id"],
        participants=tuple(row["participants"]),
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _dek(row: Row) -> DekRow:
    return DekRow(
        chat_id=row["chat_id"],
        dek_version=row["dek_version"],
        encrypted_dek=row["encrypted_dek"],
        kms_key_name=row["kms_key_name"],
        state=row["state"],
        valid_from=row["valid_from"],
        valid_to=row["valid_to"],
    )


class ChatKeyRepository:
    """Reads and writes the `tenants`, `chats` and `chat_deks` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def upsert_tenant(
        self,
        tenant_id: str,
        kms_key_name: str,
        region: str | None = None,
        audit: AuditRecord | None = None,
    ) -> None:
        """Store a tenant's master key and the region of its KMS (None: the default KMS), with
        `audit` (action `tenant_key_set`) in the same transaction."""
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO tenants (tenant_id, kms_key_name, kms_address) VALUES (%s, %s, %s)"
                " ON CONFLICT (tenant_id) DO UPDATE SET kms_key_name = EXCLUDED.kms_key_name,"
                " kms_address = EXCLUDED.kms_address",
                (tenant_id, kms_key_name, region),
            )
            _audit(conn, audit, None, None)

    def tenant(self, tenant_id: str) -> TenantRow | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT tenant_id, kms_key_name, kms_address FROM tenants WHERE tenant_id = %s",
                (tenant_id,),
            ).fetchone()
        return None if row is None else TenantRow(*row.values())

    def tenants_with_key(self, kms_key_name: str) -> list[TenantRow]:
        """The tenants whose master key is `kms_key_name` (normally one), else the tenant of a DEK
        wrapped by it (a key the tenant used before it changed key name)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT tenant_id, kms_key_name, kms_address FROM tenants"
                " WHERE kms_key_name = %s ORDER BY tenant_id",
                (kms_key_name,),
            ).fetchall()
            if not rows:
                rows = conn.execute(
                    "SELECT t.tenant_id, t.kms_key_name, t.kms_address FROM chat_deks d"
                    " JOIN chats c USING (chat_id) JOIN tenants t USING (tenant_id)"
                    " WHERE d.kms_key_name = %s LIMIT 1",
                    (kms_key_name,),
                ).fetchall()
        return [TenantRow(*r.values()) for r in rows]

    def tenant_key_name(self, tenant_id: str) -> str | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT kms_key_name FROM tenants WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        return None if row is None else str(row["kms_key_name"])

    def create_chat(
        self,
        chat_id: uuid.UUID,
        tenant_id: str,
        participants: tuple[str, ...],
        encrypted_dek: str,
        kms_key_name: str,
        audit: AuditRecord | None = None,
    ) -> bool:
        """Insert the chat and its DEK version 1 (and `audit`, in the same transaction); False
        if the chat already existed."""
        with self.db.transaction() as conn:
            inserted = conn.execute(
                "INSERT INTO chats (chat_id, tenant_id, participants) VALUES (%s, %s, %s)"
                " ON CONFLICT (chat_id) DO NOTHING",
                (chat_id, tenant_id, list(participants)),
            ).rowcount
            if inserted == 0:
                return False
            conn.execute(
                "INSERT INTO chat_deks (chat_id, dek_version, encrypted_dek, kms_key_name, state)"
                " VALUES (%s, 1, %s, %s, 'active')",
                (chat_id, encrypted_dek, kms_key_name),
            )
            _audit(conn, audit, chat_id, 1)
        return True

    def chat(self, chat_id: uuid.UUID) -> ChatRow | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT * FROM chats WHERE chat_id = %s", (chat_id,)).fetchone()
        return None if row is None else _chat(row)

    def active_dek(self, chat_id: uuid.UUID) -> DekRow | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM chat_deks WHERE chat_id = %s AND state = 'active'", (chat_id,)
            ).fetchone()
        return None if row is None else _dek(row)

    def dek(self, chat_id: uuid.UUID, version: int) -> DekRow | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM chat_deks WHERE chat_id = %s AND dek_version = %s",
                (chat_id, version),
            ).fetchone()
        return None if row is None else _dek(row)

    def deks(self, chat_id: uuid.UUID) -> list[DekRow]:
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT * FROM chat_deks WHERE chat_id = %s ORDER BY dek_version", (chat_id,)
            ).fetchall()
        return [_dek(r) for r in rows]

    def add_version(
        self,
        chat_id: uuid.UUID,
        expected_current: int,
        new_version: int,
        encrypted_dek: str,
        kms_key_name: str,
        audit: AuditRecord | None = None,
    ) -> int:
        """Retire `expected_current` and make a new active version, unless someone already did
        (`audit` is written with the new version, in the same transaction).

        The chat row is locked for the transaction, so of two processes rotating the same chat at
        once exactly one creates a version; the other sees the moved pointer and returns it.
        """
        with self.db.transaction() as conn:
            locked = conn.execute(
                "SELECT state FROM chats WHERE chat_id = %s FOR UPDATE", (chat_id,)
            ).fetchone()
            if locked is None:
                raise KeyNotFound(f"chat {chat_id} does not exist")
            if locked["state"] != "active":
                raise KeyDestroyed(f"chat {chat_id} was deleted")
            current = conn.execute(
                "SELECT dek_version FROM chat_deks WHERE chat_id = %s AND state = 'active'",
                (chat_id,),
            ).fetchone()
            if current is not None and current["dek_version"] != expected_current:
                return int(current["dek_version"])
            conn.execute(
                "UPDATE chat_deks SET state = 'retired', valid_to = now()"
                " WHERE chat_id = %s AND state = 'active'",
                (chat_id,),
            )
            conn.execute(
                "INSERT INTO chat_deks (chat_id, dek_version, encrypted_dek, kms_key_name, state)"
                " VALUES (%s, %s, %s, %s, 'active')",
                (chat_id, new_version, encrypted_dek, kms_key_name),
            )
            conn.execute("UPDATE chats SET updated_at = now() WHERE chat_id = %s", (chat_id,))
            _audit(conn, audit, chat_id, new_version)
        return new_version

    # --- lifecycle ------------------------------------------------------------------------------

    def shred_chat(self, chat_id: uuid.UUID, audit: AuditRecord | None = None) -> list[int]:
        """Mark the chat deleted and destroy every DEK version (the wrapped key is erased), with
        `audit` in the same transaction.

        Returns the versions destroyed by this call (empty when already shredded).
        """
        with self.db.transaction() as conn:
            locked = conn.execute(
                "SELECT state FROM chats WHERE chat_id = %s FOR UPDATE", (chat_id,)
            ).fetchone()
            if locked is None:
                raise KeyNotFound(f"chat {chat_id} does not exist")
            conn.execute(
                "UPDATE chats SET state = 'deleted', updated_at = now() WHERE chat_id = %s",
                (chat_id,),
            )
            rows = conn.execute(
                "UPDATE chat_deks SET state = 'destroyed', encrypted_dek = NULL,"
                " destroyed_at = now(), valid_to = coalesce(valid_to, now())"
                " WHERE chat_id = %s AND state <> 'destroyed' RETURNING dek_version",
                (chat_id,),
            ).fetchall()
            destroyed = sorted(int(r["dek_version"]) for r in rows)
            _audit(conn, audit, chat_id, max(destroyed, default=None), destroyed)
            _notify_membership(conn, chat_id)
        return destroyed

    def set_participant(
        self, chat_id: uuid.UUID, user_id: str, present: bool, audit: AuditRecord
    ) -> tuple[ChatRow, bool] | None:
        """Add (`present`) or remove `user_id` from the chat's participants, with `audit`
        (`participant_added` / `participant_removed`, the user named in `reason`) and a NOTIFY
        on `MEMBERSHIP_CHANNEL`, all in one transaction. Returns the chat after the change and
        whether anything changed (adding a participant twice changes nothing and records
        nothing), or None for an unknown chat. A deleted chat is returned unchanged."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM chats WHERE chat_id = %s FOR UPDATE", (chat_id,)
            ).fetchone()
            if row is None:
                return None
            chat = _chat(row)
            members = list(chat.participants)
            if chat.state == "deleted" or (user_id in members) == present:
                return chat, False
            members = [*members, user_id] if present else [m for m in members if m != user_id]
            # The table's CHECK (schemas/postgres/001): refused here by name, not as a 500.
            if not members:
                raise MembershipRefused(
                    "the last participant cannot leave or be removed; delete the chat instead"
                )
            if len(members) > MAX_CHAT_PARTICIPANTS:
                raise MembershipRefused(f"a chat has at most {MAX_CHAT_PARTICIPANTS} participants")
            updated = conn.execute(
                "UPDATE chats SET participants = %s, updated_at = now() WHERE chat_id = %s"
                " RETURNING *",
                (members, chat_id),
            ).fetchone()
            assert updated is not None
            _audit(conn, audit, chat_id, None)
            _notify_membership(conn, chat_id)
        return _chat(updated), True

    def audit(
        self,
        actor: str,
        action: str,
        chat_id: uuid.UUID | None,
        dek_version: int | None,
        reason: str = "",
    ) -> None:
        with self.db.connection() as conn:
            conn.execute(
                "INSERT INTO key_audit (actor, action, chat_id, dek_version, reason)"
                " VALUES (%s, %s, %s, %s, %s)",
                (actor, action, chat_id, dek_version, reason),
            )

    def audit_entries(self, chat_id: uuid.UUID | None = None, limit: int = 100) -> list[AuditEntry]:
        query = "SELECT * FROM key_audit"
        params: tuple[object, ...] = ()
        if chat_id is not None:
            query += " WHERE chat_id = %s"
            params = (chat_id,)
        with self.db.connection() as conn:
            rows = conn.execute(query + " ORDER BY id DESC LIMIT %s", (*params, limit)).fetchall()
        return [
            AuditEntry(
                r["at"], r["actor"], r["action"], r["chat_id"], r["dek_version"], r["reason"]
            )
            for r in rows
        ]

    def wrapped_page(
        self, kms_key_name: str, after_id: int, limit: int
    ) -> list[tuple[int, uuid.UUID, int, str]]:
        """Live wrapped DEKs of one master key, in id order after `after_id` (for rewrap jobs)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT id, chat_id, dek_version, encrypted_dek FROM chat_deks"
                " WHERE kms_key_name = %s AND encrypted_dek IS NOT NULL AND id > %s"
                " ORDER BY id LIMIT %s",
                (kms_key_name, after_id, limit),
            ).fetchall()
        return [(r["id"], r["chat_id"], r["dek_version"], r["encrypted_dek"]) for r in rows]

    def replace_wrapped(
        self, updates: list[tuple[int, str, str]], audit: AuditRecord | None = None
    ) -> int:
        """Swap (id, old, new) wrapped DEKs; a row shredded or changed meanwhile is left alone.
        `audit` is written for each row swapped, in the same transaction."""
        changed = 0
        with self.db.transaction() as conn:
            for row_id, old, new in updates:
                row = conn.execute(
                    "UPDATE chat_deks SET encrypted_dek = %s WHERE id = %s AND encrypted_dek = %s"
                    " RETURNING chat_id, dek_version",
                    (new, row_id, old),
                ).fetchone()
                if row is not None:
                    changed += 1
                    _audit(conn, audit, row["chat_id"], row["dek_version"])
        return changed

    def chats_due(
        self,
        cutoff: datetime,
        after: uuid.UUID | None,
        limit: int,
        tenant_id: str | None = None,
        max_messages: int | None = None,
    ) -> list[tuple[uuid.UUID, int]]:
        """Active chats (of one tenant, or all) whose active DEK became valid before `cutoff`
        or has sealed at least `max_messages` messages."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT d.chat_id, d.dek_version FROM chat_deks d JOIN chats c USING (chat_id)"
                " WHERE d.state = 'active' AND c.state = 'active'"
                " AND (d.valid_from < %s OR d.messages_sealed >= %s)"
                " AND d.chat_id > %s AND (%s::text IS NULL OR c.tenant_id = %s)"
                " ORDER BY d.chat_id LIMIT %s",
                (
                    cutoff,
                    max_messages if max_messages is not None else 2**62,
                    after or uuid.UUID(int=0),
                    tenant_id,
                    tenant_id,
                    limit,
                ),
            ).fetchall()
        return [(r["chat_id"], r["dek_version"]) for r in rows]

    def db_now(self) -> datetime:
        """The database's clock (DEK validity times are written by it)."""
        with self.db.connection() as conn:
            row = conn.execute("SELECT now() AS now").fetchone()
        assert row is not None
        return row["now"]  # type: ignore[no-any-return]

    def add_usage(
        self, counts: dict[tuple[uuid.UUID, int], int]
    ) -> list[tuple[uuid.UUID, int, int]]:
        """Add messages sealed per (chat, DEK version); returns each active version's new total."""
        if not counts:
            return []
        chats, versions, amounts = zip(
            *((chat, version, n) for (chat, version), n in sorted(counts.items())), strict=True
        )
        with self.db.connection() as conn:
            rows = conn.execute(
                "UPDATE chat_deks d SET messages_sealed = d.messages_sealed + u.n"
                " FROM unnest(%s::uuid[], %s::int[], %s::bigint[]) AS u(chat_id, v, n)"
                " WHERE d.chat_id = u.chat_id AND d.dek_version = u.v AND d.state = 'active'"
                " RETURNING d.chat_id, d.dek_version, d.messages_sealed",
                (list(chats), list(versions), list(amounts)),
            ).fetchall()
        return [(r["chat_id"], r["dek_version"], r["messages_sealed"]) for r in rows]

    def set_retention(
        self,
        days: int | None,
        tenant_id: str | None = None,
        chat_id: uuid.UUID | None = None,
        audit: AuditRecord | None = None,
    ) -> None:
        """Set (or clear, with None) the retention of a tenant or of one chat, with `audit`
        (action `retention_set`) in the same transaction: retention decides when DEK versions
        are destroyed."""
        with self.db.transaction() as conn:
            if chat_id is not None:
                conn.execute(
                    "UPDATE chats SET retention_days = %s WHERE chat_id = %s", (days, chat_id)
                )
            else:
                conn.execute(
                    "UPDATE tenants SET retention_days = %s WHERE tenant_id = %s", (days, tenant_id)
                )
            _audit(conn, audit, chat_id, None)

    def active_chats(self) -> list[tuple[uuid.UUID, datetime]]:
        """(chat id, created at) of every active chat, by chat id."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT chat_id, created_at FROM chats WHERE state = 'active' ORDER BY chat_id"
            ).fetchall()
        return [(r["chat_id"], r["created_at"]) for r in rows]

    def chats_with_retention(self) -> list[tuple[uuid.UUID, int, datetime]]:
        """Active chats with a retention period (the chat's own, else its tenant's)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT c.chat_id, coalesce(c.retention_days, t.retention_days) AS days,"
                " c.created_at FROM chats c JOIN tenants t USING (tenant_id)"
                " WHERE c.state = 'active'"
                " AND coalesce(c.retention_days, t.retention_days) IS NOT NULL"
                " ORDER BY c.chat_id"
            ).fetchall()
        return [(r["chat_id"], int(r["days"]), r["created_at"]) for r in rows]

    def chat_states(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, ChatState]:
        """`ChatState` (state, retention days: the chat's own, else its tenant's; tenant) of
        each known chat, in one query (the workers' deletion check, once per batch)."""
        if not chat_ids:
            return {}
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT c.chat_id, c.state, c.tenant_id,"
                " coalesce(c.retention_days, t.retention_days) AS days"
                " FROM chats c JOIN tenants t USING (tenant_id) WHERE c.chat_id = ANY(%s)",
                (list(chat_ids),),
            ).fetchall()
        return {r["chat_id"]: ChatState(r["state"], r["days"], r["tenant_id"]) for r in rows}

    def member_chats(
        self, user_id: str, limit: int, chat_ids: Collection[uuid.UUID] | None = None
    ) -> list[ChatRow]:
        """The chats `user_id` belongs to now (its id is in `participants`) that are not deleted,
        newest first, at most `limit`; only those of `chat_ids` when given (unknown ids, and
        chats the user is not in, are simply absent). Answered by the GIN index on participants
        (schemas/postgres/009_participants_index.sql); read per search, never cached, so a user
        removed from a chat stops finding it at once."""
        sql = (
            "SELECT chat_id, tenant_id, participants, state, created_at, updated_at FROM chats"
            " WHERE participants @> ARRAY[%s]::text[] AND state <> 'deleted'"
        )
        params: list[Any] = [user_id]
        if chat_ids is not None:
            sql += " AND chat_id = ANY(%s)"
            params.append(list(chat_ids))
        sql += " ORDER BY created_at DESC, chat_id LIMIT %s"
        params.append(limit)
        with self.db.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_chat(r) for r in rows]

    def destroy_versions_retired_before(
        self,
        chat_id: uuid.UUID,
        cutoff: datetime,
        below_version: int | None = None,
        audit: AuditRecord | None = None,
        audit_if_none: bool = True,
    ) -> list[int]:
        """Destroy retired DEK versions whose validity ended before `cutoff` (no message left),
        optionally only those below `below_version`. `audit` is written in the same transaction
        (also when nothing was destroyed, unless `audit_if_none` is False)."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                "UPDATE chat_deks SET state = 'destroyed', encrypted_dek = NULL,"
                " destroyed_at = now() WHERE chat_id = %s AND state = 'retired'"
                " AND valid_to < %s AND (%s::int IS NULL OR dek_version < %s)"
                " RETURNING dek_version",
                (chat_id, cutoff, below_version, below_version),
            ).fetchall()
            destroyed = sorted(int(r["dek_version"]) for r in rows)
            if destroyed or audit_if_none:
                _audit(conn, audit, chat_id, max(destroyed, default=None), destroyed)
        return destroyed


def _notify_membership(conn: psycopg.Connection[Row], chat_id: uuid.UUID) -> None:
    """Announce a membership change of `chat_id`; Postgres delivers it only if the caller's
    transaction commits (and at once after the commit)."""
    conn.execute("SELECT pg_notify(%s, %s)", (MEMBERSHIP_CHANNEL, str(chat_id)))


class MembershipListener:
    """LISTENs on `MEMBERSHIP_CHANNEL` on a connection of its own, in a daemon thread, and calls
    `on_change(chat_id)` for each notification; `on_change(None)` after (re)connecting, since
    notifications sent while it was not listening are lost (the caller re-checks everything).
    Reconnects every `retry_seconds` while Postgres is away."""

    def __init__(
        self,
        settings: PostgresSettings,
        on_change: Callable[[uuid.UUID | None], None],
        retry_seconds: float = 1.0,
    ) -> None:
        self.settings = settings
        self.on_change = on_change
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="membership-listener", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once the first LISTEN is in place (or after `timeout`)."""
        self._thread.start()
        self._listening.wait(timeout)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.settings.conninfo(), autocommit=True, connect_timeout=5
                ) as conn:
                    conn.execute(f"LISTEN {MEMBERSHIP_CHANNEL}")
                    self._listening.set()
                    if not first:
                        self.on_change(None)
                    first = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            try:
                                chat_id = uuid.UUID(note.payload)
                            except ValueError:
                                continue
                            self.on_change(chat_id)
            except psycopg.Error as exc:
                self._listening.clear()
                log.warning(
                    "membership listener lost Postgres", extra={"error": type(exc).__name__}
                )
                self._stop.wait(self.retry_seconds)


def _audit(
    conn: psycopg.Connection[Row],
    record: AuditRecord | None,
    chat_id: uuid.UUID | None,
    dek_version: int | None,
    destroyed: list[int] | None = None,
) -> None:
    """Insert `record` on `conn` (inside the caller's transaction); nothing when None."""
    if record is None:
        return
    reason = record.reason
    if destroyed is not None:
        reason += f" (DEK versions destroyed: {destroyed or 'none'})"
    conn.execute(
        "INSERT INTO key_audit (actor, action, chat_id, dek_version, reason)"
        " VALUES (%s, %s, %s, %s, %s)",
        (record.actor, record.action, chat_id, dek_version, reason),
    )


# --- worker-id leases -----------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a worker id, for the operator reading an error or the table."""

    worker_id: int
    host: str
    pid: int | None
    service: str
    seconds_left: float  # until the lease expires by the database's clock (<= 0: expired)


class WorkerLeaseRepository:
    """The `worker_leases` table: one row per Snowflake worker id (0..1023), leased to a process.

    Every time is the database's `now()`, so the processes' clocks never decide who holds an id.
    `fence_ms` values are Unix milliseconds of the *process* clock: the highest id timestamp the
    holder may use; they only ever grow (`greatest`) until the holder releases the lease.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

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
        """Lease a free or expired worker id (`worker_id` only, when given) for `ttl_seconds`.

        Returns (worker id, previous fence in Unix ms), or None when no id (or not the wanted one)
        is free. SELECT ... FOR UPDATE SKIP LOCKED rather than INSERT ... ON CONFLICT: the 1024
        rows exist already and the question is *which* free row, so concurrent starters each lock
        a different candidate instead of queueing on one and then finding it taken. The row's
        expiry is checked again on the locked version, so a live lease is never taken over.
        Candidates go by oldest fence first: a new holder then rarely has to wait for its clock.
        """
        params = {
            "holder": holder,
            "host": host,
            "pid": pid,
            "service": service,
            "ttl": ttl_seconds,
            "fence": fence_ms,
            "wanted": worker_id,
        }
        with self.db.connection() as conn:
            try:
                conn.execute("SELECT 1 FROM worker_leases LIMIT 1")
            except psycopg.errors.UndefinedTable:
                raise StoreUnavailable(
                    "the worker_leases table does not exist (run `sealstream migrate`)"
                ) from None
            # READ COMMITTED may drop the one candidate it locked if a concurrent holder took it
            # meanwhile (the LIMIT is not refilled); try again while a free id still exists.
            for _ in range(10):
                row = conn.execute(
                    "WITH pick AS ("
                    " SELECT worker_id, last_ms FROM worker_leases"
                    " WHERE expires_at < now()"
                    " AND (%(wanted)s::int IS NULL OR worker_id = %(wanted)s::int)"
                    " ORDER BY last_ms, worker_id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                    " UPDATE worker_leases AS w SET holder = %(holder)s, host = %(host)s,"
                    " pid = %(pid)s, service = %(service)s, acquired_at = now(),"
                    " expires_at = now() + make_interval(secs => %(ttl)s),"
                    " last_ms = greatest(w.last_ms, %(fence)s)"
                    " FROM pick WHERE w.worker_id = pick.worker_id AND w.expires_at < now()"
                    " RETURNING w.worker_id, pick.last_ms AS floor_ms",
                    params,
                ).fetchone()
                if row is not None:
                    return int(row["worker_id"]), int(row["floor_ms"])
                free = conn.execute(
                    "SELECT count(*) AS n FROM worker_leases WHERE expires_at < now()"
                    " AND (%(wanted)s::int IS NULL OR worker_id = %(wanted)s::int)",
                    params,
                ).fetchone()
                if free is None or free["n"] == 0:
                    return None
        return None

    def renew(self, worker_id: int, holder: uuid.UUID, ttl_seconds: float, fence_ms: int) -> bool:
        """Extend the lease to now() + ttl and raise its fence; False if `holder` lost it.

        Deliberately not conditional on the lease being unexpired: while `holder` is still the
        holder, nobody else has held the id since, so picking it up again is safe.
        """
        with self.db.connection() as conn:
            row = conn.execute(
                "UPDATE worker_leases SET expires_at = now() + make_interval(secs => %s),"
                " last_ms = greatest(last_ms, %s) WHERE worker_id = %s AND holder = %s"
                " RETURNING worker_id",
                (ttl_seconds, fence_ms, worker_id, holder),
            ).fetchone()
        return row is not None

    def release(self, worker_id: int, holder: uuid.UUID, last_ms: int) -> bool:
        """Free the id at once (graceful stop), its fence set to `last_ms`: the holder's last
        used millisecond, which the caller guarantees is >= the fence it took over."""
        with self.db.connection() as conn:
            row = conn.execute(
                "UPDATE worker_leases SET holder = NULL, expires_at = '-infinity',"
                " last_ms = %s WHERE worker_id = %s AND holder = %s RETURNING worker_id",
                (last_ms, worker_id, holder),
            ).fetchone()
        return row is not None

    def holder_of(self, worker_id: int) -> LeaseHolder | None:
        """The live holder of `worker_id`, None when the id is free or its lease expired."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT worker_id, host, pid, service,"
                " extract(epoch FROM expires_at - now())::float8 AS seconds_left"
                " FROM worker_leases WHERE worker_id = %s AND expires_at >= now()",
                (worker_id,),
            ).fetchone()
        if row is None:
            return None
        return LeaseHolder(
            row["worker_id"], row["host"], row["pid"], row["service"], row["seconds_left"]
        )


# --- blind index keys and re-index progress (schemas/postgres/008_blind_index.sql) ------------


@dataclass(frozen=True)
class IndexKeyRow:
    """One version of a tenant's blind-index key as stored: wrapped only (None once destroyed)."""

    tenant_id: str
    key_version: int
    wrapped_key: str | None
    kms_key_name: str
    state: str  # active | retiring | destroyed
    created_at: datetime


@dataclass(frozen=True)
class ReindexJob:
    """Progress of a tenant's re-index under its newest index key (`search_reindex` row)."""

    tenant_id: str
    target_version: int
    state: str  # pending | running | done
    after_chat: uuid.UUID | None
    chats_done: int
    messages_done: int
    swept: int
    requested_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class IndexKeyConflict(SealstreamError):
    """The tenant's blind-index state does not allow the change (already on, re-index running)."""


class IndexKeyRepository:
    """The `tenant_index_keys` and `search_reindex` tables, and the tenants' `blind_index` mode."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def mode(self, tenant_id: str) -> str | None:
        """'off' | 'enabling' | 'on'; None for an unknown tenant."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT blind_index FROM tenants WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        return None if row is None else str(row["blind_index"])

    def keys(self, tenant_id: str) -> list[IndexKeyRow]:
        """Every version of the tenant's index key, newest first."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT tenant_id, key_version, wrapped_key, kms_key_name, state, created_at"
                " FROM tenant_index_keys WHERE tenant_id = %s ORDER BY key_version DESC",
                (tenant_id,),
            ).fetchall()
        return [IndexKeyRow(**r) for r in rows]

    def chat_tenants(self, chat_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The tenant of each known chat among `chat_ids` (a chat never changes tenant)."""
        if not chat_ids:
            return {}
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT chat_id, tenant_id FROM chats WHERE chat_id = ANY(%s)", (list(chat_ids),)
            ).fetchall()
        return {r["chat_id"]: str(r["tenant_id"]) for r in rows}

    def add_key(
        self,
        tenant_id: str,
        wrapped_key: str,
        kms_key_name: str,
        new_version: int,
        enable: bool,
        audit: AuditRecord,
    ) -> None:
        """Store `new_version` as the tenant's active index key (the previous active one becomes
        'retiring'), switch the tenant to 'enabling' when `enable`, and (re)start its re-index
        row, all with `audit` in one transaction. Raises `IndexKeyConflict` when `enable` and
        the blind index is on already, when rotating a tenant whose blind index is off, while a
        re-index is unfinished, or when another process made `new_version` first."""
        with self.db.transaction() as conn:
            tenant = conn.execute(
                "SELECT blind_index FROM tenants WHERE tenant_id = %s FOR UPDATE", (tenant_id,)
            ).fetchone()
            if tenant is None:
                raise KeyNotFound(f"unknown tenant '{tenant_id}'")
            mode = tenant["blind_index"]
            if enable and mode != "off":
                raise IndexKeyConflict(f"tenant '{tenant_id}': the blind index is {mode} already")
            if not enable and mode == "off":
                raise IndexKeyConflict(f"tenant '{tenant_id}': the blind index is off")
            job = conn.execute(
                "SELECT state FROM search_reindex WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
            if job is not None and job["state"] != "done":
                raise IndexKeyConflict(
                    f"tenant '{tenant_id}': a re-index is unfinished; finish it first "
                    f"(`sealstream search reindex --tenant {tenant_id}`)"
                )
            newest = conn.execute(
                "SELECT max(key_version) AS v FROM tenant_index_keys WHERE tenant_id = %s",
                (tenant_id,),
            ).fetchone()
            if ((newest or {}).get("v") or 0) + 1 != new_version:
                raise IndexKeyConflict(f"tenant '{tenant_id}': index key changed meanwhile")
            conn.execute(
                "UPDATE tenant_index_keys SET state = 'retiring', retired_at = now()"
                " WHERE tenant_id = %s AND state = 'active'",
                (tenant_id,),
            )
            conn.execute(
                "INSERT INTO tenant_index_keys"
                " (tenant_id, key_version, wrapped_key, kms_key_name, state)"
                " VALUES (%s, %s, %s, %s, 'active')",
                (tenant_id, new_version, wrapped_key, kms_key_name),
            )
            if enable:
                conn.execute(
                    "UPDATE tenants SET blind_index = 'enabling' WHERE tenant_id = %s",
                    (tenant_id,),
                )
            conn.execute(
                "INSERT INTO search_reindex (tenant_id, target_version, state) "
                " VALUES (%s, %s, 'pending') ON CONFLICT (tenant_id) DO UPDATE SET"
                " target_version = excluded.target_version, state = 'pending', after_chat = NULL,"
                " chats_done = 0, messages_done = 0, swept = 0, requested_at = now(),"
                " updated_at = now(), finished_at = NULL",
                (tenant_id, new_version),
            )
            _audit(conn, audit, None, new_version)

    def reindex_job(self, tenant_id: str) -> ReindexJob | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM search_reindex WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        return None if row is None else ReindexJob(**row)

    def reindex_jobs(self) -> list[ReindexJob]:
        with self.db.connection() as conn:
            rows = conn.execute("SELECT * FROM search_reindex ORDER BY tenant_id").fetchall()
        return [ReindexJob(**r) for r in rows]

    def tenant_chats(
        self, tenant_id: str, after: uuid.UUID | None, limit: int
    ) -> list[tuple[uuid.UUID, datetime]]:
        """Active chats of a tenant in chat-id order after `after`: (chat id, created at)."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT chat_id, created_at FROM chats WHERE tenant_id = %s AND state = 'active'"
                " AND (%s::uuid IS NULL OR chat_id > %s::uuid) ORDER BY chat_id LIMIT %s",
                (tenant_id, after, after, limit),
            ).fetchall()
        return [(r["chat_id"], r["created_at"]) for r in rows]

    def record_progress(
        self,
        tenant_id: str,
        target_version: int,
        after_chat: uuid.UUID | None,
        chats: int,
        messages: int,
        swept: int,
    ) -> bool:
        """Save how far the re-index got; False if the row no longer targets this version."""
        with self.db.connection() as conn:
            changed = conn.execute(
                "UPDATE search_reindex SET state = 'running', after_chat = %s,"
                " chats_done = chats_done + %s, messages_done = messages_done + %s,"
                " swept = swept + %s, updated_at = now()"
                " WHERE tenant_id = %s AND target_version = %s AND state <> 'done'",
                (after_chat, chats, messages, swept, tenant_id, target_version),
            ).rowcount
        return changed == 1

    def finish_reindex(self, tenant_id: str, target_version: int, audit: AuditRecord) -> list[int]:
        """Destroy every index-key version below the target (wrapped key erased), turn the blind
        index 'on' and mark the re-index done, with `audit`, in one transaction. Returns the
        versions destroyed."""
        with self.db.transaction() as conn:
            conn.execute(
                "SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE", (tenant_id,)
            ).fetchone()
            done = conn.execute(
                "UPDATE search_reindex SET state = 'done', finished_at = now(), updated_at = now()"
                " WHERE tenant_id = %s AND target_version = %s AND state <> 'done'",
                (tenant_id, target_version),
            ).rowcount
            if done == 0:
                return []
            rows = conn.execute(
                "UPDATE tenant_index_keys SET state = 'destroyed', wrapped_key = NULL,"
                " destroyed_at = now() WHERE tenant_id = %s AND key_version < %s"
                " AND state <> 'destroyed' RETURNING key_version",
                (tenant_id, target_version),
            ).fetchall()
            conn.execute("UPDATE tenants SET blind_index = 'on' WHERE tenant_id = %s", (tenant_id,))
            destroyed = sorted(int(r["key_version"]) for r in rows)
            record = AuditRecord(
                audit.actor,
                audit.action,
                f"{audit.reason} (index key versions destroyed: {destroyed or 'none'})",
            )
            _audit(conn, record, None, target_version)
        return destroyed

    @contextmanager
    def reindex_lock(self, tenant_id: str) -> Iterator[bool]:
        """Hold the tenant's re-index lock (a session advisory lock on a connection kept for
        the whole job) if no other process does; yields whether it was taken. A process that
        dies loses its connection and with it the lock, so a restarted job can go on at once."""
        name = f"{self.db.settings.schema_name}:search-reindex:{tenant_id}".encode()
        lock_id = int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
        with self.db.connection() as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s) AS taken", (lock_id,)).fetchone()
            taken = bool(row and row["taken"])
            try:
                yield taken
            finally:
                if taken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))


# --- dead-letter replays (schemas/postgres/011_dead_letter_replays.sql) ----------------------


@dataclass(frozen=True)
class ReplayRow:
    """One dead letter's replays: where the last one landed, who made the first and the last."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    origin_topic: str
    replayed_partition: int
    replayed_offset: int
    first_replayed_at: datetime
    first_replayed_by: str
    last_replayed_at: datetime
    last_replayed_by: str
    replays: int


@dataclass(frozen=True)
class ReplayDone:
    """A replay the broker acknowledged, to record (coordinates only: never a value)."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    replayed_partition: int
    replayed_offset: int
    chat_id: uuid.UUID | None  # the record key, when it is a chat id (for the audit trail)


class DeadLetterReplays:
    """Which dead letters were replayed, by whom and when; each replay also audited in
    `key_audit` (action `dead_letter_replayed`) in the same transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def replayed(
        self, dlq_topic: str, coordinates: Collection[tuple[int, int]]
    ) -> dict[tuple[int, int], ReplayRow]:
        """The replay rows of these letters (partition, offset) of `dlq_topic`, by coordinates."""
        if not coordinates:
            return {}
        partitions = [p for p, _ in coordinates]
        offsets = [o for _, o in coordinates]
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT r.* FROM dead_letter_replays r"
                " JOIN unnest(%s::integer[], %s::bigint[]) AS c(p, o)"
                " ON r.dlq_partition = c.p AND r.dlq_offset = c.o WHERE r.dlq_topic = %s",
                (partitions, offsets, dlq_topic),
            ).fetchall()
        return {
            (r["dlq_partition"], r["dlq_offset"]): ReplayRow(
                **{k: r[k] for k in ReplayRow.__dataclass_fields__}
            )
            for r in rows
        }

    @contextmanager
    def claim(self, dlq_topic: str, partition: int, offset: int) -> Iterator[bool]:
        """Hold a letter for a replay while the block runs: True if held, False if another
        replay (another process) holds it now. A Postgres session advisory lock, released when
        the block ends, or by the server when this process or its connection dies: no claim
        outlives its holder."""
        key = f"dead-letter-replay/{self.db.settings.schema_name}/{dlq_topic}/{partition}:{offset}"
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS held", (key,)
            ).fetchone()
            held = bool(row and row["held"])
            try:
                yield held
            finally:
                if held:
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))

    def record(self, done: ReplayDone, actor: str) -> int:
        """Record an acknowledged replay and audit it; returns how many times it was replayed."""
        with self.db.transaction() as conn:
            row = conn.execute(
                "INSERT INTO dead_letter_replays (dlq_topic, dlq_partition, dlq_offset,"
                " origin_topic, origin_partition, origin_offset, replayed_partition,"
                " replayed_offset, first_replayed_by, last_replayed_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE SET"
                " replayed_partition = EXCLUDED.replayed_partition,"
                " replayed_offset = EXCLUDED.replayed_offset,"
                " last_replayed_at = now(), last_replayed_by = EXCLUDED.last_replayed_by,"
                " replays = dead_letter_replays.replays + 1"
                " RETURNING replays",
                (
                    done.dlq_topic,
                    done.dlq_partition,
                    done.dlq_offset,
                    done.origin_topic,
                    done.origin_partition,
                    done.origin_offset,
                    done.replayed_partition,
                    done.replayed_offset,
                    actor,
                    actor,
                ),
            ).fetchone()
            reason = (
                f"dead letter {done.dlq_topic}/{done.dlq_partition}:{done.dlq_offset}"
                f" (from {done.origin_topic}/{done.origin_partition}:{done.origin_offset})"
                f" replayed to {done.origin_topic}/{done.replayed_partition}:"
                f"{done.replayed_offset}"
            )
            _audit(conn, AuditRecord(actor, "dead_letter_replayed", reason), done.chat_id, None)
        assert row is not None
        return int(row["replays"])


# --- topic keys of the sealed message topic (schemas/postgres/012_topic_keys.sql) ------------


@dataclass(frozen=True)
class TopicKeyRow:
    """One topic data key as stored: wrapped only (None once destroyed)."""

    key_id: str
    topic: str
    valid_from: datetime
    valid_to: datetime
    kms_key_name: str
    wrapped: str | None
    destroyed_at: datetime | None


def _topic_key(row: Row) -> TopicKeyRow:
    return TopicKeyRow(
        row["key_id"],
        row["topic"],
        row["valid_from"],
        row["valid_to"],
        row["kms_key_name"],
        row["wrapped"],
        row["destroyed_at"],
    )


class TopicKeyRepository:
    """The `topic_keys` table: the wrapped data keys that seal the message topic's records."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def for_slot(self, topic: str, valid_from: datetime) -> TopicKeyRow | None:
        """The key of `topic`'s rotation slot starting at `valid_from`, if one was made."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM topic_keys WHERE topic = %s AND valid_from = %s",
                (topic, valid_from),
            ).fetchone()
        return None if row is None else _topic_key(row)

    def claim_slot(self, candidate: TopicKeyRow) -> TopicKeyRow:
        """Store `candidate` as its slot's key unless another producer stored one first;
        returns the slot's key either way (so every producer of the topic uses the same one)."""
        with self.db.connection() as conn:
            conn.execute(
                "INSERT INTO topic_keys (key_id, topic, valid_from, valid_to, kms_key_name,"
                " wrapped) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (topic, valid_from) DO NOTHING",
                (
                    candidate.key_id,
                    candidate.topic,
                    candidate.valid_from,
                    candidate.valid_to,
                    candidate.kms_key_name,
                    candidate.wrapped,
                ),
            )
            row = conn.execute(
                "SELECT * FROM topic_keys WHERE topic = %s AND valid_from = %s",
                (candidate.topic, candidate.valid_from),
            ).fetchone()
        assert row is not None  # inserted above, or by the producer that won the race
        return _topic_key(row)

    def by_id(self, key_id: str) -> TopicKeyRow | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT * FROM topic_keys WHERE key_id = %s", (key_id,)).fetchone()
        return None if row is None else _topic_key(row)

    def live_topics(self) -> list[str]:
        """The topics that have at least one key not destroyed yet."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT DISTINCT topic FROM topic_keys WHERE destroyed_at IS NULL ORDER BY topic"
            ).fetchall()
        return [str(r["topic"]) for r in rows]

    def destroy_ended_before(
        self, cutoff: datetime, audit: AuditRecord | None = None, topic: str | None = None
    ) -> list[str]:
        """Destroy every live key (of `topic`, or of every topic) whose slot ended before
        `cutoff` (wrapped key erased, `destroyed_at` set); returns their key ids. `audit` (if
        any) is written in the same transaction when at least one key was destroyed, listing
        the key ids."""
        with self.db.transaction() as conn:
            rows = conn.execute(
                "UPDATE topic_keys SET wrapped = NULL, destroyed_at = now()"
                " WHERE destroyed_at IS NULL AND valid_to < %s"
                " AND (%s::text IS NULL OR topic = %s) RETURNING key_id, topic",
                (cutoff, topic, topic),
            ).fetchall()
            destroyed = sorted(str(r["key_id"]) for r in rows)
            if destroyed and audit is not None:
                topics = sorted({str(r["topic"]) for r in rows})
                conn.execute(
                    "INSERT INTO key_audit (actor, action, chat_id, dek_version, reason)"
                    " VALUES (%s, %s, NULL, NULL, %s)",
                    (
                        audit.actor,
                        audit.action,
                        f"{audit.reason} (topics {topics}; topic keys destroyed: {destroyed})",
                    ),
                )
        return destroyed

    def db_now(self) -> datetime:
        with self.db.connection() as conn:
            row = conn.execute("SELECT now() AS now").fetchone()
        assert row is not None
        return cast("datetime", row["now"])
