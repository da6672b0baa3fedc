"""Wiring and entrypoint of the gateway (`sealstream run ingest`)."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from datetime import datetime, timedelta

from confluent_kafka.admin import AdminClient
from fastapi import FastAPI

from ingest.api import UPLOAD_BODY, create_app
from ingest.idempotency import PostgresClaims
from ingest.service import CachedChats, IngestService
from schemas.events import MessageRecord
from sealstream.adapters.cassandra import AttachmentRow, MessageStore, StoredMessage
from sealstream.adapters.kafka import Headers, Publisher, kafka_client_config
from sealstream.adapters.object_store import ObjectStore, ObjectStoreError
from sealstream.adapters.postgres import ChatRow, Database
from sealstream.attachments import AttachmentFiles
from sealstream.crypto import TextFingerprints
from sealstream.errors import KeyDestroyed, StoreUnavailable, WorkerIdConflict
from sealstream.http import readiness, serve
from sealstream.keys.service import KeyService
from sealstream.lifecycle import settle_upload
from sealstream.observability import configure_logging
from sealstream.record_seal import RecordSealer, record_sealer
from sealstream.settings import CassandraSettings, KafkaSettings, ObjectStoreSettings, Settings
from sealstream.wiring import key_service
from sealstream.worker_ids import LeasedIds, lease_worker_id

SERVICE = "ingest"
log = logging.getLogger(__name__)
# A post's Postgres work, waiting for a worker thread included, ends within the Postgres
# deadline plus this (docs/operations.md, "Deadlines and idempotency").
POSTGRES_QUEUE_GRACE = 1.0


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

    def leave(self, chat_id: uuid.UUID, user_id: str) -> ChatRow | None:
        result = self.keys.set_participant(chat_id, user_id, present=False, reason="left")
        return None if result is None else result[0]


class AckedPublisher:
    """`RecordPublisher` on the shared acks=all producer: seals each record (when a `sealer` is
    given: `kafka.seal_records`), then awaits every acknowledgement for at most `deadline`
    seconds, on the event loop (no thread waits for Kafka)."""

    def __init__(
        self, publisher: Publisher, deadline: float, sealer: RecordSealer | None = None
    ) -> None:
        self.publisher = publisher
        self.deadline = deadline
        self.sealer = sealer

    async def publish(self, topic: str, records: Sequence[MessageRecord]) -> None:
        if self.sealer is None:
            items = [(r.key(), r.value()) for r in records]
            await self.publisher.publish_async(topic, items, timeout=self.deadline)
            return
        if self.sealer.ready(topic):
            # The slot's key is in memory: AES-GCM of a batch takes microseconds per record.
            sealed = _sealed(self.sealer, topic, records)
        else:
            # Once per slot (an hour): Postgres and maybe the KMS, off the event loop.
            sealed = await asyncio.to_thread(_sealed, self.sealer, topic, records)
        await self.publisher.publish_async(
            topic,
            [(key, value) for key, value, _ in sealed],
            timeout=self.deadline,
            record_headers=[headers for _, _, headers in sealed],
        )


def _sealed(
    sealer: RecordSealer, topic: str, records: Sequence[MessageRecord]
) -> list[tuple[bytes, bytes, Headers]]:
    keys = [record.key() for record in records]
    sealed = sealer.seal_many(
        topic, [(key, r.change_id, r.value()) for key, r in zip(keys, records, strict=True)]
    )
    return [(key, value, list(headers)) for key, (value, headers) in zip(keys, sealed, strict=True)]


class StoredMessages:
    """`MessageLookup` on the Cassandra message store, read only.

    It connects at its first use, not at start-up: posts never need Cassandra, so a Cassandra
    outage must neither stop a gateway from starting nor fail its readiness; only edits and
    deletions answer 503 until it is back. A failed connection is dropped and tried again by
    the next lookup."""

    def __init__(self, settings: CassandraSettings) -> None:
        self.settings = settings
        self._store: MessageStore | None = None
        self._lock = threading.Lock()

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None:
        return self._connected().get(chat_id, message_id)

    # The attachment rows (`sealstream.attachments.AttachmentRows`): uploads write them.
    def write_attachment(self, row: AttachmentRow) -> None:
        self._connected().write_attachment(row)

    def attachment(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        return self._connected().attachment(chat_id, file_id)

    def mark_attachment_shared(self, chat_id: uuid.UUID, file_id: int, when: datetime) -> None:
        self._connected().mark_attachment_shared(chat_id, file_id, when)

    def check(self) -> None:
        """Connect now if not connected; `StoreUnavailable` when Cassandra does not answer."""
        self._connected()

    def _connected(self) -> MessageStore:
        with self._lock:
            if self._store is None:
                store = MessageStore(self.settings)
                try:
                    store.connect()
                    if store.keyspace not in store.session.cluster.metadata.keyspaces:
                        raise StoreUnavailable(
                            f"Cassandra keyspace {store.keyspace} missing (run `sealstream migrate`)"
                        )
                except BaseException:
                    store.close()
                    raise
                self._store = store
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class GatewayAttachments:
    """`AttachmentStore` of the gateway: `AttachmentFiles` on the object store, the Cassandra
    rows of `StoredMessages` and the chat DEKs of the key service.

    Like `StoredMessages`, nothing connects at start-up: posts need neither the object store
    nor Cassandra, so an outage of either only makes uploads (and posts referencing
    attachments) answer 503. An upload checks Cassandra first, so an outage there refuses it
    before a byte is uploaded rather than after (`AttachmentFiles.store` would still remove
    the object if the row's write failed)."""

    def __init__(
        self,
        objects: ObjectStoreSettings,
        rows: StoredMessages,
        keys: KeyService,
        segment_size: int,
    ) -> None:
        self.objects_settings = objects
        self.rows = rows
        self.keys = keys
        self.segment_size = segment_size
        self._files: AttachmentFiles | None = None
        self._lock = threading.Lock()

    def store(
        self,
        chat_id: uuid.UUID,
        file_id: int,
        sender_id: str,
        content_type: str,
        chunks: Iterable[bytes],
        max_bytes: int,
    ) -> AttachmentRow:
        self.rows.check()
        files = self._opened()
        try:
            row = files.store(chat_id, file_id, sender_id, content_type, chunks, max_bytes)
        except ObjectStoreError:
            # A chat deletion aborts the uploads under the chat's prefix (NoSuchUpload here):
            # answer as for the deleted chat, not as for a store outage.
            if self._chat_deleted(chat_id):
                raise KeyDestroyed(f"chat {chat_id} was deleted during the upload") from None
            raise
        # The upload path's half of chat deletion (sealstream.lifecycle): a deletion that
        # listed the chat's objects before this one was complete is caught here.
        if not settle_upload(self.keys, files.objects, row):
            raise KeyDestroyed(f"chat {chat_id} was deleted during the upload")
        return row

    def _chat_deleted(self, chat_id: uuid.UUID) -> bool:
        chat = self.keys.chat(chat_id)
        return chat is None or chat.state == "deleted"

    def get(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        return self._opened().get(chat_id, file_id)

    def share(self, chat_id: uuid.UUID, file_ids: Iterable[int]) -> None:
        self._opened().share(chat_id, file_ids)

    def _opened(self) -> AttachmentFiles:
        with self._lock:
            if self._files is None:
                try:  # the client only (no request): local credentials are read from a file
                    objects = ObjectStore(self.objects_settings)
                except (OSError, ValueError) as exc:
                    raise StoreUnavailable(
                        f"object store client not configured ({type(exc).__name__})"
                    ) from None
                self._files = AttachmentFiles(objects, self.rows, self.keys, self.segment_size)
            return self._files

    def close(self) -> None:
        with self._lock:
            if self._files is not None:
                self._files.objects.close()
                self._files = None


class _ReadinessCheck:
    """The gateway's readiness: it holds a valid worker-id lease, Postgres answers and Kafka has
    the message topic. Redis is not checked: the gateway posts without it (a Redis outage must
    not take every gateway out of service). Nor is Cassandra: only edits and deletions read it.

    One admin client serves every probe. `close` lets it go: an AdminClient has no `close`, and
    librdkafka destroys it (and stops reconnecting to a broker that is gone) only once its last
    reference goes, which an app still referenced somewhere would otherwise keep for good.
    """

    def __init__(self, database: Database, kafka: KafkaSettings, ids: LeasedIds) -> None:
        self._database = database
        self._topic = kafka.messages_topic
        self._ids = ids
        client_id = f"{SERVICE}-{ids.worker_id}-readiness"
        self._admin: AdminClient | None = AdminClient(
            kafka_client_config(kafka, {"client.id": client_id})
        )

    def check(self) -> None:
        admin = self._admin
        if admin is None:
            raise StoreUnavailable("the gateway is shutting down")
        self._ids.check()
        with self._database.connection() as conn:
            conn.execute("SELECT 1")
        topics = admin.list_topics(timeout=2).topics  # all topics: never auto-creates one
        if self._topic not in topics:
            raise StoreUnavailable("the message topic does not exist (run `sealstream migrate`)")

    def close(self) -> None:
        self._admin = None


def build(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    """The gateway app on real adapters, and a function closing everything it opened (it
    flushes the producer first, so nothing acknowledged to a client stays in a local queue)."""
    stack = ExitStack()
    try:
        deadlines = settings.gateway
        database = Database(settings.postgres, deadline=deadlines.postgres_deadline_seconds)
        database.open()
        stack.callback(database.close)
        # Before anything else: a clash of a configured worker id stops the start-up here.
        ids = stack.enter_context(lease_worker_id(settings, SERVICE, database))
        keys = stack.enter_context(
            key_service(
                settings, database, actor=SERVICE, kms_deadline=deadlines.kms_deadline_seconds
            )
        )
        # linger 1 ms: the records of one request leave in one produce request instead of
        # several; at 150 ten-message posts a second the gateway used 34 % of a core instead of
        # 43 % (docs/benchmarks.md), for one more millisecond per post.
        publisher = Publisher(settings.kafka, client_id=f"ingest-{ids.worker_id}", linger_ms=1)
        stack.callback(publisher.close)
        # Every record is sealed under the topic's current key (docs/format.md); the gateway's
        # pool and KMS deadline apply to getting that key, once per rotation slot.
        sealer = (
            record_sealer(settings, database, kms_deadline=deadlines.kms_deadline_seconds)
            if settings.kafka.seal_records
            else None
        )
        if sealer is not None:
            stack.callback(sealer.close)
        claims = PostgresClaims(database, deadlines.idempotency_window_hours)
        claims.start_purging()
        stack.callback(claims.close)
        messages = StoredMessages(settings.cassandra)
        stack.callback(messages.close)
        attachments = GatewayAttachments(
            settings.object_store, messages, keys, settings.attachments.segment_size
        )
        stack.callback(attachments.close)
        chats = CachedChats(KeyServiceChats(keys))
        # A chat deleted by an operator refuses posts at once, not after the cache's TTL.
        keys.on_invalidation(lambda _action, chat_id: chats.forget(chat_id))
        service = IngestService(
            chats=chats,
            publisher=AckedPublisher(publisher, deadlines.kafka_deadline_seconds, sealer),
            ids=ids,
            claims=claims,
            fingerprints=TextFingerprints(deadlines.fingerprint_key(settings.auth)),
            topic=settings.kafka.messages_topic,
            postgres_budget=deadlines.postgres_deadline_seconds + POSTGRES_QUEUE_GRACE,
            messages=messages,
            edit_window=timedelta(seconds=settings.edits.window_seconds),
            cassandra_budget=deadlines.cassandra_deadline_seconds,
            attachments=attachments,
            attachment_settings=settings.attachments,
        )
        ready = _ReadinessCheck(database, settings.kafka, ids)
        stack.callback(ready.close)
        app = create_app(service, settings, readiness(ready.check))
        app.state.worker_ids = ids
    except BaseException:
        stack.close()
        raise
    return app, stack.close


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's graceful shutdown), TLS when configured; the
    app's lifespan shutdown then closes everything `build` opened, flushing the producer."""
    configure_logging(SERVICE)
    try:
        app, close = build(settings)
    except WorkerIdConflict as err:
        log.error("cannot start", extra={"reason": str(err)})
        raise SystemExit(2) from None
    log.info(
        "starting",
        extra={
            "port": settings.ingest.port,
            "tls": settings.ingest.tls,
            "worker_id": app.state.worker_ids.worker_id,
        },
    )
    # The upload streams up to `attachments.max_bytes` past the listener's body limit.
    serve(app, settings.ingest, close, large_bodies=[UPLOAD_BODY])
