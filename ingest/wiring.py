"""Wiring and entrypoint of the gateway (`sealstream run ingest`)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from fastapi import FastAPI

from ingest.api import create_app
from ingest.idempotency import RedisIdempotency
from ingest.service import CachedChats, IngestService
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import Publisher
from sealstream.adapters.postgres import ChatRow, Database
from sealstream.http import readiness, serve
from sealstream.keys.service import KeyService
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.wiring import key_service

SERVICE = "ingest"
log = logging.getLogger(__name__)


class KeyServiceChats:
    """The chat directory on the key service: creating a chat also creates its first DEK."""

    def __init__(self, keys: KeyService) -> None:
        self.keys = keys

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        return self.keys.chat(chat_id)

    def create(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None
    ) -> ChatRow:
        return self.keys.create_chat(chat_id, participants, tenant_id)


class AckedPublisher:
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def publish(self, topic: str, items: Sequence[tuple[bytes, bytes]]) -> None:
        self.publisher.publish(topic, items)


def build(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    stack = ExitStack()
    try:
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        keys = stack.enter_context(key_service(settings, database, actor=SERVICE))
        publisher = Publisher(settings.kafka, client_id=f"ingest-{settings.worker_id}")
        stack.callback(publisher.close)  # flushes: nothing accepted stays in the local queue
        idempotency = RedisIdempotency(settings.redis)
        stack.callback(idempotency.close)
        service = IngestService(
            chats=CachedChats(KeyServiceChats(keys)),
            publisher=AckedPublisher(publisher),
            ids=SnowflakeIds(settings.worker_id),
            idempotency=idempotency,
            topic=settings.kafka.messages_topic,
        )

        def check() -> None:
            with database.connection() as conn:
                conn.execute("SELECT 1")

        app = create_app(service, settings, readiness(check))
    except BaseException:
        stack.close()
        raise
    return app, stack.close


def run(settings: Settings) -> None:
    configure_logging(SERVICE)
    app, close = build(settings)
    serve(app, settings.ingest, close)
