"""Kafka adapter (confluent-kafka): topic set-up, the acknowledged publisher, the dead-letter writer.

The publisher is idempotent with acks=all: a caller is told "published" only once the broker has
the record on every in-sync replica, which is what lets the gateway answer 202 without ever losing
an acknowledged message. Kafka headers carry ids and reasons only, never message text.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from sealstream.errors import SealstreamError, StoreUnavailable
from sealstream.settings import KafkaSettings


class RecordRefused(SealstreamError):
    """The broker (or the client, before sending) refused this record for good: too large for
    the topic, or invalid. Publishing it again will fail again; the error code says why."""

    def __init__(self, code: str) -> None:
        super().__init__(f"Kafka refused the record ({code})")
        self.code = code


# Error codes about one record, not about the cluster: retrying cannot help.
_RECORD_REFUSED = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_MSG_SIZE,
}


def _delivery_error(err: KafkaError) -> SealstreamError:
    if err.code() in _RECORD_REFUSED:
        return RecordRefused(err.name())
    return StoreUnavailable(f"Kafka did not acknowledge: {err.name()}")


def ensure_topics(settings: KafkaSettings, timeout: float = 30.0) -> list[str]:
    """Create the message and dead-letter topics if missing; returns those created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(
            settings.messages_topic,
            num_partitions=settings.partitions,
            replication_factor=1,
            # Plaintext lives here: short retention by default (docs/security.md).
            config={"retention.ms": str(settings.retention_ms)},
        ),
        NewTopic(
            settings.dead_letter_topic,
            num_partitions=1,
            replication_factor=1,
            config={"retention.ms": str(settings.retention_ms * 7)},
        ),
    ]
    todo = [t for t in wanted if t.topic not in existing]
    created: list[str] = []
    for topic, future in (admin.create_topics(todo) if todo else {}).items():
        try:
            future.result(timeout)
            created.append(topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def delete_topics(settings: KafkaSettings, topics: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    for future in admin.delete_topics(list(topics)).values():
        try:
            future.result(30)
        except KafkaException:
            pass


Headers = list[tuple[str, str | bytes | None]]
OnDelivery = Callable[[KafkaError | None, Message], None]


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int


class Publisher:
    """An idempotent, acks=all producer with a background poll thread.

    `publish` returns only after the broker acknowledged every record; `publish_async` does the
    same for asyncio callers without blocking their event loop.
    """

    def __init__(self, settings: KafkaSettings, client_id: str, linger_ms: int = 0) -> None:
        self.settings = settings
        self._producer = Producer(
            {
                "bootstrap.servers": settings.bootstrap,
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                # 0: a single post is acknowledged in <1 ms instead of ~3 ms; records queued while
                # a request is in flight are still sent together.
                "linger.ms": linger_ms,
                "compression.type": "lz4",
                # A record not acknowledged in this time fails its caller (gateway answers 503).
                "delivery.timeout.ms": 30000,
            }
        )
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def _produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Headers | None,
        on_done: OnDelivery,
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_done
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: wait for deliveries to drain
            except KafkaException as exc:  # refused before sending, e.g. over message.max.bytes
                raise _delivery_error(exc.args[0]) from None

    async def publish_async(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes]],
        headers: Headers | None = None,
    ) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Delivery]] = [loop.create_future() for _ in items]

        def callback_for(future: asyncio.Future[Delivery]) -> OnDelivery:
            def done(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    error: BaseException = StoreUnavailable(
                        f"Kafka did not acknowledge: {err.name()}"
                    )
                    loop.call_soon_threadsafe(_fail, future, error)
                else:
                    delivery = Delivery(
                        msg.topic() or topic, msg.partition() or 0, msg.offset() or 0
                    )
                    loop.call_soon_threadsafe(_succeed, future, delivery)

            return done

        for (key, value), future in zip(items, futures, strict=True):
            self._produce(topic, key, value, headers, callback_for(future))
        return list(await asyncio.gather(*futures))

    def publish(
        self,
        topic: str,
        items: Sequence[tuple[bytes, bytes | None]],
        headers: Headers | None = None,
        timeout: float = 30.0,
    ) -> list[Delivery]:
        """Publish and wait for the acknowledgement of every record.

        Raises `RecordRefused` when a record can never be accepted (too large, invalid) and
        `StoreUnavailable` for anything else (no broker, no acknowledgement in `timeout`).
        """
        results: list[Delivery | BaseException | None] = [None] * len(items)
        done = threading.Event()
        remaining = [len(items)]
        lock = threading.Lock()

        def callback_for(index: int) -> OnDelivery:
            def callback(err: KafkaError | None, msg: Message) -> None:
                results[index] = (
                    _delivery_error(err)
                    if err is not None
                    else Delivery(msg.topic() or topic, msg.partition() or 0, msg.offset() or 0)
                )
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            return callback

        if not items:
            return []
        for index, (key, value) in enumerate(items):
            self._produce(topic, key, value, headers, callback_for(index))
        if not done.wait(timeout):
            raise StoreUnavailable(f"Kafka did not acknowledge within {timeout:.0f}s")
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Delivery)]

    def close(self, timeout: float = 10.0) -> None:
        self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)


def _succeed(future: asyncio.Future[Delivery], value: Delivery) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Delivery], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(frozen=True)
class DeadLetter:
    """Why a record can never be processed, and where it came from."""

    stage: str  # "encryptor" or "indexer"
    reason: str  # names the field and rule; never the text
    topic: str
    partition: int
    offset: int


def dead_letter_headers(letter: DeadLetter) -> Headers:
    """Where the record came from and why it was dead-lettered (see docs/operations.md)."""
    return [
        ("dlq.stage", letter.stage.encode()),
        ("dlq.reason", letter.reason.encode()[:1000]),
        ("dlq.topic", letter.topic.encode()),
        ("dlq.partition", str(letter.partition).encode()),
        ("dlq.offset", str(letter.offset).encode()),
    ]
