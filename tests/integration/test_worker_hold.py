"""A worker held by its sink for longer than `max.poll.interval.ms` keeps its batch and its place.

A real `sealstream run indexer` process with `max.poll.interval.ms` set to 10 s; its OpenSearch is
reached through a TCP forwarder that is not running at first. The worker retries its batch for
well over 10 s, more records arrive meanwhile, then the forwarder starts: every record must be
indexed, every offset committed, and the worker must still be the same group member it was (it
never stopped polling, so the group never rebalanced its partitions away).
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

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import apply_acls, kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from sealstream.services import settings_env, spawn
from sealstream.settings import IndexerHttp, Settings
from sealstream.wiring import key_service
from tests.e2e.conftest import free_port
from tests.integration.conftest import KafkaTopics, host_port
from tests.integration.test_worker_shutdown import retries
from tests.kafka_records import publish_records

MAX_POLL_MS = 10_000


def _publish(
    settings: Settings, topics: Any, chat: uuid.UUID, ids: SnowflakeIds, n: int, what: str
) -> None:
    records = [
        MessageRecord(
            message_id=ids.next_id(),
            chat_id=chat,
            sender_id="alice",
            text=f"{what} {i}",
            sent_at=datetime.now(UTC),
        )
        for i in range(n)
    ]
    publish_records(settings, topics, records, client_id="hold-test")


def test_indexer_held_longer_than_max_poll_interval_keeps_its_batch_and_membership(
    settings: Settings,
    kafka_topic_factory: KafkaTopics,
    search_index: SearchIndex,
    smoke_settings: Settings,
    tmp_path: Path,
    database: object,
    kms: Any,
) -> None:
    kms.ensure_key(settings.vault.default_key)
    chat = uuid.uuid4()
    with key_service(settings, database) as keys:  # type: ignore[arg-type]
        keys.create_chat(chat, ("alice",))  # a known chat: the indexer dead-letters the others
    topics = kafka_topic_factory("hold")
    group = f"hold-indexer-{uuid.uuid4().hex[:12]}"
    http = IndexerHttp(port=free_port())
    os_host, os_port = host_port(smoke_settings.opensearch.url)
    cut_port = free_port()
    kafka = topics.model_copy(
        update={
            "indexer_group": group,
            "max_poll_interval_ms": MAX_POLL_MS,
            "session_timeout_ms": 6_000,
            "heartbeat_interval_ms": 1_000,
        }
    )
    worker = smoke_settings.model_copy(
        update={
            "kafka": kafka,
            "opensearch": smoke_settings.opensearch.model_copy(
                update={"url": f"http://127.0.0.1:{cut_port}"}  # nothing listens there yet
            ),
            "indexer_http": http,
        }
    )
    apply_acls(kafka)  # the indexer principal may join this test's own group
    log = tmp_path / "indexer.log"
    proc = spawn("indexer", {**os.environ, **settings_env(worker)}, log=log)
    url = f"http://127.0.0.1:{http.port}"
    admin = AdminClient(kafka_client_config(topics))

    def member_ids() -> list[str]:
        described = admin.describe_consumer_groups([group])[group].result(10)
        return sorted(m.member_id for m in described.members)

    forwarder: subprocess.Popen[bytes] | None = None
    try:
        ids = SnowflakeIds(73)
        _publish(settings, topics, chat, ids, 30, "held while the index is down")
        deadline = time.monotonic() + 120
        while retries(url) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)
        assert retries(url) >= 2, "the worker never retried a batch"
        before = member_ids()
        assert len(before) == 1, before

        # Held for 2.5 x max.poll.interval.ms; more records arrive meanwhile.
        time.sleep(MAX_POLL_MS / 1000 * 1.5)
        _publish(settings, topics, chat, ids, 30, "arrived during the hold")
        time.sleep(MAX_POLL_MS / 1000)
        assert proc.poll() is None, log.read_text()[-2000:]
        assert member_ids() == before, "the worker lost its place in the group while held"

        forwarder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.tcp_cut",
                str(cut_port),
                os_host,
                str(os_port),
            ]
        )

        def all_indexed() -> bool:
            search_index.refresh()
            return search_index.count(chat) == 60

        deadline = time.monotonic() + 180
        while not all_indexed():
            assert time.monotonic() < deadline, "not every record was indexed after the hold"
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.5)

        partitions = [TopicPartition(topics.messages_topic, p) for p in range(topics.partitions)]
        consumer = Consumer(kafka_client_config(topics, {"group.id": group}))
        try:
            ends = [consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in partitions]
            deadline = time.monotonic() + 60
            while True:
                committed = consumer.committed(partitions, timeout=30)
                if [max(tp.offset, 0) for tp in committed] == ends:
                    break
                assert time.monotonic() < deadline, (committed, ends)
                time.sleep(0.5)
        finally:
            consumer.close()
        assert member_ids() == before, "the group rebalanced during the hold"
    finally:
        if forwarder is not None:
            forwarder.kill()
            forwarder.wait(10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        for future in admin.delete_consumer_groups([group], request_timeout=15).values():
            with contextlib.suppress(KafkaException):
                future.result(20)
