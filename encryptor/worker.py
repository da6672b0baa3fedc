"""Wiring and entrypoint of the encryptor worker (`sealstream run encryptor`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from faust.worker import Worker

from encryptor.logic import encrypt_and_store
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import Publisher
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.streaming import DeadLetterWriter, RawRecord, Rejected, build_app, is_ready
from sealstream.wiring import key_service
from sealstream.worker_http import serve

STAGE = "encryptor"


def run(settings: Settings) -> None:
    configure_logging(STAGE)
    with ExitStack() as stack:
        keys = stack.enter_context(key_service(settings))
        store = MessageStore(settings.cassandra)
        store.connect()
        stack.callback(store.close)
        publisher = Publisher(settings.kafka, client_id=f"{STAGE}-dlq")
        stack.callback(publisher.close)

        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            return encrypt_and_store(records, keys, store)

        app, _ = build_app(
            STAGE,
            settings.kafka,
            settings.kafka.encryptor_group,
            process,
            DeadLetterWriter(publisher, settings.kafka.dead_letter_topic),
        )
        http = serve(settings.encryptor_http, ready=lambda: is_ready(app))
        stack.callback(http.shutdown)
        worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass
