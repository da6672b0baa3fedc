"""Wiring and entrypoint of the admin API (`sealstream run admin`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, closing

from fastapi import FastAPI

from admin.api import AdminContext, DeadLetterAccess, create_app
from admin.jobs import JobRunner
from schemas.changes import ChangeEvent
from sealstream.adapters.kafka import ConsumerGroupsProgress, DeadLetterReader, Publisher
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.postgres import Database, DeadLetterReplays
from sealstream.http import readiness, serve
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.wiring import index_keys, key_service, message_stores, stores_reachable
from sealstream.worker_ids import lease_worker_id

SERVICE = "admin"


def build(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    """The admin app on real adapters, and a function closing everything it opened."""
    stack = ExitStack()
    try:
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        keys = stack.enter_context(key_service(settings, database, actor=SERVICE))
        store, index = stack.enter_context(message_stores(settings))
        # Deletion and retention remove attachment objects (no connection is made here).
        objects = ObjectStore(settings.object_store)
        stack.callback(objects.close)
        # Event ids of the deletions it announces come from a leased generator, like message ids.
        ids = stack.enter_context(lease_worker_id(settings, SERVICE, database))
        publisher = Publisher(settings.kafka, client_id=f"{SERVICE}-changes")
        stack.callback(publisher.close)

        def publish_change(event: ChangeEvent) -> None:
            publisher.publish(settings.kafka.changes_topic, [(event.key(), event.value())])

        jobs = JobRunner()
        stack.callback(jobs.close)

        ready = readiness(lambda: stores_reachable(database, store, index))
        app = create_app(
            AdminContext(
                keys,
                store,
                index,
                ConsumerGroupsProgress(settings.kafka),
                index_keys(settings, database, actor=SERVICE),
                changes=publish_change,
                ids=ids.next_id,
                dead_letters=DeadLetterAccess(
                    open_reader=lambda: closing(DeadLetterReader(settings.kafka)),
                    sink=publisher,  # acks=all, idempotent: replays are acknowledged like posts
                    ledger=DeadLetterReplays(database),
                    messages_topic=settings.kafka.messages_topic,
                ),
                objects=objects,
            ),
            jobs,
            settings,
            ready,
        )
    except BaseException:
        stack.close()
        raise
    return app, stack.close


def run(settings: Settings) -> None:
    configure_logging(SERVICE)
    app, close = build(settings)
    serve(app, settings.admin, close)
