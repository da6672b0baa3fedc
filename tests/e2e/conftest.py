"""End-to-end harness: the four services as real processes, on the real stack, talking real HTTP.

Each test run gets its own topics, consumer groups, keyspace, index, schema and Redis prefix (from
the session `settings` fixture), passed to the services through their environment exactly as an
operator would configure them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics, kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from sealstream.auth import ADMIN_ROLE, mint_token
from sealstream.migrate import migrate_all
from sealstream.services import settings_env, spawn, stop
from sealstream.settings import Settings
from tests.conftest import require_port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pipeline:
    """Starts, stops and kills the four services of one test run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = {**os.environ, **settings_env(settings)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Each service's stdout and stderr, one file per service (read by the token-leak test).
        self.log_dir = Path(tempfile.mkdtemp(prefix="sealstream-e2e-logs-"))
        self.ingest_url = f"http://127.0.0.1:{settings.ingest.port}"
        self.reader_url = f"http://127.0.0.1:{settings.reader.port}"
        self.admin_url = f"http://127.0.0.1:{settings.admin.port}"
        self.delivery_url = f"http://127.0.0.1:{settings.delivery.port}"

    def start(self, name: str, key: str | None = None, env: dict[str, str] | None = None) -> None:
        log = self.log_dir / f"{key or name}.log"
        self.procs[key or name] = spawn(name, {**self.env, **(env or {})}, log=log)

    def signal(self, key: str, sig: signal.Signals) -> None:
        proc = self.procs.pop(key)
        os.killpg(proc.pid, sig)
        proc.wait(60)

    def stop_all(self) -> None:
        stop(list(self.procs.values()))
        self.procs.clear()

    def wait_http(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            for key, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"service {key} exited with {proc.returncode}")
            time.sleep(0.2)
        raise TimeoutError(f"{url} not ready after {timeout}s")

    def token(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.settings.auth, user)}"}

    def admin_token(self, user: str = "ops") -> dict[str, str]:
        token = mint_token(self.settings.auth, user, roles=(ADMIN_ROLE,))
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def e2e_settings(settings: Settings) -> Settings:
    from sealstream.settings import AdminHttp, DeliveryHttp, HttpSettings, IngestHttp, ReaderHttp

    return settings.model_copy(
        update={
            "ingest": IngestHttp(port=free_port()),
            "reader": ReaderHttp(port=free_port()),
            "encryptor_http": HttpSettings(port=free_port()),
            "indexer_http": HttpSettings(port=free_port()),
            "admin": AdminHttp(port=free_port()),
            "delivery": DeliveryHttp(port=free_port()),
        }
    )


@pytest.fixture(scope="package")
def migrated(e2e_settings: Settings) -> Iterator[Settings]:
    kafka_host, kafka_port = e2e_settings.kafka.bootstrap.split(",")[0].rsplit(":", 1)
    opensearch_port = int(e2e_settings.opensearch.url.rsplit(":", 1)[1].split("/")[0])
    # The servers the settings point at (the local stack's ports unless SEALSTREAM_* say else).
    require_port("kafka", kafka_host, int(kafka_port))
    require_port("cassandra", e2e_settings.cassandra.hosts[0], e2e_settings.cassandra.port)
    require_port("opensearch", "127.0.0.1", opensearch_port)
    migrate_all(e2e_settings)
    yield e2e_settings
    store = MessageStore(e2e_settings.cassandra)
    store.connect()
    store.drop_keyspace()
    store.close()
    index = SearchIndex(e2e_settings.opensearch)
    index.drop()
    index.close()
    delete_topics(
        e2e_settings.kafka,
        [
            e2e_settings.kafka.messages_topic,
            e2e_settings.kafka.dead_letter_topic,
            e2e_settings.kafka.changes_topic,
        ],
    )
    # The run's consumer groups (the services are stopped by now); Kafka would keep them a week.
    groups = [e2e_settings.kafka.encryptor_group, e2e_settings.kafka.indexer_group]
    admin = AdminClient(kafka_client_config(e2e_settings.kafka))
    for future in admin.delete_consumer_groups(groups, request_timeout=15).values():
        try:
            future.result(20)
        except KafkaException:
            pass  # a group never created (a run that failed early)


@pytest.fixture(scope="package")
def pipeline(migrated: Settings, database: Any) -> Iterator[Pipeline]:
    """All four services running while the e2e package runs (stopped before other tiers)."""
    pipe = Pipeline(migrated)
    for name in ("ingest", "encryptor", "indexer", "reader"):
        pipe.start(name)
    try:
        pipe.wait_http(pipe.ingest_url)
        pipe.wait_http(pipe.reader_url)
        yield pipe
    finally:
        pipe.stop_all()
