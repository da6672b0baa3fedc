"""The whole pipeline, end to end: HTTP in, Kafka, encryptor -> Cassandra, indexer -> OpenSearch,
reader HTTP out. Real servers, real processes, real HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from opensearchpy import OpenSearch

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import kafka_client_config
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.redis import RedisKeyCache
from tests.conftest import index_folder, phrases
from tests.e2e.conftest import Pipeline, free_port
from tests.kafka_records import SealingProducer

CHATS = 20
PER_CHAT = 50  # 1,000 messages in all
BATCH = 25


def wait_until(predicate: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def text_for(chat: int, i: int) -> str:
    # A unique searchable token per message, plus non-ASCII text that must survive byte-exact.
    return f"message {i} of chat {chat}: tok{chat}x{i}q — café 世界 🚀 ✓"


def create_chat(pipe: Pipeline, owner: str, others: list[str]) -> str:
    response = httpx.post(
        f"{pipe.ingest_url}/v1/chats", json={"participants": others}, headers=pipe.token(owner)
    )
    assert response.status_code == 201, response.text
    return str(response.json()["chat_id"])


def post_batch(pipe: Pipeline, user: str, chat_id: str, texts: list[str]) -> list[str]:
    response = httpx.post(
        f"{pipe.ingest_url}/v1/chats/{chat_id}/messages:batch",
        json={"messages": [{"text": t} for t in texts]},
        headers=pipe.token(user),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return [a["message_id"] for a in response.json()["accepted"]]


def history(pipe: Pipeline, user: str, chat_id: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 50}
        if cursor:
            params["before"] = cursor
        response = httpx.get(
            f"{pipe.reader_url}/v1/chats/{chat_id}/messages",
            params=params,
            headers=pipe.token(user),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        messages.extend(body["messages"])
        cursor = body.get("next_cursor")
        if not cursor:
            return messages


def search(pipe: Pipeline, user: str, chat_id: str, q: str) -> httpx.Response:
    return httpx.get(
        f"{pipe.reader_url}/v1/chats/{chat_id}/search",
        params={"q": q},
        headers=pipe.token(user),
        timeout=30,
    )


def test_thousand_messages_read_back_in_order_and_are_searchable(pipeline: Pipeline) -> None:
    chats = [create_chat(pipeline, f"owner{c}", [f"member{c}"]) for c in range(CHATS)]
    posted: dict[str, list[tuple[str, str]]] = {chat: [] for chat in chats}
    for c, chat in enumerate(chats):
        for start in range(0, PER_CHAT, BATCH):
            texts = [text_for(c, i) for i in range(start, start + BATCH)]
            ids = post_batch(pipeline, f"owner{c}", chat, texts)
            posted[chat].extend(zip(ids, texts, strict=True))

    for c, chat in enumerate(chats):
        wait_until(
            lambda chat=chat, c=c: len(history(pipeline, f"member{c}", chat)) == PER_CHAT,
            what=f"chat {c} fully readable",
        )
        got = history(pipeline, f"member{c}", chat)
        expected = list(reversed(posted[chat]))  # newest first
        assert [(m["message_id"], m["text"]) for m in got] == expected

    # Every message is found by a word it contains, and the hit decrypts to the exact text.
    for c, chat in enumerate(chats):
        for message_id, text in posted[chat]:
            token = text.split()[5].rstrip(":")  # tok{c}x{i}q
            wait_until(
                lambda chat=chat, token=token, c=c: bool(
                    search(pipeline, f"owner{c}", chat, token).json().get("messages")
                ),
                timeout=60,
                what=f"search hit for {token}",
            )
            hits = search(pipeline, f"owner{c}", chat, token).json()["messages"]
            assert [(h["message_id"], h["text"]) for h in hits] == [(message_id, text)]


def test_no_store_holds_message_text(pipeline: Pipeline, database: Any) -> None:
    chat = create_chat(pipeline, "leaky", ["other"])
    secrets = [f"the launch code is zebra{n}quartz — ünïcödé {n}" for n in range(30)]
    post_batch(pipeline, "leaky", chat, secrets)
    wait_until(lambda: len(history(pipeline, "leaky", chat)) == len(secrets), what="readable")
    settings = pipeline.settings
    index = SearchIndex(settings.opensearch)
    wait_until(
        lambda: index.count(uuid.UUID(chat)) == len(secrets) or index.refresh() is not None,
        what="indexed",
    )

    store = MessageStore(settings.cassandra)
    store.connect()
    raw_rows = b"\n".join(store.scan_raw())
    store.close()
    sources = json.dumps(index.all_sources()).encode()
    redis_dump = "\n".join(RedisKeyCache(settings.redis).scan_values()).encode()
    with database.connection() as conn:
        pg_dump = repr(
            [
                conn.execute(f"SELECT * FROM {t}").fetchall()
                for t in ("tenants", "chats", "chat_deks")
            ]
        ).encode()
    assert raw_rows and sources and pg_dump
    for text in secrets:
        for needle in (text.encode(), text.split()[4].encode()):  # whole text and the rare word
            for name, dump in (
                ("cassandra", raw_rows),
                ("opensearch _source", sources),
                ("redis", redis_dump),
                ("postgres", pg_dump),
            ):
                assert needle not in dump, f"message text found in {name}"
                assert base64.b64encode(needle) not in dump

    # ... and yet the search index can find it by that word (tokens, not retrievable text).
    assert (
        search(pipeline, "leaky", chat, "zebra7quartz").json()["messages"][0]["text"] == secrets[7]
    )

    # The index's files on disk hold no text either: not the translog (which keeps every document
    # as it was sent, `_source` filtering or not), not the segments. Scanned before and after a
    # flush, which moves the translog into segments.
    client = OpenSearch(hosts=[settings.opensearch.url])
    folder = index_folder(client, index.index)
    client.indices.refresh(index=index.index)
    for moment in ("before flush", "after flush"):
        files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        if moment == "before flush":
            # The scan sees what was sent: the translog holds the documents raw, and the rare
            # word of each message (a token) is found there. (Segment files compress what they
            # hold, so after the flush the raw scan is the weaker check.)
            assert any("translog" in str(p) and b"zebra7quartz" in d for p, d in files.items())
        for text in secrets:
            for needle in phrases(text):
                for encoded in (needle.encode(), needle.encode("utf-16-le")):
                    found = [str(p.relative_to(folder)) for p, d in files.items() if encoded in d]
                    assert not found, f"{needle!r} ({moment}) found in {found}"
        client.indices.flush(index=index.index, force=True, wait_if_ongoing=True)
    client.close()


def test_non_participant_is_refused_and_tampered_row_fails_closed(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    [message_id] = post_batch(pipeline, "alice", chat, ["meet at the old mill at noon"])
    wait_until(lambda: len(history(pipeline, "bob", chat)) == 1, what="readable")

    one = f"{pipeline.reader_url}/v1/chats/{chat}/messages/{message_id}"
    assert httpx.get(one, headers=pipeline.token("mallory")).status_code == 403
    assert search(pipeline, "mallory", chat, "mill").status_code == 403
    refused = httpx.get(
        f"{pipeline.reader_url}/v1/chats/{chat}/messages", headers=pipeline.token("mallory")
    )
    assert refused.status_code == 403 and "mill" not in refused.text
    assert httpx.get(one, headers=pipeline.token("bob")).json()["text"] == (
        "meet at the old mill at noon"
    )
    unknown = f"{pipeline.reader_url}/v1/chats/{uuid.uuid4()}/messages/{message_id}"
    assert httpx.get(unknown, headers=pipeline.token("bob")).status_code == 404

    store = MessageStore(pipeline.settings.cassandra)
    store.connect()
    row = store.get(uuid.UUID(chat), int(message_id))
    assert row is not None
    tampered = bytearray(row.envelope)
    tampered[-5] ^= 0x01
    store.overwrite_envelope(uuid.UUID(chat), int(message_id), bytes(tampered))
    store.close()
    response = httpx.get(one, headers=pipeline.token("bob"))
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "integrity_error"
    assert "mill" not in response.text and "noon" not in response.text


def _producer(pipe: Pipeline) -> SealingProducer:
    """A direct producer to the message topic that seals its records, as producers must."""
    return SealingProducer(pipe.settings)


def test_poison_record_goes_to_dead_letter_topic_and_pipeline_continues(
    pipeline: Pipeline,
) -> None:
    chat = create_chat(pipeline, "carol", ["dave"])
    producer = _producer(pipeline)
    # Sealed, so it is refused for what it holds; the letter keeps it sealed, as it came.
    poison = producer.produce(
        chat.encode(), b'{"schema_version": 1, "message_id": "not-a-number", "text": "x"}', 1
    )
    producer.close()
    post_batch(pipeline, "carol", chat, ["still flowing after the poison"])
    wait_until(lambda: len(history(pipeline, "dave", chat)) == 1, what="pipeline continues")

    consumer = Consumer(
        kafka_client_config(
            pipeline.settings.kafka,
            {
                "group.id": f"dlq-check-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
            },
        )
    )
    consumer.subscribe([pipeline.settings.kafka.dead_letter_topic])
    letters: dict[str, list[dict[str, str]]] = {"encryptor": [], "indexer": []}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(letters.values()):
        msg = consumer.poll(0.5)
        if msg is None or msg.error() or msg.value() != poison:
            continue
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        letters[headers["dlq.stage"]].append(headers)
    consumer.close()
    for stage, found in letters.items():
        assert found, f"no dead letter from {stage}"
        headers = found[0]
        assert headers["dlq.topic"] == pipeline.settings.kafka.messages_topic
        assert int(headers["dlq.offset"]) >= 0
        assert "message_id" in headers["dlq.reason"]  # names the field that was wrong


def _dead_letters(pipe: Pipeline, until: Callable[[list[Any]], bool]) -> list[Any]:
    """Dead letters of this run's topic, read from the start until `until(letters)` holds."""
    consumer = Consumer(
        kafka_client_config(
            pipe.settings.kafka,
            {
                "group.id": f"dlq-check-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
            },
        )
    )
    consumer.subscribe([pipe.settings.kafka.dead_letter_topic])
    letters: list[Any] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not until(letters):
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                letters.append(msg)
    finally:
        consumer.close()
    return letters


