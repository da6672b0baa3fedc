"""Wiring and entrypoint of live delivery (`sealstream run delivery`): the change-topic follower
thread, the membership listener thread and the HTTP app on real adapters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack

from fastapi import FastAPI

from delivery.api import create_app
from delivery.hub import Hub
from delivery.service import DeliveryService
from reader.service import EnvelopeOpener
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import TopicTail
from sealstream.adapters.postgres import ChatKeyRepository, Database, MembershipListener
from sealstream.errors import StoreUnavailable
from sealstream.http import readiness, serve
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.wiring import key_service

SERVICE = "delivery"
log = logging.getLogger(__name__)


class ChangeFollower:
    """Polls the change topic (`TopicTail`, every partition from the end) in a daemon thread and
    hands each batch of records to `handle`. Kafka outages are logged and polled through."""

    def __init__(self, tail: TopicTail, handle: Callable[[list[bytes]], None]) -> None:
        self.tail = tail
        self.handle = handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-follower", daemon=True)

    def start(self) -> None:
        self.tail.open()  # raises StoreUnavailable: the process does not start without it
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.tail.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                values = self.tail.poll(0.2)
            except StoreUnavailable as exc:
                log.warning("change topic unavailable", extra={"error": str(exc)})
                self._stop.wait(1.0)
                continue
            try:
                self.handle(values)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop delivery
                log.error("change batch failed", extra={"error": type(exc).__name__})


def build(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    """The delivery app on real adapters, and a function closing everything it opened."""
    stack = ExitStack()
    try:
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        keys = stack.enter_context(key_service(settings, database, actor=SERVICE))
        store = MessageStore(settings.cassandra)
        stack.callback(store.close)
        store.connect()
        hub = Hub()
        service = DeliveryService(
            hub=hub,
            # Uncached: a participant removed is refused at the next subscribe.
            chat=ChatKeyRepository(database).chat,
            rows=store,
            opener=EnvelopeOpener(keys, store.get),
            window_seconds=settings.edits.window_seconds,
            max_resume_events=settings.delivery.max_resume_events,
        )
        listener = MembershipListener(settings.postgres, service.membership_changed)
        listener.start()
        stack.callback(listener.close)
        follower = ChangeFollower(
            TopicTail(settings.kafka, settings.kafka.changes_topic, client_id=SERVICE),
            service.on_records,
        )
        follower.start()
        stack.callback(follower.close)

        def check() -> None:
            if not (follower.alive and listener.listening):
                raise StoreUnavailable("change follower or membership listener not running")
            with database.connection() as conn:
                conn.execute("SELECT 1")
            store.session.execute("SELECT now() FROM system.local")

        app = create_app(service, settings, readiness(check))
    except BaseException:
        stack.close()
        raise
    return app, stack.close


def run(settings: Settings) -> None:
    configure_logging(SERVICE)
    app, close = build(settings)
    # No per-message deflate: one socket carries many senders' messages through one compression
    # context, so the compressed size of a frame would tell an attacker who posts into a chat
    # whether their text matches another's (a CRIME-style oracle on the TLS record sizes). It also
    # costs ~250 KiB of zlib state per connection (docs/benchmarks.md, "Live delivery").
    serve(app, settings.delivery, close, ws_deflate=False)
