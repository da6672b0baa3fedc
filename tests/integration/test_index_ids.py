"""A message id another chat already used (a direct producer not leasing its Snowflake worker
id, or a forged record): the index's documents are keyed by message id alone, so the second
chat's document must be refused (dead-lettered), not counted as "already indexed", and deleting
the second chat's message must not remove the first chat's document. Real OpenSearch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sealstream.adapters.opensearch import IndexedMessage, SearchIndex
from tests.search_terms import plain_terms


def test_a_message_id_reused_by_another_chat_is_refused_and_deletes_nothing(
    search_index: SearchIndex,
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    original = IndexedMessage(9001, first, "default", "alice", now, plain_terms("alpha original"))
    assert search_index.index_many([original]) == []

    refused = search_index.index_many(
        [IndexedMessage(9001, second, "default", "mallory", now, plain_terms("beta impostor"))]
    )

    assert [r.message_id for r in refused] == [9001]
    assert "another chat" in refused[0].reason and "impostor" not in refused[0].reason
    assert search_index.index_many([original]) == []  # a redelivery is still done, not refused
    search_index.delete_message(second, 9001)
    search_index.refresh()
    assert search_index.search_chat(first, "alpha") == [9001]
    assert search_index.search_chat(second, "beta") == []