def _headers(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}


def test_bad_records_are_dead_lettered_and_never_stop_a_stage(pipeline: Pipeline) -> None:
    """A record OpenSearch would refuse (UTC offset +20:00) and a poison record too large for the
    dead-letter topic: both stages dead-letter them and go on to the next message."""
    chat = create_chat(pipeline, "ivan", ["judy"])
    kafka = pipeline.settings.kafka
    admin = AdminClient(kafka_client_config(kafka))
    _set_topic_config(admin, kafka.dead_letter_topic, "max.message.bytes", "16384")
    try:
        far_east = MessageRecord(
            message_id=SnowflakeIds(77).next_id(),
            chat_id=uuid.UUID(chat),
            sender_id="ivan",
            text="offset beyond eighteen hours",
            sent_at=datetime.now(UTC),
        )
        value = json.loads(far_east.value())
        value["sent_at"] = "2026-01-01T12:00:00+20:00"  # the schema of the old code took this
        oversized = b"not json " + os.urandom(32_000)  # incompressible: > the DLQ's 16 KiB
        producer = _producer(pipeline)
        producer.produce(chat.encode(), json.dumps(value).encode(), far_east.message_id)
        producer.produce(chat.encode(), oversized, 2)
        producer.close()
        [after] = post_batch(pipeline, "ivan", chat, ["the pipeline flows on regardless"])

        wait_until(
            lambda: [m["message_id"] for m in history(pipeline, "judy", chat)] == [after],
            what="encryptor goes on (and stored neither bad record)",
        )
        wait_until(
            lambda: (
                [
                    m["message_id"]
                    for m in search(pipeline, "judy", chat, "regardless").json().get("messages", [])
                ]
                == [after]
            ),
            what="indexer goes on",
        )

        def ours(letters: list[Any]) -> list[tuple[str, str, bytes | None]]:
            return [
                (h["dlq.stage"], h["dlq.reason"], m.value())
                for m in letters
                if m.key() == chat.encode() and (h := _headers(m))
            ]

        letters = _dead_letters(pipeline, lambda got: len(ours(got)) >= 4)
        found = ours(letters)
        for stage in ("encryptor", "indexer"):
            offsets = [r for s, r, v in found if s == stage and v is not None]
            assert any("sent_at" in r and "18:00" in r for r in offsets), (stage, found)
            assert any(s == stage and v is None for s, _, v in found), (stage, found)
        omitted = [_headers(m) for m in letters if m.key() == chat.encode() and m.value() is None]
        assert all("MSG_SIZE_TOO_LARGE" in h["dlq.value"] for h in omitted)
        assert all(int(h["dlq.offset"]) >= 0 for h in omitted)
    finally:
        _set_topic_config(admin, kafka.dead_letter_topic, "max.message.bytes", None)


