"""The reader's HTTP API, built by reader.wiring.build, against the real local stack.

Data is seeded exactly as the encryptor and indexer write it: a chat made by the key service,
each text sealed with the chat's current DEK for (chat id, Snowflake message id), rows written to
Cassandra and token documents to OpenSearch. The reader then has to read it all back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from reader.wiring import build
from schemas.ids import BUCKET_MS, SnowflakeIds, bucket_of, id_millis
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import IndexedMessage, SearchIndex
from sealstream.auth import mint_token
from sealstream.keys.service import KeyService
from sealstream.settings import AuthSettings, Settings
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_index, fresh_store, module_stores, text_message
from tests.sealed_rows import sealed_row

NON_ASCII = "café 世界 🚀 ✓ — ünïcödé"


@pytest.fixture(scope="module")
def reader_settings(settings: Settings) -> Settings:
    """This run's settings with a keyspace and index of this module's own (the e2e tier drops
    the run's shared ones while it tears down)."""
    return module_stores(settings, "reader")


@pytest.fixture(scope="module")
def store(reader_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(reader_settings) as store:
        yield store


@pytest.fixture(scope="module")
def index(reader_settings: Settings) -> Iterator[SearchIndex]:
    with fresh_index(reader_settings) as index:
        yield index


@pytest.fixture(scope="module")
def keys(reader_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(reader_settings.vault.default_key)  # the kms fixture deletes it at the end
    with key_service(reader_settings, database) as service:
        yield service


@pytest.fixture(scope="module")
def client(
    reader_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[TestClient]:
    app, close = build(reader_settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


class Seeder:
    """Writes messages the way the pipeline does (encryptor -> Cassandra, indexer -> OpenSearch)."""

    def __init__(self, keys: KeyService, store: MessageStore, index: SearchIndex) -> None:
        self.keys = keys
        self.store = store
        self.index = index
        self.ids = SnowflakeIds(worker_id=901)

    def chat(self, participants: tuple[str, ...] = ("alice", "bob")) -> uuid.UUID:
        chat_id = uuid.uuid4()
        self.keys.create_chat(chat_id, participants)
        return chat_id

    def post(
        self,
        chat_id: uuid.UUID,
        texts: list[str],
        sender: str = "alice",
        ids: SnowflakeIds | None = None,
    ) -> list[int]:
        key = self.keys.current_key(chat_id)
        rows: list[StoredMessage] = []
        documents: list[IndexedMessage] = []
        for text in texts:
            message_id = (ids or self.ids).next_id()
            sent_at = datetime.fromtimestamp(id_millis(message_id) / 1000, UTC)
            rows.append(sealed_row(chat_id, message_id, sender, key, text, sent_at))
            documents.append(
                text_message(self.index, message_id, chat_id, "default", sender, sent_at, text)
            )
        self.store.write_many(rows)
        self.index.index_many(documents)
        self.index.refresh()
        return [row.message_id for row in rows]


@pytest.fixture(scope="module")
def seed(keys: KeyService, store: MessageStore, index: SearchIndex) -> Seeder:
    return Seeder(keys, store, index)


def auth(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, user)}"}


@pytest.fixture(scope="module")
def as_user(reader_settings: Settings) -> Callable[[str], dict[str, str]]:
    return lambda user: auth(reader_settings, user)


def history(
    client: TestClient, headers: dict[str, str], chat_id: uuid.UUID, limit: int = 50
) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["before"] = cursor
        response = client.get(f"/v1/chats/{chat_id}/messages", params=params, headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "paging does not end"


# --- reading -----------------------------------------------------------------------------------


def test_one_message_reads_back_exact(client: TestClient, seed: Seeder, as_user) -> None:
    chat = seed.chat()
    [message_id] = seed.post(chat, [f"hello {NON_ASCII}"], sender="bob")
    response = client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=as_user("alice"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "message_id": str(message_id),
        "chat_id": str(chat),
        "sender_id": "bob",
        "text": f"hello {NON_ASCII}",
        "sent_at": body["sent_at"],
        "revision": 1,  # as posted: never edited
        "edited_at": None,
        "attachments": [],  # references no file
    }
    sent_at = datetime.fromisoformat(body["sent_at"])
    assert int(sent_at.timestamp() * 1000) == id_millis(message_id)


def test_a_message_shows_the_attachments_it_references(
    client: TestClient, seed: Seeder, store: MessageStore, as_user
) -> None:
    """The row's `attachment_ids` (written by the encryptor from the record) come out as
    decimal strings in the sender's order, in one message, history and search alike."""
    chat = seed.chat()
    [plain] = seed.post(chat, ["attachedword plain"], sender="bob")
    [message_id] = seed.post(chat, ["attachedword with files"], sender="bob")
    row = store.get(chat, message_id)
    assert row is not None
    files = (2**62 + 5, 17)  # a large id stays exact: it is a string in JSON
    store.write_many([dataclasses.replace(row, attachment_ids=files)])
    expected = ["4611686018427387909", "17"]

    one = client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=as_user("alice"))
    assert one.json()["attachments"] == expected
    page = client.get(f"/v1/chats/{chat}/messages", headers=as_user("alice")).json()
    assert {m["message_id"]: m["attachments"] for m in page["messages"]} == {
        str(message_id): expected,
        str(plain): [],
    }
    found = client.get(
        f"/v1/chats/{chat}/search", params={"q": "attachedword"}, headers=as_user("alice")
    ).json()
    assert {m["message_id"]: m["attachments"] for m in found["messages"]} == {
        str(message_id): expected,
        str(plain): [],
    }


def test_history_of_120_pages_newest_first_50_50_20(
    client: TestClient, seed: Seeder, as_user
) -> None:
    chat = seed.chat()
    texts = [f"history line {i} {NON_ASCII}" for i in range(120)]
    ids = seed.post(chat, texts)
    pages = history(client, as_user("bob"), chat)
    assert [len(p["messages"]) for p in pages] == [50, 50, 20]
    assert [p["next_cursor"] is None for p in pages] == [False, False, True]
    got = [(m["message_id"], m["text"]) for p in pages for m in p["messages"]]
    assert got == [(str(i), t) for i, t in reversed(list(zip(ids, texts, strict=True)))]
    assert all("dek_version" not in m for p in pages for m in p["messages"])


def test_history_spans_cassandra_time_buckets(
    client: TestClient, seed: Seeder, database: Any, as_user
) -> None:
    chat = seed.chat()
    with database.connection() as conn:  # a chat that has existed for 31 days
        conn.execute(
            "UPDATE chats SET created_at = created_at - interval '31 days' WHERE chat_id = %s",
            (chat,),
        )
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    clock = [now_ms - 30 * 24 * 3600 * 1000]

    def tick() -> int:
        clock[0] += 12 * 3600 * 1000
        return clock[0]

    texts = [f"old times {i}" for i in range(59)]  # one every 12 h over the last 30 days
    ids = seed.post(chat, texts, ids=SnowflakeIds(902, clock_ms=tick))
    assert len({bucket_of(i) for i in ids}) >= 3, "seed data should cover several buckets"
    assert BUCKET_MS < 30 * 24 * 3600 * 1000
    pages = history(client, as_user("alice"), chat, limit=25)
    assert [len(p["messages"]) for p in pages] == [25, 25, 9]
    got = [m["text"] for p in pages for m in p["messages"]]
    assert got == list(reversed(texts))


def test_search_finds_the_right_messages_decrypted(
    client: TestClient, seed: Seeder, store: MessageStore, index: SearchIndex, as_user
) -> None:
    chat = seed.chat()
    other_chat = seed.chat()
    texts = [
        f"the lantern is lit {NON_ASCII}",
        "nothing to see here",
        "bring the lantern and the map",
        "a lantern that was deleted",
    ]
    ids = seed.post(chat, texts)
    seed.post(other_chat, ["a lantern in another chat"])
    store.mark_deleted(chat, ids[3], datetime.now(UTC))  # the index still has it
    response = client.get(
        f"/v1/chats/{chat}/search", params={"q": "lantern"}, headers=as_user("bob")
    )
    assert response.status_code == 200, response.text
    hits = response.json()["messages"]
    assert sorted((h["message_id"], h["text"]) for h in hits) == sorted(
        [(str(ids[0]), texts[0]), (str(ids[2]), texts[2])]
    )
    assert index.count(chat) == 4
    both = client.get(
        f"/v1/chats/{chat}/search", params={"q": "lantern map"}, headers=as_user("bob")
    ).json()["messages"]
    assert [h["text"] for h in both] == [texts[2]]
    none = client.get(
        f"/v1/chats/{chat}/search", params={"q": "zeppelin"}, headers=as_user("bob")
    ).json()
    assert none == {"messages": [], "next_cursor": None, "more_chats": False}
    # The deleted message is gone from reads and history too.
    one = client.get(f"/v1/chats/{chat}/messages/{ids[3]}", headers=as_user("bob"))
    assert one.status_code == 404
    listed = [m["message_id"] for p in history(client, as_user("bob"), chat) for m in p["messages"]]
    assert listed == [str(ids[2]), str(ids[1]), str(ids[0])]


# --- refusals ----------------------------------------------------------------------------------


def test_non_participant_is_refused_everywhere(client: TestClient, seed: Seeder, as_user) -> None:
    chat = seed.chat()
    [message_id] = seed.post(chat, ["meet at the old mill at noon"])
    mallory = as_user("mallory")
    for url, params in (
        (f"/v1/chats/{chat}/messages/{message_id}", None),
        (f"/v1/chats/{chat}/messages", None),
        (f"/v1/chats/{chat}/search", {"q": "mill"}),
    ):
        response = client.get(url, params=params, headers=mallory)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
        assert "mill" not in response.text


def test_unknown_chat_and_unknown_message_are_404(
    client: TestClient, seed: Seeder, as_user
) -> None:
    chat = seed.chat()
    [message_id] = seed.post(chat, ["exists"])
    unknown_chat = client.get(
        f"/v1/chats/{uuid.uuid4()}/messages/{message_id}", headers=as_user("alice")
    )
    assert unknown_chat.status_code == 404
    assert unknown_chat.json()["error"]["code"] == "not_found"
    assert (
        client.get(f"/v1/chats/{uuid.uuid4()}/messages", headers=as_user("alice")).status_code
        == 404
    )
    unknown_message = client.get(
        f"/v1/chats/{chat}/messages/{message_id + 1}", headers=as_user("alice")
    )
    assert unknown_message.status_code == 404
    assert unknown_message.json()["error"]["code"] == "not_found"


def test_deleted_chat_is_410(client: TestClient, seed: Seeder, database: Any, as_user) -> None:
    chat = seed.chat()
    [message_id] = seed.post(chat, ["about to be deleted"])
    with database.connection() as conn:
        conn.execute("UPDATE chats SET state = 'deleted' WHERE chat_id = %s", (chat,))
    response = client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=as_user("alice"))
    assert response.status_code == 410 and response.json()["error"]["code"] == "gone"


def test_missing_or_bad_token_is_401(
    client: TestClient, seed: Seeder, reader_settings: Settings
) -> None:
    chat = seed.chat()
    [message_id] = seed.post(chat, ["private"])
    url = f"/v1/chats/{chat}/messages/{message_id}"
    response = client.get(url)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["www-authenticate"] == "Bearer"
    forged = mint_token(AuthSettings(secret=SecretStr("another-secret-" * 3)), "alice")
    response = client.get(url, headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401 and "private" not in response.text
    assert client.get(f"/v1/chats/{chat}/search", params={"q": "private"}).status_code == 401


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("messages/abc", None, "path.message_id"),
        ("messages/-1", None, "path.message_id"),
        ("messages/0", None, "path.message_id"),
        ("messages/9223372036854775808", None, "path.message_id"),
        ("messages/123456789012345678901", None, "path.message_id"),
        ("messages", {"before": "definitely-not-a-cursor"}, "query.before"),
        ("messages", {"before": "AQAAAAAAAAAA"}, "query.before"),
        ("messages", {"limit": 0}, "query.limit"),
        ("messages", {"limit": 101}, "query.limit"),
        ("search", {}, "query.q"),
        ("search", {"q": ""}, "query.q"),
        ("search", {"q": "   "}, "query.q"),
        ("search", {"q": "x" * 257}, "query.q"),
        ("search", {"q": "ok", "limit": 51}, "query.limit"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    client: TestClient, seed: Seeder, as_user, path: str, params: Any, field: str
) -> None:
    chat = seed.chat()
    response = client.get(f"/v1/chats/{chat}/{path}", params=params, headers=as_user("alice"))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field


def test_bad_chat_id_is_422(client: TestClient, as_user) -> None:
    response = client.get("/v1/chats/not-a-uuid/messages", headers=as_user("alice"))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "path.chat_id"


# --- integrity and keys ------------------------------------------------------------------------


def test_tampered_envelope_is_500_integrity_error_without_plaintext(
    client: TestClient, seed: Seeder, store: MessageStore, as_user
) -> None:
    chat = seed.chat()
    secret = "the launch code is zebra7quartz"
    ids = seed.post(chat, ["an innocent first line", secret])
    row = store.get(chat, ids[1])
    assert row is not None
    tampered = bytearray(row.envelope)
    tampered[-5] ^= 0x01
    store.overwrite_envelope(chat, ids[1], bytes(tampered))
    for url, params in (
        (f"/v1/chats/{chat}/messages/{ids[1]}", None),
        (f"/v1/chats/{chat}/messages", None),  # a page holding it fails closed as a whole
        (f"/v1/chats/{chat}/search", {"q": "zebra7quartz"}),
    ):
        response = client.get(url, params=params, headers=as_user("bob"))
        assert response.status_code == 500, response.text
        assert response.json() == {
            "error": {
                "code": "integrity_error",
                "message": "the stored message failed its integrity check",
            }
        }
    # The untouched message still reads.
    fine = client.get(f"/v1/chats/{chat}/messages/{ids[0]}", headers=as_user("bob"))
    assert fine.status_code == 200 and fine.json()["text"] == "an innocent first line"


def test_messages_of_dek_version_1_still_read_after_rotation(
    client: TestClient, seed: Seeder, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = seed.chat()
    before = seed.post(chat, [f"before rotation {i} {NON_ASCII}" for i in range(3)])
    # Read once so the reader has version 1 cached, as a live reader would.
    assert client.get(f"/v1/chats/{chat}/messages", headers=as_user("bob")).status_code == 200
    assert keys.rotate(chat) == 2
    after = seed.post(chat, [f"after rotation {i}" for i in range(3)])
    versions = {}
    for message_id in before + after:
        row = store.get(chat, message_id)
        assert row is not None
        versions[message_id] = row.dek_version
    assert [versions[i] for i in before] == [1, 1, 1]
    assert [versions[i] for i in after] == [2, 2, 2]
    texts = [m["text"] for p in history(client, as_user("bob"), chat) for m in p["messages"]]
    assert texts == [f"after rotation {i}" for i in (2, 1, 0)] + [
        f"before rotation {i} {NON_ASCII}" for i in (2, 1, 0)
    ]
    old = client.get(f"/v1/chats/{chat}/messages/{before[0]}", headers=as_user("alice"))
    assert old.json()["text"] == f"before rotation 0 {NON_ASCII}"


# --- service plumbing --------------------------------------------------------------------------


def test_health_readiness_metrics_and_openapi(client: TestClient, seed: Seeder, as_user) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}
    chat = seed.chat()
    [message_id] = seed.post(chat, ["counted"])
    client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=as_user("alice"))
    metrics = client.get("/metrics").text
    assert "sealstream_reader_decrypts_per_request" in metrics
    assert 'route="/v1/chats/{chat_id}/messages/{message_id}"' in metrics
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "Sealstream reader"
    assert set(spec["paths"]) == {
        "/v1/chats/{chat_id}/messages/{message_id}",
        "/v1/chats/{chat_id}/messages",
        "/v1/chats/{chat_id}/search",
        "/v1/search",
        "/v1/chats/{chat_id}/attachments/{attachment_id}",
    }
    for name, path in spec["paths"].items():
        for operation in path.values():
            assert operation["tags"] == ["attachments" if "attachments" in name else "messages"]
            assert operation["security"], "every route needs the bearer token"
