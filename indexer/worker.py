"""Wiring and entrypoint of the indexer worker (`sealstream run indexer`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from faust.worker import Worker

from indexer.logic import index_batch
from sealstream.adapters.kafka import Publisher
from sealstream.adapters.opensearch import SearchIndex
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.streaming import DeadLetterWriter, RawRecord, Rejected, build_app, is_ready
from sealstream.worker_http import serve

STAGE = "indexer"


def run(settings: Settings) -> None:
    configure_logging(STAGE)
    with ExitStack() as stack:
        index = SearchIndex(settings.opensearch)
        stack.callback(index.close)
        publisher = Publisher(settings.kafka, client_id=f"{STAGE}-dlq")
        stack.callback(publisher.close)

        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            return index_batch(records, index)

        app, _ = build_app(
            STAGE,
            settings.kafka,
            settings.kafka.indexer_group,
            process,
            DeadLetterWriter(publisher, settings.kafka.dead_letter_topic),
            max_size=1000,
            max_wait=0.2,
        )
        http = serve(settings.indexer_http, ready=lambda: is_ready(app))
        stack.callback(http.shutdown)
        worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
