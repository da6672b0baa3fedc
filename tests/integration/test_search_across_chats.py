"""Search across all the chats a user belongs to (`GET /v1/search`), against the real stack:
the reader built by reader.wiring.build on Postgres (membership), OpenSearch (tokens),
Cassandra (sealed rows) and OpenBao (chat keys). Data is seeded as the pipeline writes it
(tests/integration/test_reader_api.py's Seeder)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from reader.wiring import build
from schemas.ids import id_millis
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import (
    SearchIndex,
    SearchRequest,
    SortKey,
    WordMatch,
)
from sealstream.adapters.postgres import ChatKeyRepository
from sealstream.keys.service import KeyService
from sealstream.settings import Settings
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_index, fresh_store, module_stores
from tests.integration.test_reader_api import Seeder, auth

Headers = Callable[[str], dict[str, str]]


@pytest.fixture(scope="module")
def search_settings(settings: Settings) -> Settings:
    """This run's settings with a keyspace and index of this module's own."""
    return module_stores(settings, "xsearch")


@pytest.fixture(scope="module")
def store(search_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(search_settings) as store:
        yield store


@pytest.fixture(scope="module")
def index(search_settings: Settings) -> Iterator[SearchIndex]:
    with fresh_index(search_settings) as index:
        yield index


@pytest.fixture(scope="module")
def keys(search_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(search_settings.vault.default_key)
    with key_service(search_settings, database) as service:
        yield service


@pytest.fixture(scope="module")
def client(
    search_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[TestClient]:
    app, close = build(search_settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


@pytest.fixture(scope="module")
def seed(keys: KeyService, store: MessageStore, index: SearchIndex) -> Seeder:
    return Seeder(keys, store, index)


@pytest.fixture(scope="module")
def as_user(search_settings: Settings) -> Headers:
    return lambda user: auth(search_settings, user)


def user() -> str:
    """A user of this test alone (the module's chats share one schema)."""
    return f"u-{uuid.uuid4().hex[:12]}"


def search(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get("/v1/search", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def every_page(client: TestClient, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        pages.append(search(client, headers, **params, **({"cursor": cursor} if cursor else {})))
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


# --- membership --------------------------------------------------------------------------------


def test_user_finds_messages_of_all_their_chats_and_none_of_others(
    client: TestClient, seed: Seeder, as_user: Headers
) -> None:
    alice, bob, carol = user(), user(), user()
    chats = [seed.chat((alice, bob)), seed.chat((carol, alice)), seed.chat((alice,))]
    not_hers = seed.chat((bob, carol))
    posted = {
        chat: seed.post(chat, [f"a wombat 🐾 in chat {n}"], sender=alice)[0]
        for n, chat in enumerate(chats)
    }
    seed.post(not_hers, ["a wombat alice must not see"], sender=bob)
    body = search(client, as_user(alice), q="wombat")
    assert body["next_cursor"] is None and body["more_chats"] is False
    assert [m["message_id"] for m in body["messages"]] == [str(posted[c]) for c in reversed(chats)]
    for message in body["messages"]:
        assert message["chat_id"] in {str(c) for c in chats}
        [[start, end]] = message["highlights"]
        assert message["text"][start:end] == "wombat"
    assert "must not see" not in str(body)
    bobs = [m["text"] for m in search(client, as_user(bob), q="wombat")["messages"]]
    assert bobs == ["a wombat alice must not see", "a wombat 🐾 in chat 0"]
    assert search(client, as_user(user()), q="wombat")["messages"] == []


def test_removed_member_stops_finding_the_chat_at_once(
    client: TestClient, seed: Seeder, database: Any, as_user: Headers
) -> None:
    alice, bob = user(), user()
    chat = seed.chat((alice, bob))
    seed.post(chat, [f"the narwhal plan {n}" for n in range(3)], sender=alice)
    first = search(client, as_user(bob), q="narwhal", limit=1)
    assert len(first["messages"]) == 1 and first["next_cursor"]
    per_chat = client.get(f"/v1/chats/{chat}/search", params={"q": "narwhal"}, headers=as_user(bob))
    assert per_chat.status_code == 200 and len(per_chat.json()["messages"]) == 3
    with database.connection() as conn:
        conn.execute(
            "UPDATE chats SET participants = array_remove(participants, %s) WHERE chat_id = %s",
            (bob, chat),
        )
    # At once: no waiting for a cache; the cursor of an earlier page does not help either.
    assert search(client, as_user(bob), q="narwhal")["messages"] == []
    assert search(client, as_user(bob), q="narwhal", cursor=first["next_cursor"]) == {
        "messages": [],
        "next_cursor": None,
        "more_chats": False,
    }
    refused = client.get(f"/v1/chats/{chat}/search", params={"q": "narwhal"}, headers=as_user(bob))
    assert refused.status_code == 403 and "narwhal" not in refused.text
    assert len(search(client, as_user(alice), q="narwhal")["messages"]) == 3


def test_deleted_chat_and_deleted_message_never_appear(
    client: TestClient,
    seed: Seeder,
    database: Any,
    store: MessageStore,
    index: SearchIndex,
    as_user: Headers,
) -> None:
    alice = user()
    kept, doomed = seed.chat((alice,)), seed.chat((alice,))
    ids = seed.post(kept, ["pelican one", "pelican two", "pelican three"], sender=alice)
    seed.post(doomed, ["pelican in a deleted chat"], sender=alice)
    store.mark_deleted(kept, ids[0], datetime.now(UTC))  # the index still has this one
    store.mark_deleted(kept, ids[1], datetime.now(UTC))
    index.delete_message(kept, ids[1])  # ... and a tombstone for this one
    with database.connection() as conn:
        conn.execute("UPDATE chats SET state = 'deleted' WHERE chat_id = %s", (doomed,))
    pages = every_page(client, as_user(alice), q="pelican", limit=1)
    assert [m["text"] for p in pages for m in p["messages"]] == ["pelican three"]


def test_more_than_a_thousand_chats_of_one_user(
    client: TestClient, seed: Seeder, database: Any, as_user: Headers
) -> None:
    alice = user()
    with_messages = [seed.chat((alice, "someone")) for _ in range(3)]
    # 1,200 further chats of alice, straight into Postgres (no keys needed: nothing is posted).
    with database.connection() as conn:
        conn.execute(
            "INSERT INTO chats (chat_id, tenant_id, participants) SELECT gen_random_uuid(),"
            " 'default', ARRAY[%s, 'x' || g] FROM generate_series(1, 1200) g",
            (alice,),
        )
    try:
        for n, chat in enumerate(with_messages):
            seed.post(chat, [f"heliotrope {n}"], sender="someone")
        repo = ChatKeyRepository(database)
        assert len(repo.member_chats(alice, 5000)) == 1203
        body = search(client, as_user(alice), q="heliotrope")
        assert sorted(m["text"] for m in body["messages"]) == [f"heliotrope {n}" for n in range(3)]
        assert body["more_chats"] is False
    finally:  # keyless chats would puzzle other modules' scans of this run's schema
        with database.connection() as conn:
            conn.execute(
                "DELETE FROM chats c WHERE participants @> ARRAY[%s]::text[]"
                " AND NOT EXISTS (SELECT 1 FROM chat_deks d WHERE d.chat_id = c.chat_id)",
                (alice,),
            )


def test_membership_query_can_use_the_participants_index(database: Any) -> None:
    with database.connection() as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = conn.execute(
            "EXPLAIN SELECT chat_id FROM chats WHERE participants @> ARRAY['someone']::text[]"
            " AND state <> 'deleted'"
        ).fetchall()
    assert "chats_participants" in " ".join(str(row) for row in plan)


# --- filters, sort, paging -----------------------------------------------------------------------


def test_filters_by_chat_sender_and_time(
    client: TestClient, seed: Seeder, as_user: Headers
) -> None:
    alice, bob = user(), user()
    a, b, c = seed.chat((alice, bob)), seed.chat((alice, bob)), seed.chat((alice, bob))
    ids: dict[str, int] = {}
    for chat, name in ((a, "a"), (b, "b"), (c, "c")):
        for sender in (alice, bob):
            [ids[f"{name}-{sender}"]] = seed.post(chat, [f"marmot {name}"], sender=sender)
    headers = as_user(alice)
    only_ab = search(client, headers, q="marmot", chat_id=[str(a), str(b)])
    assert {m["chat_id"] for m in only_ab["messages"]} == {str(a), str(b)}
    assert len(only_ab["messages"]) == 4
    foreign = search(client, headers, q="marmot", chat_id=[str(uuid.uuid4())])
    assert foreign["messages"] == []
    bobs = search(client, headers, q="marmot", sender_id=bob)["messages"]
    assert [m["message_id"] for m in bobs] == [str(ids[f"{n}-{bob}"]) for n in "cba"]
    moments = {k: datetime.fromtimestamp(id_millis(v) / 1000, UTC) for k, v in ids.items()}
    since, until = moments[f"b-{alice}"], moments[f"c-{alice}"]
    window = search(
        client, headers, q="marmot", **{"from": since.isoformat(), "to": until.isoformat()}
    )
    expected = [k for k in ids if since <= moments[k] < until]
    assert sorted(m["message_id"] for m in window["messages"]) == sorted(
        str(ids[k]) for k in expected
    )
    assert f"b-{alice}" in expected and f"c-{alice}" not in expected


@pytest.mark.parametrize("sort", ["newest", "relevance"])
def test_paging_has_no_duplicates_and_no_gaps(
    client: TestClient, seed: Seeder, as_user: Headers, sort: str
) -> None:
    alice = user()
    chats = [seed.chat((alice,)) for _ in range(3)]
    posted: list[int] = []
    for n in range(23):
        posted += seed.post(chats[n % 3], [f"capybara {n} — ünïcödé"], sender=alice)
    pages = every_page(client, as_user(alice), q="capybara", limit=5, sort=sort)
    got = [int(m["message_id"]) for p in pages for m in p["messages"]]
    assert [len(p["messages"]) for p in pages] == [5, 5, 5, 5, 3]
    assert got == sorted(posted, reverse=True)


def test_phrases_and_highlights_on_non_ascii_text(
    client: TestClient, seed: Seeder, as_user: Headers
) -> None:
    alice = user()
    chat = seed.chat((alice,))
    text = "🚀👩‍🚀 Zürich: Crème Brûlée at the ＣＡＦＥ, then crème brûlée again"  # noqa: RUF001
    seed.post(chat, [text, "brûlée was not crème"], sender=alice)
    [hit] = search(client, as_user(alice), q='"crème brûlée"')["messages"]
    assert hit["text"] == text
    assert [text[s:e] for s, e in hit["highlights"]] == [
        "Crème",
        "Brûlée",
        "crème",
        "brûlée",
    ]
    assert hit["highlights"][0][0] == len("🚀👩‍🚀 Zürich: ")  # code points, emoji included
    assert len(search(client, as_user(alice), q="crème brûlée ")["messages"]) == 2
    [fullwidth] = search(client, as_user(alice), q="cafe")["messages"]
    [[start, end]] = fullwidth["highlights"]
    assert text[start:end] == "ＣＡＦＥ"  # noqa: RUF001
    typed = search(client, as_user(alice), q="zür")["messages"]
    assert [text[s:e] for s, e in typed[0]["highlights"]] == ["Zürich"]


def test_per_chat_search_has_the_same_options(
    client: TestClient, seed: Seeder, as_user: Headers
) -> None:
    alice, bob = user(), user()
    chat = seed.chat((alice, bob))
    other = seed.chat((alice, bob))
    seed.post(other, ["ocelot elsewhere"], sender=bob)
    ids = [seed.post(chat, [f"ocelot {n}"], sender=bob if n % 2 else alice)[0] for n in range(5)]
    url = f"/v1/chats/{chat}/search"
    first = client.get(url, params={"q": "ocelot", "limit": 2}, headers=as_user(alice)).json()
    assert [m["message_id"] for m in first["messages"]] == [str(ids[4]), str(ids[3])]
    second = client.get(
        url,
        params={"q": "ocelot", "limit": 2, "cursor": first["next_cursor"], "sender_id": bob},
        headers=as_user(alice),
    ).json()
    assert [m["message_id"] for m in second["messages"]] == [str(ids[1])]
    assert second["next_cursor"] is None


def test_relevance_ranks_exact_spellings_above_folded_ones(index: SearchIndex) -> None:
    """`search_messages` on the real index with the token sets the ICU indexer stores (each
    word's term and its accent-folded form)."""
    chat = uuid.uuid4()
    documents = {
        9_100: ["cafe"],  # "cafe"
        9_101: ["cafe", "café"],  # "café"
        9_102: ["cafe", "café", "noir"],  # "café noir"
        9_103: ["noir"],
    }
    for message_id, tokens in documents.items():
        source = {"message_id": message_id, "chat_id": str(chat), "tenant_id": "default"}
        source.update({"sender_id": "s", "sent_at": datetime.now(UTC).isoformat()})
        index._client.index(
            index=index.index, id=str(message_id), body={**source, "tokens": tokens}
        )
    index.refresh()
    cafe = WordMatch(any_of=["cafe"], exact=["café"])
    request = SearchRequest(chat_ids=[chat], words=[cafe], sort="relevance", size=10)
    ranked = index.search_messages(request)
    assert [h.message_id for h in ranked.hits] == [9_102, 9_101, 9_100]
    assert [h.score for h in ranked.hits] == [1.0, 1.0, 0.0] and ranked.exhausted
    newest = index.search_messages(SearchRequest(chat_ids=[chat], words=[cafe], size=2))
    assert [h.message_id for h in newest.hits] == [9_102, 9_101] and not newest.exhausted
    rest = index.search_messages(
        SearchRequest(chat_ids=[chat], words=[cafe], size=2, after=newest.hits[-1].key)
    )
    assert [h.message_id for h in rest.hits] == [9_100] and rest.exhausted
    after_first = SearchRequest(
        chat_ids=[chat], words=[cafe], sort="relevance", size=10, after=SortKey(1.0, 9_102)
    )
    assert [h.message_id for h in index.search_messages(after_first).hits] == [9_101, 9_100]
    prefix = WordMatch(any_of=["no"], exact=["no"], prefix="no")
    found = index.search_messages(SearchRequest(chat_ids=[chat], words=[prefix]))
    assert [h.message_id for h in found.hits] == [9_103, 9_102]


# --- refusals and the description ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "query.q"),
        ({"q": ""}, "query.q"),
        ({"q": "   "}, "query.q"),
        ({"q": "x" * 257}, "query.q"),
        ({"q": "ok", "limit": 0}, "query.limit"),
        ({"q": "ok", "limit": 51}, "query.limit"),
        ({"q": "ok", "chat_id": "not-a-uuid"}, "query.chat_id.0"),
        ({"q": "ok", "chat_id": [str(uuid.uuid4()) for _ in range(101)]}, "query.chat_id"),
        ({"q": "ok", "sender_id": ""}, "query.sender_id"),
        ({"q": "ok", "sender_id": "a\x01b"}, "query.sender_id"),
        ({"q": "ok", "from": "yesterday"}, "query.from"),
        ({"q": "ok", "from": "2026-12-01T10:00:00"}, "query.from"),
        ({"q": "ok", "from": "2026-12-02T00:00:00Z", "to": "2026-12-01T00:00:00Z"}, "query.to"),
        ({"q": "ok", "sort": "oldest"}, "query.sort"),
        ({"q": "ok", "cursor": "AQAAAAAAAAAA"}, "query.cursor"),
        ({"q": "ok", "cursor": "x" * 65}, "query.cursor"),
    ],
)
def test_invalid_input_is_422_naming_the_field(
    client: TestClient, as_user: Headers, params: dict[str, Any], field: str
) -> None:
    response = client.get("/v1/search", params=params, headers=as_user("alice"))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field


def test_search_needs_a_token_and_is_described(client: TestClient) -> None:
    assert client.get("/v1/search", params={"q": "x"}).status_code == 401
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/search"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert names == {"q", "limit", "chat_id", "sender_id", "from", "to", "sort", "cursor"}
    assert operation["security"]
    out = spec["components"]["schemas"]["SearchOut"]["properties"]
    assert set(out) == {"messages", "next_cursor", "more_chats"}
    assert "highlights" in spec["components"]["schemas"]["FoundOut"]["properties"]
