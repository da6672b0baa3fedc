"""A consumer worker whose sink is down stops on SIGTERM, and commits nothing it did not write.

A real `sealstream run indexer` process, on this run's own topics and consumer group, with its
OpenSearch address pointing at a port where nothing listens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import apply_acls, kafka_client_config
from sealstream.services import settings_env, spawn
from sealstream.settings import EncryptorHttp, IndexerHttp, Settings
from sealstream.wiring import key_service
from tests.e2e.conftest import free_port
from tests.integration.conftest import KafkaTopics
from tests.kafka_records import publish_records

GRACE_SECONDS = 30  # what an orchestrator gives a container between SIGTERM and SIGKILL


def retries(url: str, stage: str = "indexer") -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sealstream_consumer_retries_total{") and f'stage="{stage}"' in line
    )


def test_indexer_with_its_index_down_stops_on_sigterm_without_committing(
    settings: Settings,
    kafka_topic_factory: KafkaTopics,
    tmp_path: Path,
    database: object,
    kms: Any,
) -> None:
    kms.ensure_key(settings.vault.default_key)
    chat = uuid.uuid4()
    with key_service(settings, database) as keys:  # type: ignore[arg-type]
        keys.create_chat(chat, ("alice",))  # a known chat: the indexer dead-letters the others
    topics = kafka_topic_factory("shutdown")
    group = f"shutdown-indexer-{uuid.uuid4().hex[:12]}"
    http = IndexerHttp(port=free_port())
    worker = settings.model_copy(
        update={
            "kafka": topics.model_copy(update={"indexer_group": group}),
            "opensearch": settings.opensearch.model_copy(
                update={"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
            ),
            "indexer_http": http,
        }
    )
    apply_acls(worker.kafka)  # the indexer principal may join this test's own group
    log = tmp_path / "indexer.log"
    proc = spawn("indexer", {**os.environ, **settings_env(worker)}, log=log)
    try:
        ids = SnowflakeIds(71)
        records = [
            MessageRecord(
                message_id=ids.next_id(),
                chat_id=chat,
                sender_id="alice",
                text=f"held while the index is down {i}",
                sent_at=datetime.now(UTC),
            )
            for i in range(20)
        ]
        publish_records(settings, topics, records, client_id="shutdown-test")

        # The worker has the batch and is retrying it (its index is unreachable).
        url = f"http://127.0.0.1:{http.port}"
        deadline = time.monotonic() + 120
        while retries(url) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        assert retries(url) >= 2, "the worker never retried a batch"

        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code = proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"indexer still running {GRACE_SECONDS} s after SIGTERM")
        print(f"\nindexer exited {time.monotonic() - signalled:.1f} s after SIGTERM")
        assert code == 0, log.read_text()[-2000:]

        consumer = Consumer(kafka_client_config(topics, {"group.id": group}))
        try:
            partitions = [
                TopicPartition(topics.messages_topic, p) for p in range(topics.partitions)
            ]
            committed = consumer.committed(partitions, timeout=30)
        finally:
            consumer.close()
        # Nothing was indexed, so no offset may have been committed (negative = none).
        assert [tp.offset for tp in committed if tp.offset >= 0] == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        admin = AdminClient(kafka_client_config(topics))
        for future in admin.delete_consumer_groups([group], request_timeout=15).values():
            with contextlib.suppress(KafkaException):  # a SIGKILLed member holds it a while
                future.result(20)


def test_encryptor_losing_cassandra_stops_on_sigterm_without_committing(
    settings: Settings,
    kafka_topic_factory: KafkaTopics,
    tmp_path: Path,
    database: object,
    kms: Any,
) -> None:
    """Cassandra answers at start-up, then becomes unreachable (its forwarder is killed): the
    encryptor retries the batch, stops within the grace period on SIGTERM, commits nothing."""
    kms.ensure_key(settings.vault.default_key)  # the encryptor's start-up checks its KMS key
    chat = uuid.uuid4()
    with key_service(settings, database) as keys:  # type: ignore[arg-type]
        keys.create_chat(chat, ("alice",))  # a known chat: its records need a Cassandra write
    topics = kafka_topic_factory("shutdown-enc")
    group = f"shutdown-encryptor-{uuid.uuid4().hex[:12]}"
    http = EncryptorHttp(port=free_port())
    cut_port = free_port()
    forwarder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.tcp_cut",
            str(cut_port),
            settings.cassandra.hosts[0],
            str(settings.cassandra.port),
        ]
    )
    worker = settings.model_copy(
        update={
            "kafka": topics.model_copy(update={"encryptor_group": group}),
            "cassandra": settings.cassandra.model_copy(update={"port": cut_port}),
            "encryptor_http": http,
        }
    )
    apply_acls(worker.kafka)  # the encryptor principal may join this test's own group
    log = tmp_path / "encryptor.log"
    proc = spawn("encryptor", {**os.environ, **settings_env(worker)}, log=log)
    url = f"http://127.0.0.1:{http.port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # joined its group: Cassandra was reached
            assert proc.poll() is None, log.read_text()[-2000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the encryptor never became ready: " + log.read_text()[-2000:])
        forwarder.kill()
        forwarder.wait(10)

        ids = SnowflakeIds(72)
        records = [
            MessageRecord(
                message_id=ids.next_id(),
                chat_id=chat,
                sender_id="alice",
                text=f"held while the store is down {i}",
                sent_at=datetime.now(UTC),
            )
            for i in range(20)
        ]
        publish_records(settings, topics, records, client_id="shutdown-test")

        deadline = time.monotonic() + 180
        while retries(url, "encryptor") < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        assert retries(url, "encryptor") >= 2, "the worker never retried a batch"

        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        try:
            code = proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"encryptor still running {GRACE_SECONDS} s after SIGTERM")
        print(f"\nencryptor exited {time.monotonic() - signalled:.1f} s after SIGTERM")
        assert code == 0, log.read_text()[-2000:]

        consumer = Consumer(kafka_client_config(topics, {"group.id": group}))
        try:
            partitions = [
                TopicPartition(topics.messages_topic, p) for p in range(topics.partitions)
            ]
            committed = consumer.committed(partitions, timeout=30)
        finally:
            consumer.close()
        assert [tp.offset for tp in committed if tp.offset >= 0] == []
    finally:
        if forwarder.poll() is None:
            forwarder.kill()
            forwarder.wait(10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        admin = AdminClient(kafka_client_config(topics))
        for future in admin.delete_consumer_groups([group], request_timeout=15).values():
            with contextlib.suppress(KafkaException):
                future.result(20)
