"""PostgreSQL from Debian's package, as a private cluster in the stack's data folder.

Postgres refuses to run as root, so the cluster is owned by the `postgres` system user (created by
the Debian package) and started through `setpriv`, which execs the postmaster directly: the pid
we record is the postmaster's own.
"""

from __future__ import annotations

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
        return self.data / "cluster"

    def install(self) -> None:
        if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
            apt_install("/nonexistent-postgres", "postgresql")

    def _as_postgres(self, argv: list[str]) -> list[str]:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]

    def prepare(self) -> None:
        if (self.cluster / "PG_VERSION").exists():
            return
        self.cluster.mkdir(parents=True, exist_ok=True)
        pwfile = self.data / "pwfile"
        pwfile.write_text(LOCAL_POSTGRES_PASSWORD + "\n")
        shutil.chown(self.cluster, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        result = subprocess.run(
            self._as_postgres(
                [
                    str(_bin_dir() / "initdb"),
                    "-D",
                    str(self.cluster),
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
                # Local test data only: skipping fsync makes the test suite much faster.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
            ]
        )

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
