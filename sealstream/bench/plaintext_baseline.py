"""The throughput bench's plaintext baseline: the encryptor's and the indexer's path (consume ->
write -> index) without key lookup and without crypto, into bench-only stores. Bench code only:
no product process imports it.

Two workers shaped like the product's, each in its own consumer group on the bench's plaintext
topic and plugged into the same consumer runtime (`sealstream.streaming.run_worker`, same batch
sizes and waits as the product workers):

- `writer`: decodes each record, checks the chat's deletion state (one Postgres read per batch,
  as the encryptor does) and writes the UTF-8 text where the product writes the envelope, through
  the same `MessageStore.write_many` (one unlogged batch per partition), into the `messages`
  table of a keyspace of its own (the bench names it `<bench keyspace>_plain`). What the product
  does on top: the chat key lookup (Redis/Postgres/KMS cache), `seal()`, and counting each DEK
  version's messages for rotation (one Postgres write per batch).
- `indexer`: the product's `indexer.logic.index_batch` (tokens only, deletion state per batch)
  into an index of its own. It is the product indexer's work exactly, so its CPU per message is
  the product indexer's without the runtime differences of a second process build.

Run as `python -m sealstream.bench.plaintext_baseline writer|indexer` with the bench's plaintext
settings in the environment (`SEALSTREAM_*`); stops on SIGTERM like the product workers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack

from encryptor.logic import MessageSink
from indexer.logic import index_batch
from schemas.ids import id_time
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.deletion_state import ChatStates, admitted_records
from sealstream.observability import configure_logging
from sealstream.settings import Settings
from sealstream.streaming import RawRecord, Rejected, run_worker

PLAIN_DEK_VERSION = 0  # no key: the row's "envelope" column holds the plaintext


def write_plain(
    records: Sequence[RawRecord], store: MessageSink, states: ChatStates | None
) -> list[Rejected]:
    """The encryptor's batch without its key lookup, its crypto and its DEK usage count."""
    admitted, rejected = admitted_records("plain-writer", records, states)
    source = {decoded.message_id: record for record, decoded in admitted}
    rows = [
        StoredMessage(
            chat_id=decoded.chat_id,
            message_id=decoded.message_id,
            sender_id=decoded.sender_id,
            dek_version=PLAIN_DEK_VERSION,
            envelope=(decoded.text or "").encode("utf-8"),  # the bench posts only
            created_at=id_time(decoded.message_id),
        )
        for _, decoded in admitted
    ]
    refused = store.write_many(rows)
    return rejected + [Rejected(source[r.message_id], r.reason) for r in refused]


def run(role: str, settings: Settings) -> None:
    """Run the `writer` or `indexer` baseline worker until SIGTERM."""
    configure_logging(f"plain-{role}")
    with ExitStack() as stack:
        database = Database(settings.postgres)
        database.open()
        stack.callback(database.close)
        chats = ChatKeyRepository(database)
        if role == "writer":
            store = MessageStore(settings.cassandra)
            store.connect()
            stack.callback(store.close)
            run_worker(
                "plain-writer",
                settings,
                settings.kafka.encryptor_group,
                settings.encryptor_http,
                lambda records: write_plain(records, store, chats),
                stack,
                max_size=500,  # as the encryptor (encryptor/worker.py)
                max_wait=0.05,
            )
        elif role == "indexer":
            index = SearchIndex(settings.opensearch)
            stack.callback(index.close)
            run_worker(
                "plain-indexer",
                settings,
                settings.kafka.indexer_group,
                settings.indexer_http,
                lambda records: index_batch(records, index, chats),
                stack,
                max_size=1000,  # as the indexer (indexer/worker.py)
                max_wait=0.2,
            )
        else:
            raise ValueError(f"role: writer or indexer, not {role!r}")


if __name__ == "__main__":
    run(sys.argv[1], Settings())
