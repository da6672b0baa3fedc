"""The whole pipeline, end to end: HTTP in, Kafka, encryptor -> Cassandra, indexer -> OpenSearch,
reader HTTP out. Real servers, real processes, real HTTP."""

from __future__ import annotations

import base64
import json
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.redis import RedisKeyCache
from tests.e2e.conftest import Pipeline, free_port

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


def test_no_store_but_kafka_holds_message_text(pipeline: Pipeline, database: Any) -> None:
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


def _raw_producer(pipe: Pipeline) -> Producer:
    return Producer({"bootstrap.servers": pipe.settings.kafka.bootstrap, "acks": "all"})


def test_poison_record_goes_to_dead_letter_topic_and_pipeline_continues(
    pipeline: Pipeline,
) -> None:
    chat = create_chat(pipeline, "carol", ["dave"])
    producer = _raw_producer(pipeline)
    poison = b'{"schema_version": 1, "message_id": "not-a-number", "text": "x"}'
    producer.produce(pipeline.settings.kafka.messages_topic, key=chat.encode(), value=poison)
    producer.flush(10)
    post_batch(pipeline, "carol", chat, ["still flowing after the poison"])
    wait_until(lambda: len(history(pipeline, "dave", chat)) == 1, what="pipeline continues")

    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.settings.kafka.bootstrap,
            "group.id": f"dlq-check-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
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

    admin = AdminClient({"bootstrap.servers": pipeline.settings.kafka.bootstrap})
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
