"""Wiring and entrypoint of the encryptor worker (`sealstream run encryptor`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from encryptor.logic import store_batch
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import Publisher
from sealstream.adapters.object_store import ObjectStore
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.streaming import RawRecord, Rejected, run_worker
from sealstream.wiring import key_service

STAGE = "encryptor"


def run(settings: Settings) -> None:
    configure_logging(STAGE)
    with ExitStack() as stack:
        keys = stack.enter_context(key_service(settings, actor="encryptor"))
        store = MessageStore(settings.cassandra)
        store.connect()
        stack.callback(store.close)

        # A sender's deletion deletes its message's attachment objects (encryptor/logic.py).
        objects = ObjectStore(settings.object_store)
        stack.callback(objects.close)

        changes = Publisher(settings.kafka, client_id=f"{STAGE}-changes")
        stack.callback(changes.close)

        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            stored = store_batch(
                records, keys, store, keys.repo, settings.edits.window_seconds, objects
            )
            # Before the batch is committed (schemas/changes.py): a failure here raises, and the
            # runtime retries the whole batch; the rewrites are idempotent, the events are
            # deduplicated by event id downstream.
            changes.publish(
                settings.kafka.changes_topic, [(c.key(), c.value()) for c in stored.changes]
            )
            return stored.rejected

        # Batches flushed after 50 ms at most: the encryptor is on the path from post to readable,
        # unlike the indexer. 20 ms gave no better latency under load and smaller, costlier
        # batches (docs/benchmarks.md).
        run_worker(
            STAGE,
            settings,
            settings.kafka.encryptor_group,
            settings.encryptor_http,
            process,
            stack,
            max_size=500,
            max_wait=0.05,
        )
