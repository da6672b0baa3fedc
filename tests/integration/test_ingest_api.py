"""The gateway app on the real Postgres, Redis, OpenBao and Kafka, through HTTP (TestClient)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer
from fastapi.testclient import TestClient

from ingest.wiring import build
from schemas.events import MessageRecord
from sealstream.adapters.kafka import delete_topics, ensure_topics
from sealstream.auth import mint_token
from sealstream.settings import Settings
from tests.conftest import require_port


@pytest.fixture(scope="module")
def gateway_settings(settings: Settings) -> Settings:
    """The run's settings with topics of this module's own (e2e workers may be consuming the
    run's main topic)."""
    kafka = settings.kafka.model_copy(
        update={
            "messages_topic": f"{settings.kafka.messages_topic}.gateway",
            "dead_letter_topic": f"{settings.kafka.dead_letter_topic}.gateway",
        }
    )
    return settings.model_copy(update={"kafka": kafka})


@pytest.fixture(scope="module")
def client(gateway_settings: Settings, database: object) -> Iterator[TestClient]:
    settings = gateway_settings
    require_port("kafka", "127.0.0.1", int(settings.kafka.bootstrap.rsplit(":", 1)[1]))
    ensure_topics(settings.kafka)
    app, close = build(settings)
    with TestClient(app) as test_client:
        yield test_client
    close()
    delete_topics(settings.kafka, [settings.kafka.messages_topic, settings.kafka.dead_letter_topic])


def auth(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, user)}"}


def consume(settings: Settings, count: int) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap,
            "group.id": f"check-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.kafka.messages_topic])
    out = []
    for _ in range(200):
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            out.append((msg.key(), msg.value(), msg.headers() or []))
        if len(out) >= count:
            break
    consumer.close()
    return out


def test_accepted_messages_are_on_the_topic(client: TestClient, gateway_settings: Settings) -> None:
    settings = gateway_settings
    created = client.post(
        "/v1/chats", json={"participants": ["bob"]}, headers=auth(settings, "alice")
    )
    assert created.status_code == 201
    chat = created.json()["chat_id"]
    one = client.post(
        f"/v1/chats/{chat}/messages", json={"text": "first ✓"}, headers=auth(settings, "bob")
    )
    batch = client.post(
        f"/v1/chats/{chat}/messages:batch",
        json={"messages": [{"text": "second"}, {"text": "third", "client_message_id": "k3"}]},
        headers=auth(settings, "alice"),
    )
    assert one.status_code == 202 and batch.status_code == 202
    ids = [one.json()["message_id"]] + [a["message_id"] for a in batch.json()["accepted"]]
    records = consume(settings, 3)
    mine = [(k, MessageRecord.model_validate_json(v), h) for k, v, h in records]
    mine = [m for m in mine if str(m[1].chat_id) == chat]
    assert [str(r.message_id) for _, r, _ in mine] == ids
    assert [r.text for _, r, _ in mine] == ["first ✓", "second", "third"]
    assert all(k == chat.encode() and h == [] for k, _, h in mine)  # keyed by chat, no headers


def test_errors_are_clear_and_never_500(client: TestClient, settings: Settings) -> None:
    chat = client.post("/v1/chats", json={}, headers=auth(settings, "carol")).json()["chat_id"]
    url = f"/v1/chats/{chat}/messages"
    assert client.post(url, json={"text": "x"}).status_code == 401
    bad_token = {"Authorization": "Bearer not.a.token"}
    assert client.post(url, json={"text": "x"}, headers=bad_token).status_code == 401
    assert client.post(url, json={"text": "x"}, headers=auth(settings, "dave")).status_code == 403
    unknown = client.post(
        f"/v1/chats/{uuid.uuid4()}/messages", json={"text": "x"}, headers=auth(settings, "carol")
    )
    assert unknown.status_code == 404
    too_big = client.post(url, json={"text": "y" * 20_000}, headers=auth(settings, "carol"))
    assert too_big.status_code == 422 and too_big.json()["error"]["field"] == "text"
    assert "16384" in too_big.json()["error"]["message"] and "yyyy" not in too_big.text
    malformed = client.post(
        url,
        content=b"{oops",
        headers={**auth(settings, "carol"), "content-type": "application/json"},
    )
    assert (
        malformed.status_code == 422
        and malformed.json()["error"]["message"] == "body: malformed JSON"
    )
    extra = client.post(url, json={"text": "x", "color": "red"}, headers=auth(settings, "carol"))
    assert extra.status_code == 422 and extra.json()["error"]["field"] == "color"


def test_idempotent_retry(client: TestClient, settings: Settings) -> None:
    chat = client.post("/v1/chats", json={}, headers=auth(settings, "erin")).json()["chat_id"]
    body = {"text": "only once", "client_message_id": "retry-1"}
    first = client.post(
        f"/v1/chats/{chat}/messages", json=body, headers=auth(settings, "erin")
    ).json()
    second = client.post(
        f"/v1/chats/{chat}/messages", json=body, headers=auth(settings, "erin")
    ).json()
    assert second["message_id"] == first["message_id"] and second["duplicate"] is True


def test_websocket_round_trip_and_bad_frames(client: TestClient, settings: Settings) -> None:
    chat = client.post("/v1/chats", json={}, headers=auth(settings, "gina")).json()["chat_id"]
    token = mint_token(settings.auth, "gina")
    with client.websocket_connect(f"/v1/ws?token={token}") as ws:
        ws.send_json({"chat_id": chat, "text": "over the socket"})
        reply = ws.receive_json()
        assert reply["ok"] is True and int(reply["message_id"]) > 0
        ws.send_text("not json")
        assert ws.receive_json()["error"]["message"] == "frame: malformed JSON"
        ws.send_json({"chat_id": chat})
        assert ws.receive_json()["error"]["field"] == "text"
        ws.send_json({"chat_id": chat, "text": "still open"})
        assert ws.receive_json()["ok"] is True
    from starlette.websockets import WebSocketDisconnect

    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/v1/ws?token=bad") as ws,
    ):
        ws.receive_json()
    assert closed.value.code == 1008
