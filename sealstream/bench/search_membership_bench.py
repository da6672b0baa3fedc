"""Figures for search across the chats of one user (docs/search.md, "API"): how long reading a
user's 1,000 chats from Postgres takes, and one `search_messages` page filtered on those 1,000
chat ids. Not `sealstream bench search` (issue 12's full benchmark, on 1,000,000 messages).

Run: `.venv/bin/python -m sealstream.bench.search_membership_bench [documents]` against the
running local stack; it works in a schema and an index of its own and removes them at the end.
Prints p50/p99 over 200 calls of each; asserts nothing about time.
"""

from __future__ import annotations

import random
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from opensearchpy import helpers

from sealstream.adapters.opensearch import SearchIndex, SearchRequest, SearchSort, WordMatch
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.settings import Settings

USER_CHATS = 1_000
OTHER_CHATS = 20_000
CALLS = 200


def _percentiles(fn: Callable[[], object], calls: int = CALLS) -> str:
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return f"p50 {took[len(took) // 2]:.1f} ms, p99 {took[int(len(took) * 0.99) - 1]:.1f} ms"


def run(documents: int = 50_000) -> None:
    base = Settings()
    run_id = f"bench_{secrets.token_hex(3)}"
    db = Database(base.postgres.model_copy(update={"schema_name": run_id}))
    index = SearchIndex(base.opensearch.model_copy(update={"index_prefix": run_id}))
    db.open()
    try:
        db.migrate()
        index.migrate()
        with db.connection() as conn:
            conn.execute("INSERT INTO tenants (tenant_id, kms_key_name) VALUES ('default', 'k')")
            conn.execute(
                "INSERT INTO chats (chat_id, tenant_id, participants) SELECT gen_random_uuid(),"
                " 'default', ARRAY['alice', 'u' || g] FROM generate_series(1, %s) g",
                (USER_CHATS,),
            )
            conn.execute(
                "INSERT INTO chats (chat_id, tenant_id, participants) SELECT gen_random_uuid(),"
                " 'default', ARRAY['u' || g, 'v' || g] FROM generate_series(1, %s) g",
                (OTHER_CHATS,),
            )
            # Steady state: new GIN entries wait in the index's pending list (scanned linearly
            # by every search, about twice the time here) until autovacuum merges them.
            conn.execute("VACUUM ANALYZE chats")
        repo = ChatKeyRepository(db)
        mine = [c.chat_id for c in repo.member_chats("alice", 10_001)]
        others = [uuid.uuid4() for _ in range(USER_CHATS)]
        words = [f"w{i}" for i in range(2000)]
        rng = random.Random(1)  # noqa: S311 (made-up words, not secrets)

        def docs() -> Iterator[dict[str, Any]]:
            for i in range(documents):  # a quarter in alice's chats, 12 words of 2,000 each
                chat = rng.choice(mine if i % 4 == 0 else others)
                source = {"message_id": i + 1, "chat_id": str(chat), "tenant_id": "default"}
                source["sender_id"] = "s"
                source["sent_at"] = datetime.now(UTC).isoformat()
                source["tokens"] = sorted(set(rng.choices(words, k=12)))
                yield {"_index": index.index, "_id": str(i + 1), "_source": source}

        helpers.bulk(index._client, docs(), chunk_size=2000)
        index.refresh()
        print(
            f"member_chats ({len(mine)} chats of one user among {USER_CHATS + OTHER_CHATS}):",
            _percentiles(lambda: repo.member_chats("alice", 10_001)),
        )
        sorts: tuple[SearchSort, ...] = ("newest", "relevance")
        for sort in sorts:

            def one(sort: SearchSort = sort) -> object:
                word = WordMatch([rng.choice(words)], [rng.choice(words)])
                return index.search_messages(
                    SearchRequest(chat_ids=mine, words=[word], sort=sort, size=21)
                )

            print(f"search_messages, {len(mine)} chats, {documents} documents, {sort}:", end=" ")
            print(_percentiles(one))
        prefix = WordMatch(["w1"], ["w1"], prefix="w1")  # w1, w10..w19, w100..w199: 111 terms
        print(
            "search_messages with a prefix word (111 terms):",
            _percentiles(
                lambda: index.search_messages(SearchRequest(chat_ids=mine, words=[prefix], size=21))
            ),
        )
    finally:
        index.drop()
        index.close()
        db.drop_schema()
        db.close()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