def _set_topic_config(admin: AdminClient, topic: str, name: str, value: str | None) -> None:
    """Set one config of a topic, or back to the broker's default with None."""
    op = AlterConfigOpType.SET if value is not None else AlterConfigOpType.DELETE
    entry = ConfigEntry(name, value or "", incremental_operation=op)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


def _kill_and_restart_midstream(
    pipeline: Pipeline, service: str, check: Callable[[str, list[str]], bool]
) -> str:
    chat = create_chat(pipeline, "erin", ["frank"])
    ids: list[str] = []
    texts = [f"crash test {service} number {i} keyword{service}{i}z" for i in range(600)]
    for n, start in enumerate(range(0, len(texts), 50)):
        ids += post_batch(pipeline, "erin", chat, texts[start : start + 50])
        if n == 3:
            pipeline.signal(service, signal.SIGKILL)  # no flush, no commit, mid-stream
        if n == 7:
            pipeline.start(service)
    wait_until(lambda: check(chat, ids), timeout=180, what=f"{service} recovered everything")
    return chat


def test_encryptor_sigkill_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    def complete(chat: str, ids: list[str]) -> bool:
        got = [m["message_id"] for m in history(pipeline, "frank", chat)]
        assert len(got) == len(set(got)), "a message was duplicated"
        return sorted(got) == sorted(ids)

    _kill_and_restart_midstream(pipeline, "encryptor", complete)


