"""No message text reaches OpenSearch: the indexer sends each message's sorted set of tokens,
and neither the mapping, `_source`, the translog nor the segments hold text. Real OpenSearch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from opensearchpy import OpenSearch

from sealstream.adapters.opensearch import IndexedMessage, SearchIndex
from tests.conftest import index_folder, phrases
from tests.search_terms import plain_terms


def test_indexer_sends_tokens_not_text(search_index: SearchIndex) -> None:
    chat = uuid.uuid4()
    search_index.index_many(
        [
            IndexedMessage(
                301, chat, "default", "alice", datetime.now(UTC), plain_terms("Zebra ate the ZEBRA")
            )
        ]
    )
    search_index.refresh()
    mapping = search_index._client.indices.get_mapping(index=search_index.index)
    properties = mapping[search_index.index]["mappings"]["properties"]
    assert "text" not in properties and properties["tokens"]["type"] == "keyword"
    source = next(s for s in search_index.all_sources() if s["message_id"] == 301)
    assert set(source) == {"message_id", "chat_id", "tenant_id", "sender_id", "sent_at"}
    assert search_index.search_chat(chat, "ZEBRA the") == [301]
    assert search_index.search_chat(chat, "zebra giraffe") == []
    assert search_index.search_chat(chat, "?!") == []


def test_index_files_hold_tokens_but_no_text(search_index: SearchIndex) -> None:
    chat = uuid.uuid4()
    texts = [f"meet me by the quince{n}tree at dawn — ünïcödé 東京 {n}" for n in range(5)]
    search_index.index_many(
        [
            IndexedMessage(400 + n, chat, "default", "alice", datetime.now(UTC), plain_terms(text))
            for n, text in enumerate(texts)
        ]
    )
    client = OpenSearch(hosts=[search_index.settings.url])
    client.indices.refresh(index=search_index.index)
    folder = index_folder(client, search_index.index)
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # The translog keeps every document as sent: the tokens are there, so the scan can see.
    assert any("translog" in str(p) and b"quince3tree" in d for p, d in files.items())
    for text in texts:
        for needle in phrases(text):
            for encoded in (needle.encode(), needle.encode("utf-16-le")):
                found = [str(p.relative_to(folder)) for p, d in files.items() if encoded in d]
                assert not found, f"{needle!r} found in {found}"
    assert search_index.search_chat(chat, "quince3tree dawn") == [403]
    assert sorted(search_index.search_chat(chat, "東京")) == [400, 401, 402, 403, 404]
    client.close()
