"""PostgreSQL from Debian's package, as a private cluster in the stack's data folder.

Postgres refuses to run as root, so the cluster is owned by the `postgres` system user (created by
the Debian package) and started through `setpriv`, which execs the postmaster directly: the pid
we record is the postmaster's own.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import psycopg

from sealstream.settings import LOCAL_POSTGRES_PASSWORD
from sealstream.stack.base import Server, StackError, apt_install

USER = "sealstream"
DATABASE = "sealstream"


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        raise StackError("PostgreSQL binaries not found under /usr/lib/postgresql")
    return found[-1].parent


class PostgresServer(Server):
    name = "postgres"
    start_timeout = 60.0

    @property
    def port(self) -> int:
        return self.ctx.settings.postgres_port

    @property
    def cluster(self) -> Path:
        """The cluster folder: in the stack folder when the `postgres` user can reach it.

        A checkout under a private home (e.g. /root, mode 0700) is not traversable by `postgres`;
        then the cluster lives under the postgres user's home, keyed by this stack's path, and a
        symlink in the stack folder points at it.
        """
        link = self.data / "cluster"
        if link.is_symlink() or link.exists():
            return link.resolve()
        probe = subprocess.run(
            self._as_postgres(["test", "-x", str(self.data)]), capture_output=True
        )
        if probe.returncode == 0:
            return link
        digest = hashlib.sha256(str(self.data).encode()).hexdigest()[:12]
        target = Path("/var/lib/postgresql") / f"sealstream-{digest}" / "cluster"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(target.parent, "postgres", "postgres")
        link.symlink_to(target)
        return target

    def install(self) -> None:
        if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
            apt_install("/nonexistent-postgres", "postgresql")

    def _as_postgres(self, argv: list[str]) -> list[str]:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]

    def prepare(self) -> None:
        cluster = self.cluster
        if (cluster / "PG_VERSION").exists():
            return
        cluster.mkdir(parents=True, exist_ok=True)
        pwfile = cluster.parent / "pwfile"
        pwfile.write_text(LOCAL_POSTGRES_PASSWORD + "\n")
        shutil.chown(cluster, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        result = subprocess.run(
            self._as_postgres(
                [
                    str(_bin_dir() / "initdb"),
                    "-D",
                    str(cluster),
                    f"--username={USER}",
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ]
            ),
            capture_output=True,
            text=True,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")

    def argv(self) -> list[str]:
        return self._as_postgres(
            [
                str(_bin_dir() / "postgres"),
                "-D",
                str(self.cluster),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={self.port}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "max_connections=200",
                *self._durability(),
            ]
        )

    def _durability(self) -> list[str]:
        """Postgres holds what cannot be recreated (DEK history, audit): a commit is acknowledged
        only once its WAL is on disk. `SEALSTREAM_STACK_POSTGRES_FSYNC=false` turns that off
        only to measure its cost (docs/stack.md); a DEK version acknowledged and then lost would
        leave every message sealed under it unreadable."""
        on = "on" if self.ctx.settings.postgres_fsync else "off"
        return [
            "-c",
            f"fsync={on}",
            "-c",
            f"synchronous_commit={on}",
            # A torn 8 KiB page after an OS crash is repaired from the full image in the WAL.
            "-c",
            "full_page_writes=on",
        ]

    def _connect(self, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname=dbname,
            user=USER,
            password=LOCAL_POSTGRES_PASSWORD,
            connect_timeout=2,
            autocommit=True,
        )

    def probe(self) -> str:
        with self._connect("postgres") as conn:
            row = conn.execute("SELECT 1, current_setting('server_version')").fetchone()
            assert row is not None and row[0] == 1
            return f"PostgreSQL {row[1]}"

    def after_ready(self) -> None:
        with self._connect("postgres") as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if exists.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
