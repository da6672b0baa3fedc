"""Wiring and entrypoint of the reader (`sealstream run reader`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack

from fastapi import FastAPI

from reader.api import create_app
from reader.query import TenantQueryTerms
from reader.service import CachedChatDirectory, ReaderService
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.attachments import AttachmentFiles
from sealstream.http import readiness, serve
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.wiring import index_keys, key_service, stores_reachable

SERVICE = "reader"
log = logging.getLogger(__name__)


def _ensure_keyspace(store: MessageStore) -> None:
    """Create the message tables if `sealstream migrate` has not (idempotent CQL)."""
    if store.keyspace not in store.session.cluster.metadata.keyspaces:
        log.warning("cassandra keyspace missing, creating it", extra={"keyspace": store.keyspace})
        store.migrate()


def build(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    """The reader app on real adapters, and a function closing everything it opened."""
    stack = ExitStack()
    try:
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        keys = stack.enter_context(key_service(settings, database, actor=SERVICE))
        store = MessageStore(settings.cassandra)
        stack.callback(store.close)
        store.connect()
        _ensure_keyspace(store)
        index = SearchIndex(settings.opensearch)
        stack.callback(index.close)
        # Not in the readiness check: history and search do not need the object store, and a
        # download while it is down answers 503 like any other unavailable dependency.
        objects = ObjectStore(settings.object_store)
        stack.callback(objects.close)
        files = AttachmentFiles(objects, store, keys, settings.attachments.segment_size)
        chats = CachedChatDirectory(keys.chat, members=ChatKeyRepository(database).member_chats)
        keys.on_invalidation(lambda _action, chat_id: chats.forget(chat_id))
        service = ReaderService(
            chats=chats,
            messages=store,
            keys=keys,
            search_index=index,
            analyzer=index,
            # Plain words for plain tenants, keyed terms for blind-index tenants.
            query_terms=TenantQueryTerms(index_keys(settings, database, actor=SERVICE)),
            attachments=files,
        )
        app = create_app(
            service, settings, readiness(lambda: stores_reachable(database, store, index))
        )
    except BaseException:
        stack.close()
        raise
    return app, stack.close


def run(settings: Settings) -> None:
    configure_logging(SERVICE)
    app, close = build(settings)
    serve(app, settings.reader, close)
