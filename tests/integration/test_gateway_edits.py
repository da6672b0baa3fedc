"""A sender's edits and deletions at the gateway, on the real Postgres, OpenBao, Kafka and
Cassandra: each refusal over HTTP and WebSocket, and what an accepted change puts on the topic.

No encryptor runs here: the tests write the message rows the encryptor would have written
(the gateway only reads them), so every state of the stored row can be set up exactly.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.events import MAX_TEXT_BYTES
from schemas.ids import first_id_at, id_time
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.kafka import delete_topics, ensure_topics
from sealstream.adapters.postgres import Database
from sealstream.auth import mint_token
from sealstream.record_seal import HEADER_EVENT_ID, HEADER_KEY_ID
from sealstream.settings import Settings
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_store, module_stores
from tests.integration.test_ingest_api import auth, consume, new_chat
from tests.tcp_proxy import free_port, proxy

WINDOW = timedelta(seconds=3600)  # the edit window of these gateways (Settings.edits)


@pytest.fixture(scope="module")
def edit_settings(settings: Settings) -> Iterator[Settings]:
    """The run's settings with a keyspace and topics of this module's own, a one-hour window."""
    own = module_stores(settings, "edits")
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.edits",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.edits",
        }
    )
    ensure_topics(kafka)
    edits = settings.edits.model_copy(update={"window_seconds": int(WINDOW.total_seconds())})
    yield own.model_copy(update={"kafka": kafka, "edits": edits})
    delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])


@pytest.fixture(scope="module")
def store(edit_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(edit_settings) as message_store:
        yield message_store


@contextmanager
def gateway(settings: Settings) -> Iterator[TestClient]:
    from ingest.wiring import build

    app, close = build(settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


@pytest.fixture(scope="module")
def client(edit_settings: Settings, store: MessageStore, database: object) -> Iterator[TestClient]:
    with gateway(edit_settings) as test_client:
        yield test_client


def stored(
    store: MessageStore, chat: str, sender: str, message_id: int, deleted: bool = False
) -> int:
    """Write the row the encryptor makes of a message (the envelope's bytes do not matter to
    the gateway); `deleted`: then mark it deleted, as a deletion does."""
    chat_id = uuid.UUID(chat)
    row = StoredMessage(chat_id, message_id, sender, 1, b"sealed", id_time(message_id))
    assert store.write_many([row]) == []
    if deleted:
        store.mark_deleted(chat_id, message_id, datetime.now(UTC))
    return message_id


def posted(
    client: TestClient, settings: Settings, store: MessageStore, chat: str, user: str
) -> int:
    """A message posted through the gateway and stored (as the encryptor would)."""
    reply = client.post(
        f"/v1/chats/{chat}/messages", json={"text": "as first sent"}, headers=auth(settings, user)
    )
    assert reply.status_code == 202, reply.text
    return stored(store, chat, user, int(reply.json()["message_id"]))


def old_id() -> int:
    """An id made just past the edit window."""
    return first_id_at(int((time.time() - WINDOW.total_seconds() - 60) * 1000)) + 7


def error(response: Any) -> tuple[int, str, str | None]:
    body = response.json()["error"]
    return response.status_code, body["code"], body.get("field")


def test_an_edit_and_a_deletion_each_publish_one_record(
    client: TestClient, edit_settings: Settings, store: MessageStore
) -> None:
    settings = edit_settings
    chat = new_chat(client, settings, "alice", "bob")
    message = posted(client, settings, store, chat, "alice")
    url, alice = f"/v1/chats/{chat}/messages/{message}", auth(settings, "alice")

    edit = client.patch(url, json={"text": "second thoughts ✓"}, headers=alice)
    assert edit.status_code == 202, edit.text
    assert set(edit.json()) == {"chat_id", "message_id", "event_id"}
    assert edit.json()["chat_id"] == chat and edit.json()["message_id"] == str(message)
    deletion = client.delete(url, headers=alice)
    assert deletion.status_code == 202, deletion.text
    assert deletion.json()["message_id"] == str(message)
    edit_id, delete_id = int(edit.json()["event_id"]), int(deletion.json()["event_id"])
    assert message < edit_id < delete_id  # ids of changes sort after their message, in order

    records = consume(settings, chat, 3, settle=1.0)
    assert len(records) == 3  # one post, one edit, one deletion: nothing more
    (_, post, _), (key, edited, headers), (_, deleted, _) = records
    assert post.kind == "post" and post.message_id == message
    assert key == chat.encode()  # keyed by chat id
    # Sealed like a post, under its own event id; no text in the headers.
    assert {k for k, _ in headers} == {HEADER_KEY_ID, HEADER_EVENT_ID}  # type: ignore[attr-defined]
    assert dict(headers)[HEADER_EVENT_ID] == str(edit_id).encode()  # type: ignore[call-overload]
    assert (edited.kind, edited.message_id, edited.event_id) == ("edit", message, edit_id)
    assert (edited.sender_id, edited.text, edited.tenant_id) == (
        "alice",
        "second thoughts ✓",
        "default",
    )
    assert (deleted.kind, deleted.message_id, deleted.event_id) == ("delete", message, delete_id)
    assert deleted.sender_id == "alice" and deleted.text is None
    metrics = client.get("/metrics").text
    assert 'sealstream_ingest_changes_total{kind="edit"}' in metrics
    assert 'sealstream_ingest_changes_total{kind="delete"}' in metrics


def test_changes_the_gateway_refuses_over_http(
    client: TestClient, edit_settings: Settings, store: MessageStore, database: Database
) -> None:
    settings = edit_settings
    chat = new_chat(client, settings, "carol", "dan")
    carol, dan = auth(settings, "carol"), auth(settings, "dan")
    mine = posted(client, settings, store, chat, "carol")
    gone = stored(store, chat, "carol", posted(client, settings, store, chat, "carol"), True)
    late = stored(store, chat, "carol", old_id())
    base = f"/v1/chats/{chat}/messages"

    def both(message: object, headers: dict[str, str]) -> list[tuple[int, str, str | None]]:
        url = f"{base}/{message}"
        edited = client.patch(url, json={"text": "new"}, headers=headers)
        deleted = client.delete(url, headers=headers)
        return [error(edited), error(deleted)]

    assert both(mine, dan) == [(403, "not_sender", "message_id")] * 2
    assert both(mine, auth(settings, "eve")) == [(403, "not_participant", None)] * 2
    assert both(gone, carol) == [(410, "message_deleted", "message_id")] * 2
    assert both(late, carol) == [(422, "edit_window_passed", "message_id")] * 2
    never = mine - 1  # `mine` is the chat's first message
    assert both(never, carol) == [(404, "message_not_found", "message_id")] * 2
    not_found = client.patch(f"{base}/{never}", json={"text": "x"}, headers=carol).json()
    assert "not stored yet" in not_found["error"]["message"]
    other_chat = new_chat(client, settings, "carol")  # the id is of another chat's message
    assert client.delete(f"/v1/chats/{other_chat}/messages/{mine}", headers=carol).json()["error"][
        "code"
    ] == ("message_not_found")
    assert error(client.delete(f"/v1/chats/{uuid.uuid4()}/messages/{mine}", headers=carol)) == (
        404,
        "unknown_chat",
        "chat_id",
    )
    for bad in ("0", "-1", "abc", "1.5", str(2**63), "9" * 30):
        assert both(bad, carol) == [(422, "invalid_request", "path.message_id")] * 2, bad
    assert client.delete(f"{base}/{mine}").status_code == 401

    url = f"{base}/{mine}"
    for body, field in (
        ({"text": "   "}, "text"),
        ({"text": "y" * (MAX_TEXT_BYTES + 1)}, "text"),
        ({}, "text"),
        ({"text": "x", "color": "red"}, "color"),
    ):
        refused = client.patch(url, json=body, headers=carol)
        assert error(refused) == (422, refused.json()["error"]["code"], field), body
        assert "yyyy" not in refused.text
    surrogate = client.patch(
        url, content=b'{"text": "\\ud800"}', headers={**carol, "content-type": "application/json"}
    )
    assert error(surrogate) == (422, "invalid_message", "text")

    with key_service(settings, database) as keys:
        keys.delete_chat(uuid.UUID(chat), "test: a deleted chat refuses changes")
    # The gateway's chat cache forgets on the broadcast, or after its TTL (2 s) at most; the
    # bound leaves room for the requests themselves on a loaded machine.
    deadline = time.monotonic() + 30
    while client.delete(url, headers=carol).status_code != 410 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert both(mine, carol) == [(410, "gone", "chat_id")] * 2

    # Only the two posts reached the topic: no refused change was published.
    records = consume(settings, chat, 2, settle=2.0)
    assert [r.kind for _, r, _ in records] == ["post", "post"]


def test_changes_over_the_websocket(
    client: TestClient, edit_settings: Settings, store: MessageStore
) -> None:
    settings = edit_settings
    chat = new_chat(client, settings, "gus", "hal")
    mine = posted(client, settings, store, chat, "gus")  # the chat's first message
    theirs = posted(client, settings, store, chat, "hal")
    gone = stored(store, chat, "gus", posted(client, settings, store, chat, "gus"), True)
    late = stored(store, chat, "gus", old_id())

    def frame(kind: str, message: object, **extra: object) -> dict[str, object]:
        body: dict[str, object] = {"type": kind, "chat_id": chat, "message_id": message}
        return body | ({"text": "over the socket"} if kind == "edit" else {}) | extra

    with client.websocket_connect(f"/v1/ws?token={mint_token(settings.auth, 'gus')}") as ws:

        def ask(body: dict[str, object]) -> dict[str, Any]:
            ws.send_json(body)
            reply: dict[str, Any] = ws.receive_json()
            return reply

        def refused(body: dict[str, object]) -> tuple[str, str | None]:
            reply = ask(body)
            assert reply["ok"] is False, reply
            return reply["error"]["code"], reply["error"].get("field")

        for kind in ("edit", "delete"):
            assert refused(frame(kind, theirs)) == ("not_sender", "message_id")
            assert refused(frame(kind, gone)) == ("message_deleted", "message_id")
            assert refused(frame(kind, late)) == ("edit_window_passed", "message_id")
            assert refused(frame(kind, mine - 1)) == ("message_not_found", "message_id")
            assert refused(frame(kind, mine, chat_id=str(uuid.uuid4()))) == (
                "unknown_chat",
                "chat_id",
            )
            for bad in (0, "abc", 2**63, None):
                assert refused(frame(kind, bad)) == ("invalid_request", "message_id"), bad
            assert refused({"type": kind, "chat_id": chat}) == ("invalid_request", "message_id")
        assert refused(frame("edit", mine, text=" ")) == ("invalid_message", "text")
        assert refused(frame("edit", mine, text="z" * (MAX_TEXT_BYTES + 1))) == (
            "message_too_large",
            "text",
        )
        assert refused({k: v for k, v in frame("edit", mine).items() if k != "text"}) == (
            "invalid_request",
            "text",
        )
        assert refused(frame("delete", mine, text="x")) == ("invalid_request", "text")
        assert refused(frame("shout", mine)) == ("invalid_request", "type")
        lone = '{"type": "edit", "chat_id": "%s", "message_id": "%d", "text": "\\ud800"}'
        ws.send_text(lone % (chat, mine))
        assert ws.receive_json()["error"]["field"] == "text"

        # A post frame without `type` works as before, and with `"type": "post"` too.
        post = ask({"chat_id": chat, "text": "plain post"})
        assert post["ok"] is True and set(post) == {
            "ok",
            "message_id",
            "chat_id",
            "client_message_id",
            "duplicate",
        }
        assert ask({"type": "post", "chat_id": chat, "text": "typed post"})["ok"] is True

        edit = ask(frame("edit", str(mine)))  # the id as the replies give it: a string
        assert edit["ok"] is True, edit
        assert edit["type"] == "edit" and edit["message_id"] == str(mine)
        deletion = ask(frame("delete", mine))  # or as a number
        assert deletion["ok"] is True and deletion["type"] == "delete", deletion
        assert mine < int(edit["event_id"]) < int(deletion["event_id"])

    with client.websocket_connect("/v1/ws", headers=auth(settings, "ivan")) as ws:
        ws.send_json(frame("edit", mine))
        assert ws.receive_json()["error"]["code"] == "not_participant"

    records = consume(settings, chat, 7, settle=2.0)
    changes = [r for _, r, _ in records if r.kind != "post"]
    assert [(r.kind, r.sender_id, r.text, str(r.event_id)) for r in changes] == [
        ("edit", "gus", "over the socket", edit["event_id"]),
        ("delete", "gus", None, deletion["event_id"]),
    ]
    assert len(records) == 7  # five posts, one edit, one deletion


def test_a_change_is_a_503_when_cassandra_or_kafka_does_not_answer(
    client: TestClient,
    edit_settings: Settings,
    store: MessageStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = edit_settings
    chat = new_chat(client, settings, "kim")
    mine = posted(client, settings, store, chat, "kim")
    url, kim = f"/v1/chats/{chat}/messages/{mine}", auth(settings, "kim")
    secret_text = f"never-logged-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)

    # Nothing listens on these ports: Cassandra and Kafka are down for that gateway only.
    no_cassandra = settings.model_copy(
        update={"cassandra": settings.cassandra.model_copy(update={"port": free_port()})}
    )
    with gateway(no_cassandra) as cut:
        started = time.monotonic()
        refused = cut.patch(url, json={"text": secret_text}, headers=kim)
        assert error(refused) == (503, "unavailable", None) and refused.headers["Retry-After"]
        assert time.monotonic() - started < 15  # the Cassandra deadline (2 s), not a hang
        assert cut.delete(url, headers=kim).status_code == 503
        # Posts never need Cassandra: they go on.
        post = cut.post(f"/v1/chats/{chat}/messages", json={"text": "still"}, headers=kim)
        assert post.status_code == 202, post.text
        with cut.websocket_connect("/v1/ws", headers=kim) as ws:
            ws.send_json({"type": "delete", "chat_id": chat, "message_id": str(mine)})
            assert ws.receive_json()["error"]["code"] == "unavailable"

    no_kafka = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update={"bootstrap": f"127.0.0.1:{free_port()}"}),
            "gateway": settings.gateway.model_copy(update={"kafka_deadline_seconds": 1.0}),
        }
    )
    with gateway(no_kafka) as cut:
        refused = cut.patch(url, json={"text": secret_text}, headers=kim)
        assert error(refused) == (503, "unavailable", None) and refused.headers["Retry-After"]
        assert cut.delete(url, headers=kim).status_code == 503

    records = consume(settings, chat, 2, settle=2.0)
    assert [r.kind for _, r, _ in records] == ["post", "post"]  # no change was published
    assert "unavailable" in caplog.text  # the failures were logged, the edit's text never
    assert secret_text not in caplog.text


def test_the_openapi_lists_the_changes_and_their_errors(client: TestClient) -> None:
    path = client.get("/openapi.json").json()["paths"]["/v1/chats/{chat_id}/messages/{message_id}"]
    for method in ("patch", "delete"):
        responses = path[method]["responses"]
        assert {"202", "401", "403", "404", "410", "422", "503"} <= set(responses)
        assert "not_sender" in responses["403"]["description"]
        assert "edit_window_passed" in responses["422"]["description"]
        assert responses["410"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }


def test_a_hung_cassandra_costs_edits_a_503_within_the_deadline_and_posts_nothing(
    client: TestClient, edit_settings: Settings, store: MessageStore
) -> None:
    settings = edit_settings
    chat = new_chat(client, settings, "lou")
    mine = posted(client, settings, store, chat, "lou")
    url, lou = f"/v1/chats/{chat}/messages/{mine}", auth(settings, "lou")
    cassandra = settings.cassandra
    with proxy(cassandra.hosts[0], cassandra.port) as cut:
        through = settings.model_copy(
            update={"cassandra": cassandra.model_copy(update={"port": cut.port})}
        )
        with gateway(through) as gw:
            assert gw.patch(url, json={"text": "one"}, headers=lou).status_code == 202
            cut.pause()  # connected, then Cassandra answers nothing (a hung server)
            started = time.monotonic()
            hung = [gw.patch(url, json={"text": "two"}, headers=lou) for _ in range(3)]
            took = time.monotonic() - started
            print(f"\nthree edits with Cassandra hung: 503 each, {took:.2f} s in all")
            assert [error(r) for r in hung] == [(503, "unavailable", None)] * 3
            assert took < 3 * 6, took  # each within the 2 s deadline (loaded machine: slack)
            post = gw.post(f"/v1/chats/{chat}/messages", json={"text": "x"}, headers=lou)
            assert post.status_code == 202  # posts do not wait for Cassandra
            cut.forward()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                healed = gw.patch(url, json={"text": "three"}, headers=lou)
                if healed.status_code == 202:
                    break
                time.sleep(0.5)
            assert healed.status_code == 202, healed.text

    records = consume(settings, chat, 4, settle=1.0)
    assert [(r.kind, r.text) for _, r, _ in records] == [
        ("post", "as first sent"),
        ("edit", "one"),
        ("post", "x"),
        ("edit", "three"),
    ]


def test_a_frame_message_id_of_another_type_is_refused_not_coerced(
    client: TestClient, edit_settings: Settings, store: MessageStore
) -> None:
    """`true` is not message 1, `1e3` not message 1000, and a float past 2^53 is not the id it
    rounds to: a frame's id is an integer or its decimal string as the replies give it (the
    path's grammar), anything else a 422 naming `message_id`, with nothing published."""
    settings = edit_settings
    chat = new_chat(client, settings, "jo", "kim")
    mine = posted(client, settings, store, chat, "jo")
    with client.websocket_connect(f"/v1/ws?token={mint_token(settings.auth, 'jo')}") as ws:
        for bad in (True, False, 1.0, 1e3, float(mine), "12.0", "1_2", "+12", " 12", "012", []):
            for kind in ("edit", "delete"):
                body: dict[str, object] = {"type": kind, "chat_id": chat, "message_id": bad}
                ws.send_json(body | ({"text": "coerced"} if kind == "edit" else {}))
                reply = ws.receive_json()
                assert reply["ok"] is False, (bad, reply)
                assert (reply["error"]["code"], reply["error"]["field"]) == (
                    "invalid_request",
                    "message_id",
                ), bad
        ws.send_json({"type": "edit", "chat_id": chat, "message_id": mine, "text": "a number"})
        assert ws.receive_json()["ok"] is True
    records = consume(settings, chat, 2, settle=2.0)
    assert [(r.kind, r.message_id) for _, r, _ in records] == [("post", mine), ("edit", mine)]
