"""Wiring and entrypoint of the indexer worker (`sealstream run indexer`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from indexer.logic import index_batch
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.streaming import RawRecord, Rejected, run_worker
from sealstream.wiring import index_keys

STAGE = "indexer"


def run(settings: Settings) -> None:
    configure_logging(STAGE)
    with ExitStack() as stack:
        index = SearchIndex(settings.opensearch)
        stack.callback(index.close)
        # Postgres for the chats' deletion state (read once per batch).
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        chats = ChatKeyRepository(database)
        # Blind-index tenants: their terms are keyed (index keys unwrapped in memory only).
        keys = index_keys(settings, database, actor=STAGE)

        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            return index_batch(records, index, chats, keys, settings.edits.window_seconds)

        # Bigger, slower batches than the encryptor: OpenSearch prefers fewer, larger bulks.
        run_worker(
            STAGE,
            settings,
            settings.kafka.indexer_group,
            settings.indexer_http,
            process,
            stack,
            max_size=1000,
            max_wait=0.2,
        )
