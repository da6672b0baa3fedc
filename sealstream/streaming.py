"""The consumer runtime shared by the encryptor and the indexer: a Faust agent that processes the
message topic in batches and commits an offset only after its batch was durably handled.

Why not `stream.take_events()`: it acks the buffered events in a `finally`, that is also when the
processing raised or the task was cancelled at shutdown, which would commit offsets of records that
were never written. Here the agent reads with `noack()`, hands events to a `Batcher`, and acks them
only after `process` returned, so a crash or SIGKILL at any point leads to redelivery (and the
stages are idempotent by message id), never to loss.

`process` receives raw records and returns the dead letters among them: records that fail the
schema, and records a sink refused one by one (a bulk item error, a row the database refuses).
Anything `process` raises is a failure of the batch as a whole and is retried with backoff,
holding the batch: the stream is paused, nothing is skipped. Dead letters go to the dead-letter
topic with the reason; one the topic refuses (too large) is replaced by a letter without the value.

Shutdown: SIGTERM sets a stop signal that every retry loop checks, so a worker whose sink is down
stops within its grace period; the batch in hand is then left unacked and is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import faust
from faust.types import EventT, StreamT
from faust.worker import Worker
from prometheus_client import Counter, Gauge, Histogram

from sealstream.adapters.kafka import DeadLetter, Publisher, RecordRefused, dead_letter_headers
from sealstream.observability import configure_logging
from sealstream.settings import HttpSettings, KafkaSettings, Settings
from sealstream.worker_http import serve

log = logging.getLogger(__name__)

RECORDS = Counter("sealstream_consumer_records", "Records handled", ["stage", "outcome"])
BATCH_SIZE = Histogram(
    "sealstream_consumer_batch_size",
    "Records per batch",
    ["stage"],
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
BATCH_SECONDS = Histogram(
    "sealstream_consumer_batch_seconds",
    "Time to handle one batch",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter("sealstream_consumer_retries", "Batches retried after a failure", ["stage"])
LAG = Gauge("sealstream_consumer_lag", "Records behind the end of the partition", ["stage"])


@dataclass(frozen=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class Rejected:
    """A record that can never be processed, and why (names the field/rule; no message text)."""

    record: RawRecord
    reason: str


Process = Callable[[Sequence[RawRecord]], list[Rejected]]
T = TypeVar("T")


class Stopped(Exception):
    """The worker is stopping: the batch in hand was not handled and must not be acked."""


def run_until_done(
    stage: str, process: Process, batch: Sequence[RawRecord], stop: threading.Event
) -> list[Rejected]:
    """Call `process` until it succeeds or `stop` is set: every failure here is retriable.

    Per-record permanent problems are returned as `Rejected` by `process` itself; anything raised
    means the batch as a whole could not be handled now (server down, overload), so we wait and try
    again rather than drop or skip. The backoff is capped so recovery is noticed within seconds.
    Raises `Stopped` once `stop` is set (checked before each attempt and during each wait); an
    attempt already running is not interrupted.
    """
    delay = 0.1
    attempt = 0
    while not stop.is_set():
        try:
            return process(batch)
        except Exception as exc:  # noqa: BLE001 - see docstring: hold the batch, never skip
            attempt += 1
            RETRIES.labels(stage).inc()
            log.warning(
                "batch failed, retrying",
                extra={
                    "stage": stage,
                    "attempt": attempt,
                    "error": type(exc).__name__,
                    "detail": str(exc)[:200],
                    "records": len(batch),
                },
            )
            if stop.wait(delay):
                break
            delay = min(delay * 2, 5.0)
    raise Stopped()


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run blocking `fn` off the event loop in a daemon thread.

    Not `asyncio.to_thread`: its pool threads are joined when the interpreter exits, so a sink
    call hanging at SIGTERM would keep the worker alive. Abandoning such a call is safe because
    nothing is acked until it returned: its batch is redelivered.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | BaseException) -> None:
        if future.done():  # the waiting task was cancelled (worker stopping)
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def target() -> None:
        outcome: T | BaseException
        try:
            outcome = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome = exc
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:
            pass  # the event loop is closed: the worker has stopped, nothing waits for this

    threading.Thread(target=target, name="sealstream-batch", daemon=True).start()
    return await future


class Batcher:
    """Collects events from the agent; flushes when full or when the oldest is `max_wait` old."""

    def __init__(
        self,
        stage: str,
        process: Process,
        dead_letters: DeadLetterWriter,
        max_size: int,
        max_wait: float,
        stop: threading.Event,
    ) -> None:
        self.stage = stage
        self.process = process
        self.dead_letters = dead_letters
        self.stop = stop
        self.max_size = max_size
        self.max_wait = max_wait
        self._events: list[EventT[Any]] = []
        self._first_at = 0.0
        self._lock = asyncio.Lock()
        self.stream: StreamT[Any] | None = None

    async def add(self, stream: StreamT[Any], event: EventT[Any]) -> None:
        self.stream = stream
        if not self._events:
            self._first_at = time.monotonic()
        self._events.append(event)
        if len(self._events) >= self.max_size:
            await self.flush()

    async def flush_if_due(self) -> None:
        if self._events and time.monotonic() - self._first_at >= self.max_wait:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._events or self.stream is None:
                return
            events, self._events = self._events, []
            started = time.perf_counter()
            records = [_raw(e) for e in events]
            try:
                rejected = await in_daemon_thread(
                    lambda: run_until_done(self.stage, self.process, records, self.stop)
                )
                if rejected:
                    await in_daemon_thread(
                        lambda: self.dead_letters.write(self.stage, rejected, self.stop)
                    )
            except Stopped:
                log.info(
                    "stopping: batch left unacked for redelivery",
                    extra={"stage": self.stage, "records": len(records)},
                )
                return
            # Only now is every record of the batch written (or dead-lettered): ack = may commit.
            for event in events:
                await self.stream.ack(event)
            RECORDS.labels(self.stage, "ok").inc(len(records) - len(rejected))
            RECORDS.labels(self.stage, "dead_letter").inc(len(rejected))
            BATCH_SIZE.labels(self.stage).observe(len(records))
            BATCH_SECONDS.labels(self.stage).observe(time.perf_counter() - started)


def _raw(event: EventT[Any]) -> RawRecord:
    message = event.message
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value if isinstance(message.value, bytes) else bytes(message.value or b""),
    )


class DeadLetterWriter:
    """Publishes dead letters: the record as it came (key, value) with `dlq.*` headers.

    A record the dead-letter topic refuses for good (larger than the topic takes) is replaced by
    a letter with the same key and headers, no value, and a `dlq.value` header saying why: the
    headers point at the original record, still in the message topic until its retention ends.
    Publishing is retried like a batch (the offset must not be committed before the topic has
    the letter) until `stop` is set; letters published before a stop are published again when
    the batch is redelivered.
    """

    def __init__(self, publisher: Publisher, topic: str) -> None:
        self.publisher = publisher
        self.topic = topic

    def write(self, stage: str, rejected: Sequence[Rejected], stop: threading.Event) -> None:
        for item in rejected:
            letter = DeadLetter(
                stage=stage,
                reason=item.reason,
                topic=item.record.topic,
                partition=item.record.partition,
                offset=item.record.offset,
            )
            log.warning(
                "record dead-lettered",
                extra={
                    "stage": stage,
                    "reason": item.reason,
                    "partition": letter.partition,
                    "offset": letter.offset,
                },
            )
            run_until_done(stage, self._publisher_for(letter), [item.record], stop)

    def _publisher_for(self, letter: DeadLetter) -> Process:
        def publish(records: Sequence[RawRecord]) -> list[Rejected]:
            headers = dead_letter_headers(letter)
            for r in records:
                try:
                    self.publisher.publish(self.topic, [(r.key or b"", r.value)], headers=headers)
                except RecordRefused as exc:
                    log.warning(
                        "dead letter published without its value",
                        extra={"stage": letter.stage, "offset": letter.offset, "error": exc.code},
                    )
                    omitted = f"omitted: the dead-letter topic refused it ({exc.code})"
                    self.publisher.publish(
                        self.topic,
                        [(r.key or b"", None)],
                        headers=[*headers, ("dlq.value", omitted.encode())],
                    )
            return []

        return publish


def _faust_datadir(group_id: str) -> Path:
    """A state folder per consumer group outside the working directory (Faust needs it to exist)."""
    path = Path(tempfile.gettempdir()) / "sealstream-faust" / group_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_app(
    stage: str,
    kafka: KafkaSettings,
    group_id: str,
    process: Process,
    dead_letters: DeadLetterWriter,
    max_size: int = 500,
    max_wait: float = 0.05,
    stop: threading.Event | None = None,
) -> tuple[faust.App, Batcher]:
    """A Faust app with one agent over the message topic in consumer group `group_id`.

    `stop` is set when the app begins to stop (SIGTERM), which ends the retry loops.
    """
    stop = stop if stop is not None else threading.Event()
    app = faust.App(
        group_id,
        broker=f"kafka://{kafka.bootstrap}",
        store="memory://",
        # Faust writes a small state folder per app; keep it out of the working directory.
        datadir=str(_faust_datadir(group_id)),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics are created by `sealstream migrate`, not by workers
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        # A crashed worker's partitions move to the survivors after ~10 s instead of Faust's 60 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        stream_buffer_maxsize=max_size * 4,
        # Stopping does not wait for the batch in hand to be acked: with a sink down it never
        # would be. Unacked records are redelivered to the next owner of the partition.
        stream_wait_empty=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    topic = app.topic(kafka.messages_topic, key_type=bytes, value_type=bytes)
    batcher = Batcher(stage, process, dead_letters, max_size, max_wait, stop)

    def end_retries(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        stop.set()  # sent as the app begins to stop (SIGTERM), before its agents are cancelled

    app.on_before_shutdown.connect(end_retries)

    async def agent(stream: StreamT[Any]) -> None:
        manual: Any = cast(Any, stream).noack()
        async for event in manual.events():
            await batcher.add(manual, event)

    app.agent(topic, name=f"{stage}-agent")(agent)

    @app.task  # type: ignore[untyped-decorator]
    async def flush_due() -> None:
        # A plain task, not app.timer: a flush may outlast the interval, which a timer warns about.
        while True:
            await asyncio.sleep(max_wait / 2)
            await batcher.flush_if_due()

    @app.task  # type: ignore[untyped-decorator]
    async def json_logs() -> None:
        # Faust's Worker installs its own log handlers at start-up; put ours back.
        configure_logging(stage)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        LAG.labels(stage).set(_lag(app))

    return app, batcher


def _lag(app: faust.App) -> float:
    """Sum over assigned partitions of (highwater - committed): the consumer lag metric."""
    try:
        consumer: Any = app.consumer
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            committed = consumer._committed_offset.get(tp) or 0
            if high is not None:
                total += max(0, high - committed)
        return float(total)
    except Exception:  # noqa: BLE001 - a metric must never break the worker
        return 0.0


def is_ready(app: faust.App) -> bool:
    """Joined its consumer group (has an assignment, possibly empty) and not rebalancing."""
    return getattr(app, "_assignment", None) is not None and not app.rebalancing


def run_worker(
    stage: str,
    settings: Settings,
    group_id: str,
    http: HttpSettings,
    process: Process,
    stack: ExitStack,
    max_size: int = 500,
    max_wait: float = 0.05,
) -> None:
    """Run a consumer worker until SIGTERM: dead-letter publisher, Faust app, health endpoint."""
    publisher = Publisher(settings.kafka, client_id=f"{stage}-dlq")
    stack.callback(publisher.close)
    stop = threading.Event()
    stack.callback(stop.set)  # whatever ends the worker also ends a retry loop still running
    app, _ = build_app(
        stage,
        settings.kafka,
        group_id,
        process,
        DeadLetterWriter(publisher, settings.kafka.dead_letter_topic),
        max_size=max_size,
        max_wait=max_wait,
        stop=stop,
    )
    endpoint = serve(http, ready=lambda: is_ready(app))
    stack.callback(endpoint.shutdown)
    worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        pass  # Faust exits this way after a graceful stop; the ExitStack closes the rest
