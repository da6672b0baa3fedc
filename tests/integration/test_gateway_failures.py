"""The gateway when a dependency fails: real gateway processes on the real stack, with a TCP proxy
(tests/tcp_proxy.py) in front of the shared Redis, Postgres or Kafka to make it look hung or down
to that gateway only. The shared servers themselves are never touched.

What a client must see: posting goes on without Redis; a dependency that does not answer costs a
`503` with `Retry-After` within its deadline (docs/operations.md, "Deadlines and idempotency"),
never a hang; and a retry with the same `client_message_id` after any failure or crash yields
exactly one message (one message id on the topic, which the sinks store idempotently by id).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from confluent_kafka import Consumer

from schemas.events import MessageRecord
from sealstream.adapters.kafka import delete_topics, ensure_topics, kafka_client_config
from sealstream.auth import mint_token
from sealstream.services import settings_env, spawn, stop
from sealstream.settings import HttpSettings, Settings
from tests.conftest import require_port
from tests.integration.conftest import host_port
from tests.kafka_records import opened_value, opener_for
from tests.tcp_proxy import TcpProxy, free_port, proxy

# Bounds for "answered without waiting out the hung server": the deadlines are 2 s (Postgres) and
# 5 s (Kafka); the old gateway took 30 s, 75 s or forever. Not speed checks: they sit well above
# the deadlines because a 2-core machine under a concurrent load of 14 answered a 48-post burst's
# slowest post in 11 s (10 s was the bound then), and still well below the old waits.
POSTGRES_BOUND = 20.0
KAFKA_BOUND = 20.0
POSTS = 48


@pytest.fixture(scope="module")
def base(settings: Settings, database: object) -> Iterator[Settings]:
    """The run's settings with message topics of this module's own."""
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.faults",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.faults",
        }
    )
    require_port("kafka", *host_port(kafka.bootstrap))
    require_port("redis", *host_port(settings.redis.url))
    ensure_topics(kafka)
    yield settings.model_copy(update={"kafka": kafka})
    delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])


class Gateway:
    """One gateway process; `url` is its base URL."""

    def __init__(self, settings: Settings, module: list[str] | None = None) -> None:
        self.settings = settings.model_copy(update={"ingest": HttpSettings(port=free_port())})
        self.url = f"http://127.0.0.1:{self.settings.ingest.port}"
        env = {**os.environ, **settings_env(self.settings)}
        if module is None:
            self.proc = spawn("ingest", env)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *module], env=env, start_new_session=True
            )
        self.wait_alive()

    def wait_alive(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("gateway not up")

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(self.settings.auth, user)}"}

    def new_chat(self, owner: str) -> str:
        created = httpx.post(
            f"{self.url}/v1/chats", json={}, headers=self.headers(owner), timeout=30
        )
        assert created.status_code == 201, created.text
        return str(created.json()["chat_id"])

    def post(
        self, user: str, chat: str, text: str, client_id: str | None, timeout: float = 60
    ) -> tuple[httpx.Response, float]:
        body: dict[str, str] = {"text": text}
        if client_id is not None:
            body["client_message_id"] = client_id
        started = time.monotonic()
        response = httpx.post(
            f"{self.url}/v1/chats/{chat}/messages",
            json=body,
            headers=self.headers(user),
            timeout=timeout,
        )
        return response, time.monotonic() - started

    def close(self) -> None:
        stop([self.proc], timeout=10)


@contextmanager
def gateway(settings: Settings, module: list[str] | None = None) -> Iterator[Gateway]:
    running = Gateway(settings, module)
    try:
        yield running
    finally:
        running.close()


def through(settings: Settings, **proxies: TcpProxy) -> Settings:
    """`settings` with Redis, Postgres and/or Kafka reached through the given proxies."""
    update: dict[str, object] = {}
    if "redis" in proxies:
        update["redis"] = settings.redis.model_copy(
            update={"url": f"redis://{proxies['redis'].address}/0"}
        )
    if "postgres" in proxies:
        update["postgres"] = settings.postgres.model_copy(update={"port": proxies["postgres"].port})
    if "kafka" in proxies:
        update["kafka"] = settings.kafka.model_copy(update={"bootstrap": proxies["kafka"].address})
    return settings.model_copy(update=update)


def topic_ids(settings: Settings, chat: str, expected: int, settle: float = 3.0) -> dict[str, set]:
    """client_message_id -> the message ids published for it in `chat` (fresh consumer group,
    from the start of the topic); waits for `expected` client ids, then `settle` s more."""
    consumer = Consumer(
        kafka_client_config(
            settings.kafka,
            {
                "group.id": f"check-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([settings.kafka.messages_topic])
    found: dict[str, set[int]] = {}
    copies: dict[str, int] = {}  # a re-published record is a second copy of the same message
    deadline, settled = time.monotonic() + 60, None
    opener = opener_for(settings)  # the gateway seals every record (docs/format.md)
    try:
        while time.monotonic() < deadline:
            if settled is None and len(found) >= expected:
                settled = time.monotonic() + settle
            if settled is not None and time.monotonic() >= settled:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            record = MessageRecord.model_validate_json(opened_value(opener, msg))
            if str(record.chat_id) == chat:
                found.setdefault(record.client_message_id or "", set()).add(record.message_id)
                copies[record.client_message_id or ""] = (
                    copies.get(record.client_message_id or "", 0) + 1
                )
    finally:
        consumer.close()
        opener.close()
    print(f"records on the topic per client_message_id: {copies}")
    return found


def retry_until_accepted(gw: Gateway, user: str, chat: str, text: str, client_id: str) -> dict:
    """What a client does after an unknown outcome: retry with the same id until 202."""
    deadline = time.monotonic() + 90
    while True:
        response, _ = gw.post(user, chat, text, client_id)
        if response.status_code == 202 or time.monotonic() > deadline:
            assert response.status_code == 202, response.text
            return dict(response.json())
        assert response.status_code == 503, response.text
        time.sleep(float(response.headers["Retry-After"]))


# --- (a) Redis is a cache: posting goes on without it -------------------------------------------


def test_posting_with_client_ids_goes_on_while_redis_is_down_or_hung(base: Settings) -> None:
    host, port = host_port(base.redis.url)
    with proxy(host, port) as redis, gateway(through(base, redis=redis)) as gw:
        chat = gw.new_chat("rita")
        first: dict[str, str] = {}
        for state, client_ids in ((redis.down, ("r1", "r2", "r3")), (redis.pause, ("r4", "r5"))):
            state()
            for client_id in client_ids:
                response, _ = gw.post("rita", chat, f"text {client_id}", client_id)
                assert response.status_code == 202, response.text
                first[client_id] = response.json()["message_id"]
                again, _ = gw.post("rita", chat, f"text {client_id}", client_id)
                assert again.status_code == 202, again.text
                assert again.json()["message_id"] == first[client_id]
                assert again.json()["duplicate"] is True
        redis.forward()
    published = topic_ids(base, chat, len(first))
    assert {k: {str(i) for i in v} for k, v in published.items()} == {
        k: {v} for k, v in first.items()
    }


# --- (b) a gateway killed mid-request: the retry makes no second message ----------------------


@pytest.mark.parametrize("mode", ["after-publish", "before-publish"])
def test_a_retry_after_the_gateway_was_killed_mid_request_yields_one_message(
    base: Settings, mode: str
) -> None:
    with gateway(base, ["tests.crashing_gateway", mode]) as doomed:
        chat = doomed.new_chat("kim")
        with pytest.raises(httpx.HTTPError):  # the connection dies with the process
            doomed.post("kim", chat, "said once", "crash-1")
        assert doomed.proc.wait(30) == -signal.SIGKILL
    with gateway(base) as fresh:  # a fresh gateway: it never saw the first request
        accepted = retry_until_accepted(fresh, "kim", chat, "said once", "crash-1")
        again = retry_until_accepted(fresh, "kim", chat, "said once", "crash-1")
    assert again["message_id"] == accepted["message_id"] and again["duplicate"] is True
    assert topic_ids(base, chat, 1) == {"crash-1": {int(accepted["message_id"])}}


# --- (c) Kafka hung past the publish deadline -------------------------------------------------


def test_kafka_hung_answers_503_in_time_and_retries_make_one_message_each(base: Settings) -> None:
    with proxy(*host_port(base.kafka.bootstrap)) as kafka:
        kafka.pause()  # the gateway's producer never hears from Kafka until `forward`
        with gateway(through(base, kafka=kafka)) as gw:
            chat = gw.new_chat("kai")
            answers: dict[str, tuple[httpx.Response, float]] = {}

            def post(client_id: str) -> None:
                answers[client_id] = gw.post("kai", chat, f"hung {client_id}", client_id)

            # More posts than the thread pool has threads (40): they must not hold threads.
            posts = [threading.Thread(target=post, args=(f"k{i}",)) for i in range(POSTS)]
            for thread in posts:
                thread.start()
            time.sleep(1.0)  # let the posts reach the gateway first
            # Chat creation does not need Kafka: it is not held up by the blocked posts.
            started = time.monotonic()
            other = gw.new_chat("kai")
            creation_seconds = time.monotonic() - started
            for thread in posts:
                thread.join()
            print(f"chat created in {creation_seconds:.2f}s while Kafka hung")
            slowest = max(seconds for _, seconds in answers.values())
            print(f"{len(answers)} posts answered 503 in {slowest:.2f}s at most")
            for response, seconds in answers.values():
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] and seconds < KAFKA_BOUND
            assert other and creation_seconds < POSTGRES_BOUND

            kafka.forward()  # Kafka is back; librdkafka may still deliver the first attempts
            ids = {
                client_id: retry_until_accepted(gw, "kai", chat, f"hung {client_id}", client_id)
                for client_id in answers
            }
    published = topic_ids(base, chat, len(ids), settle=5.0)
    assert published == {k: {int(v["message_id"])} for k, v in ids.items()}


# --- (d) Postgres hung or down: 503 in about its deadline, never a hang -----------------------


def test_postgres_hung_or_down_answers_503_with_retry_after_in_time(base: Settings) -> None:
    with proxy(base.postgres.host, base.postgres.port) as postgres:
        with gateway(through(base, postgres=postgres)) as gw:
            chat = gw.new_chat("pia")
            ok, _ = gw.post("pia", chat, "before", "p0")
            assert ok.status_code == 202, ok.text
            for state in (postgres.pause, postgres.down):
                state()
                # A chat this gateway has not cached: the participant check reads Postgres.
                response, seconds = gw.post("pia", str(uuid.uuid4()), "lost", None, timeout=30)
                print(f"{state.__name__} uncached chat: {response.status_code} {seconds:.2f}s")
                assert response.status_code == 503, response.text
                assert response.headers["Retry-After"] and seconds < POSTGRES_BOUND
                # The claim of a client message id is written to Postgres.
                for client_id in ("p1", "p2"):
                    response, seconds = gw.post("pia", chat, "during", client_id, timeout=30)
                    print(f"{state.__name__} {client_id}: {response.status_code} {seconds:.2f}s")
                    assert response.status_code == 503, response.text
                    assert response.headers["Retry-After"] and seconds < POSTGRES_BOUND
                started = time.monotonic()
                created = httpx.post(
                    f"{gw.url}/v1/chats", json={}, headers=gw.headers("pia"), timeout=30
                )
                seconds = time.monotonic() - started
                print(f"{state.__name__} create chat: {created.status_code} {seconds:.2f}s")
                assert created.status_code == 503 and created.headers["Retry-After"]
                assert seconds < POSTGRES_BOUND
            postgres.forward()
            accepted = retry_until_accepted(gw, "pia", chat, "during", "p1")
            assert accepted["duplicate"] is False
