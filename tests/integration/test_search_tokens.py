"""No message text is stored by OpenSearch: the indexer sends a batch's texts to `_analyze` only
(analysed in the node's memory), then indexes each message's sorted set of index terms; neither
the mapping, `_source`, the bulk requests, the translog nor the segments hold text. Real
OpenSearch."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

from opensearchpy import OpenSearch

from indexer.logic import index_batch
from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import SearchIndex
from sealstream.streaming import RawRecord
from tests.conftest import index_folder, phrases
from tests.integration.conftest import text_message

IDS = SnowflakeIds(8)


def records(chat: uuid.UUID, texts: list[str]) -> list[RawRecord]:
    """Raw message records of `texts`, as the gateway publishes them."""
    values = [
        {
            "message_id": IDS.next_id(),
            "chat_id": str(chat),
            "sender_id": "alice",
            "text": text,
            "sent_at": datetime.now(UTC).isoformat(),
        }
        for text in texts
    ]
    return [
        RawRecord("t", 0, n, str(chat).encode(), json.dumps(value).encode())
        for n, value in enumerate(values)
    ]


def node_logs(client: OpenSearch) -> dict[Path, bytes]:
    """Every log file of the (local) node: `path.logs` and the local stack's `server.log`."""
    [node] = client.nodes.info(node_id="_local", metric="settings")["nodes"].values()
    paths = node["settings"]["path"]
    files = [p for p in Path(paths["logs"]).rglob("*") if p.is_file()]
    files += [p for p in [Path(paths["home"]) / "server.log"] if p.is_file()]
    return {p: p.read_bytes() for p in files}


def test_indexer_sends_tokens_not_text(search_index: SearchIndex) -> None:
    chat = uuid.uuid4()
    search_index.index_many(
        [
            text_message(
                search_index,
                301,
                chat,
                "default",
                "alice",
                datetime.now(UTC),
                "Zebra ate the ZEBRA",
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


def test_only_analyze_requests_carry_text(
    search_index: SearchIndex, wire: list[tuple[str, bytes]]
) -> None:
    marker = uuid.uuid4().hex[:8]  # this run's texts, so a log line of another run cannot count
    texts = [f"the walrus{marker} hums softly tonight", f"Ünïcödé grüße{marker} aus 東京 🚀 — ok"]
    chat = uuid.uuid4()
    assert index_batch(records(chat, texts), search_index) == []
    analyze = [body for path, body in wire if path.endswith("/_analyze")]
    others = [(path, body) for path, body in wire if not path.endswith("/_analyze")]
    # One `_analyze` request for the batch, holding its texts: analysed in memory, never stored.
    assert len(analyze) == 1 and json.loads(analyze[0])["text"] == texts
    assert any(path.endswith("/_bulk") for path, _ in others)
    for text in texts:
        for needle in phrases(text):
            for path, body in others:
                assert needle.encode() not in body, f"{needle!r} sent to {path}"
                assert json.dumps(needle).encode() not in body, f"{needle!r} sent to {path}"
    bulk = b"".join(body for path, body in others if path.endswith("/_bulk"))
    assert f"walrus{marker}".encode() in bulk and "東京".encode() in bulk  # terms, one by one
    # Nor did the node log what it analysed: its log folder and the stack's server.log.
    logs = node_logs(search_index._client)
    assert logs, "no OpenSearch log file found: is the node on this machine?"
    for text in texts:
        for needle in phrases(text):
            assert not [str(p) for p, data in logs.items() if needle.encode() in data], needle


def test_index_files_hold_tokens_but_no_text(search_index: SearchIndex) -> None:
    chat = uuid.uuid4()
    texts = [f"meet me by the quince{n}tree at dawn — ünïcödé 東京 {n}" for n in range(5)]
    assert index_batch(records(chat, texts), search_index) == []
    search_index.refresh()
    ids = sorted(search_index.search_chat(chat, "東京", limit=10))
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
    assert search_index.search_chat(chat, "quince3tree dawn") == [ids[3]]
    assert len(ids) == 5
    client.close()