def test_indexer_sigkill_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    index = SearchIndex(pipeline.settings.opensearch)

    def complete(chat: str, ids: list[str]) -> bool:
        index.refresh()
        return index.count(uuid.UUID(chat)) == len(ids)  # _id = message id: no duplicates possible

    chat = _kill_and_restart_midstream(pipeline, "indexer", complete)
    hits = search(pipeline, "frank", chat, "keywordindexer599z").json()
    assert len(hits["messages"]) == 1


def test_two_encryptors_share_the_partitions(pipeline: Pipeline) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_client_config(pipeline.settings.kafka))
    group = pipeline.settings.kafka.encryptor_group

    def members() -> list[Any]:
        described = admin.describe_consumer_groups([group])[group].result(10)
        return [m for m in described.members if m.assignment.topic_partitions]

    second_port = {"SEALSTREAM_ENCRYPTOR_HTTP__PORT": str(free_port())}
    pipeline.start("encryptor", key="encryptor-2", env=second_port)
    try:
        wait_until(lambda: len(members()) == 2, timeout=90, what="two encryptors in the group")
        assigned = [{tp.partition for tp in m.assignment.topic_partitions} for m in members()]
        assert assigned[0].isdisjoint(assigned[1])
        assert assigned[0] | assigned[1] == set(range(pipeline.settings.kafka.partitions))
        chats = [create_chat(pipeline, "gina", ["hal"]) for _ in range(8)]
        for chat in chats:
            post_batch(pipeline, "gina", chat, [f"pool message {i}" for i in range(10)])
        for chat in chats:
            wait_until(
                lambda chat=chat: len(history(pipeline, "hal", chat)) == 10,
                what="all messages written by the pool",
            )
    finally:
        pipeline.signal("encryptor-2", signal.SIGTERM)
