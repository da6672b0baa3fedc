"""Wiring and entrypoint of the encryptor worker (`sealstream run encryptor`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from encryptor.logic import encrypt_and_store
from sealstream.adapters.cassandra import MessageStore
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

        def process(records: Sequence[RawRecord]) -> list[Rejected]:
            return encrypt_and_store(records, keys, store)

        run_worker(
            STAGE, settings, settings.kafka.encryptor_group, settings.encryptor_http, process, stack
        )
