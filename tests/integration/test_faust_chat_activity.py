"""The Faust example app (examples/faust_chat_activity) against the real broker and gateway.

Messages are posted through the real gateway (in-process, TestClient, on Postgres, Redis, OpenBao
and Kafka) to a message topic of this module's own; records a direct producer could write
(valid ones in an older window, a duplicate, and refused ones: invalid fields, no key, a key that
is not the chat id, a tombstone, no JSON at all) are put among them. The app runs as a Faust
service inside the test's event loop, in a consumer group of its own, and its table and its sink
topic must hold exactly the truth computed from what was produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from fastapi.testclient import TestClient

from examples.faust_chat_activity.app import (
    ActivityAppSettings,
    ChatActivityApp,
    ChatActivitySettings,
    build_app,
)
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds, id_millis
from sealstream.adapters.kafka import Headers, delete_topics, ensure_topics, kafka_client_config
from sealstream.adapters.vault import TransitKms
from sealstream.auth import mint_token
from sealstream.faust_records import KEY_MISMATCH, NO_VALUE
from sealstream.record_seal import record_sealer
from sealstream.settings import KafkaSettings, Settings
from tests.conftest import require_port
from tests.integration.conftest import NewGroup, host_port

WINDOW_SECONDS = 5
Window = tuple[str, datetime]  # (chat id, window start)


@pytest.fixture(scope="module")
def gateway(
    settings: Settings, database: object, kms: TransitKms
) -> Iterator[tuple[TestClient, Settings]]:
    """The real gateway publishing to a message topic of this module's own."""
    from ingest.wiring import build

    kms.ensure_key(settings.vault.default_key)  # the master key of chat and topic keys
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.faust-activity",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.faust-activity",
        }
    )
    gateway_settings = settings.model_copy(update={"kafka": kafka})
    require_port("kafka", *host_port(kafka.bootstrap))
    require_port("redis", *host_port(settings.redis.url))
    ensure_topics(kafka)
    app, close = build(gateway_settings)
    try:
        with TestClient(app) as client:
            yield client, gateway_settings
    finally:
        close()
        delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])


def auth(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, user)}"}


def new_chat(client: TestClient, settings: Settings, owner: str, *others: str) -> str:
    created = client.post(
        "/v1/chats", json={"participants": list(others)}, headers=auth(settings, owner)
    )
    assert created.status_code == 201, created.text
    return str(created.json()["chat_id"])


def window_of(message_id: int) -> datetime:
    """The start of the tumbling window holding the id's time (the app's window clock)."""
    seconds = id_millis(message_id) / 1000
    return datetime.fromtimestamp((seconds // WINDOW_SECONDS) * WINDOW_SECONDS, UTC)


def truth(messages: list[tuple[str, int, str]]) -> dict[Window, tuple[int, int]]:
    """(messages, distinct senders) per (chat, window) of (chat, message id, sender) triples,
    counting each message id once."""
    ids: dict[Window, set[int]] = defaultdict(set)
    senders: dict[Window, set[str]] = defaultdict(set)
    for chat, message_id, sender in messages:
        ids[chat, window_of(message_id)].add(message_id)
        senders[chat, window_of(message_id)].add(sender)
    return {w: (len(ids[w]), len(senders[w])) for w in ids}


def computed(built: ChatActivityApp) -> dict[Window, tuple[int, int]]:
    return {(w.chat_id, w.window_start): (w.messages, w.distinct_senders) for w in built.windows()}


def read_sink(kafka: KafkaSettings, topic: str, group: str) -> list[Any]:
    """Every record of the sink topic, read to the end of each partition."""
    consumer = Consumer(
        kafka_client_config(
            kafka,
            {
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
        )
    )
    records: list[Any] = []
    try:
        consumer.subscribe([topic])
        at_end: set[int] = set()
        partitions: int | None = None
        deadline = time.monotonic() + 60
        while partitions is None or len(at_end) < partitions:
            assert time.monotonic() < deadline, f"sink read to the end of {at_end} only"
            msg = consumer.poll(0.5)
            if partitions is None and consumer.assignment():
                partitions = len(consumer.assignment())
            if msg is None:
                continue
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                at_end.add(msg.partition())
                continue
            records.append(msg)
    finally:
        consumer.close()
    return records


def test_chat_activity_windows_equal_what_was_produced(
    gateway: tuple[TestClient, Settings],
    kafka_group: NewGroup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, settings = gateway
    kafka = settings.kafka
    marker = f"zqfaust{uuid.uuid4().hex[:8]}"  # in every text: must reach no log line
    chat_a = new_chat(client, settings, "alice", "bob", "carol")
    chat_b = new_chat(client, settings, "dave", "erin")
    chat_c = new_chat(client, settings, "frank")
    produced: list[tuple[str, int, str]] = []  # (chat, message id, sender) of valid records

    def post(sender: str, chat: str, count: int) -> None:
        for i in range(count):
            response = client.post(
                f"/v1/chats/{chat}/messages",
                json={"text": f"{marker} message {i} from {sender}"},
                headers=auth(settings, sender),
            )
            assert response.status_code == 202, response.text
            produced.append((chat, int(response.json()["message_id"]), sender))

    def post_batch(sender: str, chat: str, count: int) -> None:
        texts = [{"text": f"{marker} batch {i} from {sender}"} for i in range(count)]
        response = client.post(
            f"/v1/chats/{chat}/messages:batch",
            json={"messages": texts},
            headers=auth(settings, sender),
        )
        assert response.status_code == 202, response.text
        produced.extend((chat, int(m["message_id"]), sender) for m in response.json()["accepted"])

    # Records a direct producer writes (key = chat id, value = MessageRecord JSON), with ids of
    # two minutes ago: windows that do not depend on when the test runs.
    old_ms = (int(time.time()) - 120) * 1000
    ids = SnowflakeIds(1000, clock_ms=lambda: old_ms)

    def direct(chat: str, sender: str, text: str) -> MessageRecord:
        return MessageRecord(
            message_id=ids.next_id(),
            chat_id=uuid.UUID(chat),
            sender_id=sender,
            text=f"{marker} {text}",
            sent_at=datetime.now(UTC) - timedelta(days=3),  # not the window clock
        )

    post("alice", chat_a, 3)
    post("bob", chat_a, 2)
    post("dave", chat_b, 2)
    post("frank", chat_c, 1)
    post_batch("carol", chat_a, 3)

    old = [direct(chat_c, "frank", "old one"), direct(chat_c, "gina", "old two")]
    old += [direct(chat_b, "erin", "old three")]
    produced += [(str(r.chat_id), r.message_id, r.sender_id) for r in old]
    invalid_sender = direct(chat_a, "alice", "no sender")
    keyless = direct(chat_a, "alice", "keyless")
    other_key = direct(chat_b, "dave", "filed under another chat")
    plaintext = direct(chat_a, "alice", "plaintext")
    not_json = direct(chat_b, "erin", "not JSON")
    sealer = record_sealer(settings)

    def sealed(key: bytes, event_id: int, value: bytes) -> tuple[bytes, Headers]:
        """Sealed as every producer must seal (bound to topic, key and event id)."""
        blob, headers = sealer.seal(kafka.messages_topic, key, event_id, value)
        return blob, list(headers)

    def record_of(record: MessageRecord) -> tuple[bytes, bytes, Headers]:
        return (record.key(), *sealed(record.key(), record.change_id, record.value()))

    # (key, value, headers): valid records sealed, then the ones the app must refuse.
    no_sender = json.loads(invalid_sender.value()) | {"sender_id": ""}
    records: list[tuple[bytes | None, bytes | None, Headers | None]] = [record_of(r) for r in old]
    records += [
        (
            chat_a.encode(),
            *sealed(chat_a.encode(), invalid_sender.message_id, json.dumps(no_sender).encode()),
        ),
        # Sealed under its chat's key, sent without one: the seal binds the key.
        (None, *sealed(chat_a.encode(), keyless.message_id, keyless.value())),
        # A chat B record keyed (and sealed) by chat A: opens, but its key is not its chat.
        (chat_a.encode(), *sealed(chat_a.encode(), other_key.message_id, other_key.value())),
        (chat_a.encode(), None, None),  # a tombstone
        (chat_b.encode(), *sealed(chat_b.encode(), not_json.message_id, f"{marker} x".encode())),
        (plaintext.key(), plaintext.value(), None),  # not sealed
        record_of(old[0]),  # the same record again: counted once
    ]
    # Edits and deletions are no new messages: not counted (their sender neither, which here
    # is one the window has not seen: counted, it would show as a distinct sender).
    for kind, text in (("edit", f"{marker} edited"), ("delete", None)):
        change = MessageRecord(
            kind=kind,
            message_id=old[0].message_id,
            event_id=ids.next_id(),
            chat_id=old[0].chat_id,
            sender_id="henry",
            text=text,
            sent_at=datetime.now(UTC),
        )
        records.append(record_of(change))
    sealer.close()
    producer = Producer(kafka_client_config(kafka, {"enable.idempotence": True}))
    for key, value, headers in records:
        producer.produce(kafka.messages_topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0

    post("carol", chat_a, 2)  # after the refused records, on the same partitions
    post("erin", chat_b, 2)
    post("frank", chat_c, 2)

    expected = truth(produced)
    expected_messages = sum(m for m, _ in expected.values())
    assert expected_messages == len(produced) == 20

    group = kafka_group("faust-activity")  # the app id is the consumer group: fresh each run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    own = ChatActivitySettings(
        group=group,
        window_seconds=WINDOW_SECONDS,
        sink_topic=f"{group}.activity",
        web_port=web_port,
        data_dir=str(tmp_path / "faust"),
    )
    # The run's settings (Postgres schema, KMS key: to open the sealed records) + the app's own.
    fields = {name: value for name, value in settings}
    built = build_app(ActivityAppSettings(**{**fields, "chat_activity": own}))
    view: dict[str, Any] = {}

    async def main() -> None:
        # A Faust service in this event loop rather than a Worker (which owns the loop and
        # installs signal handlers). It stops once it has counted every message and refused
        # the five bad records, or after a generous deadline; the asserts come after.
        await built.app.start()
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                counted = sum(m for m, _ in computed(built).values())
                if counted >= expected_messages and built.refusals.total >= 6:
                    break
                await asyncio.sleep(0.2)
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.get(f"http://127.0.0.1:{web_port}/chat-activity/{chat_a}/")
                assert answer.status_code == 200, answer.text
                view.update(answer.json())
        finally:
            await built.app.stop()  # leaves the group, so the kafka_group fixture can delete it
            built.close()

    caplog.set_level(logging.INFO)
    try:
        asyncio.run(main())
        sink = read_sink(kafka, own.sink_topic, f"check-{uuid.uuid4()}")
        admin = AdminClient(kafka_client_config(kafka))
        sink_partitions = len(
            admin.list_topics(own.sink_topic, timeout=10).topics[own.sink_topic].partitions
        )
        resource = ConfigResource(ResourceType.TOPIC, own.sink_topic)
        sink_config = admin.describe_configs([resource])[resource].result(30)
    finally:
        admin = AdminClient(kafka_client_config(kafka))
        made = [t for t in admin.list_topics(timeout=10).topics if t.startswith(group)]
        delete_topics(kafka, made)

    assert computed(built) == expected
    refused = {
        "invalid record: sender_id: String should have at least 1 character": 1,
        "record key: missing (a sealed record binds its record key)": 1,
        KEY_MISMATCH: 1,
        NO_VALUE: 1,
        "invalid record: record: Invalid JSON: expected value at line 1 column 1": 1,
        "record is not sealed: header sealstream.key_id missing": 1,
    }
    assert built.refusals.by_reason == refused

    # The web view: one chat's windows and the refusals, as the table holds them.
    assert view["refused"] == refused
    assert {
        (w["chat_id"], datetime.fromisoformat(w["window_start"])): (
            w["messages"],
            w["distinct_senders"],
        )
        for w in view["windows"]
    } == {w: counts for w, counts in expected.items() if w[0] == chat_a}

    # The sink: per (chat, window) the newest record is the window's figure; counts only.
    newest: dict[Window, tuple[int, int]] = {}
    for msg in sink:
        value = json.loads(msg.value())
        assert set(value) == {
            "chat_id",
            "window_start",
            "window_end",
            "messages",
            "distinct_senders",
        }
        assert msg.key().decode() == value["chat_id"]
        start = datetime.fromisoformat(value["window_start"])
        assert datetime.fromisoformat(value["window_end"]) - start == timedelta(
            seconds=WINDOW_SECONDS
        )
        newest[value["chat_id"], start] = (value["messages"], value["distinct_senders"])
    assert newest == expected
    # Made by the app with the message topic's layout and retention, not auto-created.
    assert sink_partitions == kafka.partitions
    assert sink_config["retention.ms"].value == str(kafka.retention_ms)
    assert marker not in caplog.text, "message text reached a log line"
    # Faust's default for an undecodable record crashes the agent (its supervisor restarts it).
    assert "Crashed" not in caplog.text, "a refused record crashed the agent"
