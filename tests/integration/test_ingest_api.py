"""The gateway app on the real Postgres, Redis, OpenBao and Kafka, through HTTP (TestClient)."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from ingest.idempotency import PostgresClaims
from ingest.ports import Claim, ClaimConflict, Granted
from schemas.events import MAX_TEXT_BYTES, MessageRecord
from sealstream.adapters.kafka import delete_topics, ensure_topics, kafka_client_config
from sealstream.adapters.postgres import Database
from sealstream.auth import mint_token
from sealstream.crypto import TextFingerprints
from sealstream.record_seal import HEADER_EVENT_ID, HEADER_KEY_ID
from sealstream.settings import Settings
from tests.conftest import require_port
from tests.kafka_records import opened_value, opener_for

Record = tuple[bytes, MessageRecord, object]


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
    from ingest.wiring import build

    settings = gateway_settings
    require_port("kafka", "127.0.0.1", int(settings.kafka.bootstrap.rsplit(":", 1)[1]))
    require_port("redis", "127.0.0.1", int(settings.redis.url.rsplit(":", 1)[1].split("/")[0]))
    ensure_topics(settings.kafka)
    app, close = build(settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()
        delete_topics(
            settings.kafka, [settings.kafka.messages_topic, settings.kafka.dead_letter_topic]
        )


def auth(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, user)}"}


def new_chat(client: TestClient, settings: Settings, owner: str, *others: str) -> str:
    created = client.post(
        "/v1/chats", json={"participants": list(others)}, headers=auth(settings, owner)
    )
    assert created.status_code == 201, created.text
    return str(created.json()["chat_id"])


def consume(settings: Settings, chat: str, count: int, settle: float = 0.0) -> list[Record]:
    """The chat's records on the message topic (fresh group, from the earliest offset); waits
    for `count` of them, then `settle` seconds more to catch any record too many."""
    consumer = Consumer(
        kafka_client_config(
            settings.kafka,
            {
                "group.id": f"check-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([settings.kafka.messages_topic])
    out: list[Record] = []
    # Joining the group and reading (opening) the module's whole topic: generous for a loaded
    # machine; a read that is done leaves as soon as `count` came and `settle` passed.
    deadline = time.monotonic() + 90
    settled: float | None = None
    opener = opener_for(settings)  # the gateway seals every record (docs/format.md)
    try:
        while time.monotonic() < deadline:
            if settled is None and len(out) >= count:
                settled = time.monotonic() + settle
            if settled is not None and time.monotonic() >= settled:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            record = MessageRecord.model_validate_json(opened_value(opener, msg))
            if str(record.chat_id) == chat:
                out.append((msg.key() or b"", record, msg.headers() or []))
    finally:
        consumer.close()
        opener.close()
    return out


def test_accepted_messages_are_on_the_topic(client: TestClient, gateway_settings: Settings) -> None:
    settings = gateway_settings
    chat = new_chat(client, settings, "alice", "bob")
    one = client.post(
        f"/v1/chats/{chat}/messages", json={"text": "first ✓"}, headers=auth(settings, "bob")
    )
    batch = client.post(
        f"/v1/chats/{chat}/messages:batch",
        json={"messages": [{"text": "second"}, {"text": "third", "client_message_id": "k3"}]},
        headers=auth(settings, "alice"),
    )
    assert one.status_code == 202 and batch.status_code == 202
    assert one.json()["chat_id"] == chat and one.json()["duplicate"] is False
    assert isinstance(one.json()["message_id"], str)  # decimal string, not a JSON number
    ids = [one.json()["message_id"]] + [a["message_id"] for a in batch.json()["accepted"]]
    assert ids == sorted(ids, key=int)

    records = consume(settings, chat, 3)
    assert [str(r.message_id) for _, r, _ in records] == ids
    assert [(r.text, r.sender_id, r.client_message_id) for _, r, _ in records] == [
        ("first ✓", "bob", None),
        ("second", "alice", None),
        ("third", "alice", "k3"),
    ]
    for key, record, headers in records:
        assert key == chat.encode()  # keyed by chat id
        # The seal's key id and the event id; no text in the headers.
        assert dict(headers) == {  # type: ignore[call-overload]
            HEADER_KEY_ID: dict(headers)[HEADER_KEY_ID],  # type: ignore[call-overload]
            HEADER_EVENT_ID: str(record.change_id).encode(),
        }
        assert record.tenant_id == "default" and record.schema_version == 1
        assert abs(time.time() - record.sent_at.timestamp()) < 60


def test_errors_are_clear_and_never_500(client: TestClient, settings: Settings) -> None:
    chat = new_chat(client, settings, "carol")
    url = f"/v1/chats/{chat}/messages"
    carol = auth(settings, "carol")
    missing = client.post(url, json={"text": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
    bad_token = {"Authorization": "Bearer not.a.token"}
    assert client.post(url, json={"text": "x"}, headers=bad_token).status_code == 401
    expired = {"Authorization": f"Bearer {mint_token(settings.auth, 'carol', ttl_seconds=-60)}"}
    assert client.post(url, json={"text": "x"}, headers=expired).status_code == 401
    other = client.post(url, json={"text": "x"}, headers=auth(settings, "dave"))
    assert other.status_code == 403 and other.json()["error"]["code"] == "not_participant"
    unknown = client.post(f"/v1/chats/{uuid.uuid4()}/messages", json={"text": "x"}, headers=carol)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_chat"
    bad_path = client.post("/v1/chats/not-a-uuid/messages", json={"text": "x"}, headers=carol)
    assert bad_path.status_code == 422 and "chat_id" in bad_path.json()["error"]["field"]

    too_big = client.post(url, json={"text": "y" * 20_000}, headers=carol)
    assert too_big.status_code == 422 and too_big.json()["error"]["field"] == "text"
    assert str(MAX_TEXT_BYTES) in too_big.json()["error"]["message"] and "yyyy" not in too_big.text
    json_headers = {**carol, "content-type": "application/json"}
    malformed = client.post(url, content=b"{oops", headers=json_headers)
    assert malformed.status_code == 422
    assert malformed.json()["error"]["message"] == "body: malformed JSON"
    surrogate = client.post(url, content=b'{"text": "hi \\ud800"}', headers=json_headers)
    assert surrogate.status_code == 422 and surrogate.json()["error"]["field"] == "text"
    in_batch = client.post(
        f"{url}:batch", content=b'{"messages": [{"text": "\\udfff"}]}', headers=json_headers
    )
    assert in_batch.status_code == 422 and in_batch.json()["error"]["field"] == "messages.0.text"
    blank = client.post(url, json={"text": "   "}, headers=carol)
    assert blank.status_code == 422 and blank.json()["error"]["field"] == "text"
    missing_text = client.post(url, json={}, headers=carol)
    assert missing_text.status_code == 422 and missing_text.json()["error"]["field"] == "text"
    extra = client.post(url, json={"text": "x", "color": "red"}, headers=carol)
    assert extra.status_code == 422 and extra.json()["error"]["field"] == "color"
    empty_batch = client.post(f"{url}:batch", json={"messages": []}, headers=carol)
    assert empty_batch.status_code == 422 and empty_batch.json()["error"]["field"] == "messages"
    bad_member = client.post("/v1/chats", json={"participants": ["ok", "x" * 200]}, headers=carol)
    assert bad_member.status_code == 422 and bad_member.json()["error"]["field"] == "participants.1"
    # A token without a tenant claim creates chats in the default tenant only.
    other_tenant = client.post("/v1/chats", json={"tenant_id": "acme"}, headers=carol)
    assert other_tenant.status_code == 403 and other_tenant.json()["error"]["field"] == "tenant_id"
    stranger = {"Authorization": f"Bearer {mint_token(settings.auth, 'eve', tenant='nope')}"}
    bad_tenant = client.post("/v1/chats", json={}, headers=stranger)
    assert bad_tenant.status_code == 422 and bad_tenant.json()["error"]["field"] == "tenant_id"


def test_a_taken_chat_id_is_refused_without_revealing_the_chat(
    client: TestClient, settings: Settings
) -> None:
    chat_id = str(uuid.uuid4())
    body = {"participants": ["secret-friend"], "chat_id": chat_id}
    first = client.post("/v1/chats", json=body, headers=auth(settings, "frank"))
    assert first.status_code == 201 and first.json()["chat_id"] == chat_id
    again = client.post("/v1/chats", json=body, headers=auth(settings, "frank"))
    assert again.status_code == 201 and again.json() == first.json()  # a safe retry
    stolen = client.post(
        "/v1/chats", json={"participants": [], "chat_id": chat_id}, headers=auth(settings, "eve")
    )
    assert stolen.status_code == 409 and stolen.json()["error"]["code"] == "chat_exists"
    assert "secret-friend" not in stolen.text and "frank" not in stolen.text


def test_idempotent_retry_publishes_once(client: TestClient, gateway_settings: Settings) -> None:
    settings = gateway_settings
    chat = new_chat(client, settings, "erin")
    url, erin = f"/v1/chats/{chat}/messages", auth(settings, "erin")
    body = {"text": "only once", "client_message_id": "retry-1"}
    first = client.post(url, json=body, headers=erin)
    second = client.post(url, json=body, headers=erin)
    assert first.status_code == second.status_code == 202
    assert second.json()["message_id"] == first.json()["message_id"]
    assert (first.json()["duplicate"], second.json()["duplicate"]) == (False, True)
    batch = client.post(
        f"{url}:batch",
        json={"messages": [body, {"text": "new", "client_message_id": "retry-2"}]},
        headers=erin,
    ).json()["accepted"]
    assert batch[0]["message_id"] == first.json()["message_id"] and batch[0]["duplicate"]
    assert batch[1]["duplicate"] is False

    records = consume(settings, chat, 2, settle=1.0)
    assert [(r.text, r.client_message_id) for _, r, _ in records] == [
        ("only once", "retry-1"),
        ("new", "retry-2"),
    ]


def test_postgres_claims_hold_the_first_message_and_refuse_another_text(database: Database) -> None:
    claims = PostgresClaims(database)
    fingerprints = TextFingerprints(b"a test secret of enough length")

    def fingerprint(text: str) -> bytes:
        return fingerprints.of(text, "client-id-42")

    # Long enough that random bytes (hashes) never contain it by chance: a 2-byte text did.
    TEXT = "hello from the claims test"
    chat, sender, at = uuid.uuid4(), "ivy-the-sender", datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    later = at + timedelta(seconds=5)

    [first] = claims.claim(chat, sender, [Claim("client-id-42", 1001, fingerprint(TEXT), at)])
    assert first == Granted("client-id-42", 1001, at, earlier=False, acknowledged=False)
    [retry] = claims.claim(chat, sender, [Claim("client-id-42", 1002, fingerprint(TEXT), later)])
    assert retry == Granted("client-id-42", 1001, at, earlier=True, acknowledged=False)
    claims.acknowledge(chat, sender, [retry])
    [known] = claims.claim(chat, sender, [Claim("client-id-42", 1003, fingerprint(TEXT), later)])
    assert known.message_id == 1001 and known.acknowledged
    # The same id from another sender, or in another chat, is another message.
    [other] = claims.claim(chat, "jo", [Claim("client-id-42", 1004, fingerprint(TEXT), at)])
    assert other.message_id == 1004 and not other.earlier

    with pytest.raises(ClaimConflict) as conflict:
        claims.claim(
            chat,
            sender,
            [
                Claim("fresh", 2001, fingerprint("new"), at),
                Claim("client-id-42", 2002, fingerprint("changed"), at),
            ],
        )
    assert conflict.value.index == 1
    [fresh] = claims.claim(chat, sender, [Claim("fresh", 2003, fingerprint("other"), at)])
    assert fresh.message_id == 2003 and not fresh.earlier  # the refused call claimed nothing

    with database.connection() as conn:
        rows = conn.execute("SELECT * FROM message_claims").fetchall()
    for row in rows:  # ids and text stay out of the table: a hash key and a keyed fingerprint
        stored = b"".join(bytes(row[c]) for c in ("claim_key", "fingerprint"))
        assert b"client-id-42" not in stored and b"ivy-the-sender" not in stored
        assert TEXT.encode() not in stored
        assert bytes(row["fingerprint"]) != hashlib.sha256(TEXT.encode()).digest()

    assert claims.purge(now=datetime.now(UTC) + timedelta(hours=23)) == 0
    assert claims.purge(now=datetime.now(UTC) + timedelta(hours=25)) >= 3
    [renewed] = claims.claim(chat, sender, [Claim("client-id-42", 3001, fingerprint("x"), at)])
    assert renewed.message_id == 3001 and not renewed.earlier  # past the window: a new message


def test_websocket_round_trip_and_bad_frames(
    client: TestClient, gateway_settings: Settings
) -> None:
    settings = gateway_settings
    chat = new_chat(client, settings, "gina")
    token = mint_token(settings.auth, "gina")
    with client.websocket_connect(f"/v1/ws?token={token}") as ws:
        ws.send_json({"chat_id": chat, "text": "over the socket", "client_message_id": "w1"})
        reply = ws.receive_json()
        assert reply["ok"] is True and int(reply["message_id"]) > 0
        assert reply["client_message_id"] == "w1" and reply["duplicate"] is False
        ws.send_text("not json")
        assert ws.receive_json() == {
            "ok": False,
            "error": {
                "code": "invalid_request",
                "message": "frame: malformed JSON",
                "field": "frame",
            },
        }
        ws.send_json({"chat_id": chat})
        assert ws.receive_json()["error"]["field"] == "text"
        ws.send_json({"chat_id": chat, "text": "z" * (MAX_TEXT_BYTES + 1)})
        too_long = ws.receive_json()
        assert too_long["error"]["field"] == "text" and "zzzz" not in str(too_long)
        ws.send_text('{"chat_id": "' + chat + '", "text": "\\ud800"}')  # a lone surrogate
        assert ws.receive_json()["error"]["field"] == "text"
        ws.send_json({"chat_id": str(uuid.uuid4()), "text": "x"})
        assert ws.receive_json()["error"]["code"] == "unknown_chat"
        ws.send_bytes(b"\xff\xfe")
        assert ws.receive_json()["ok"] is False
        ws.send_json({"chat_id": chat, "text": "over the socket", "client_message_id": "w1"})
        retried = ws.receive_json()
        assert retried["message_id"] == reply["message_id"] and retried["duplicate"] is True
        ws.send_json({"chat_id": chat, "text": "still open"})
        assert ws.receive_json()["ok"] is True

    # The token may come in the Authorization header too; a non-participant is told so.
    with client.websocket_connect("/v1/ws", headers=auth(settings, "mallory")) as ws:
        ws.send_json({"chat_id": chat, "text": "let me in"})
        assert ws.receive_json()["error"]["code"] == "not_participant"

    records = consume(settings, chat, 2, settle=1.0)
    assert [r.text for _, r, _ in records] == ["over the socket", "still open"]

    for url in ("/v1/ws?token=bad", "/v1/ws"):
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(url) as ws:
            ws.receive_json()
        assert closed.value.code == 1008


def test_openapi_health_and_metrics(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "Sealstream ingest gateway"
    assert {t["name"] for t in spec["tags"]} == {"chats", "messages", "attachments"}
    paths = spec["paths"]
    assert set(paths) >= {
        "/v1/chats",
        "/v1/chats/{chat_id}/messages",
        "/v1/chats/{chat_id}/messages:batch",
    }
    post = paths["/v1/chats/{chat_id}/messages"]["post"]
    assert {"202", "401", "403", "404", "410", "422", "503"} <= set(post["responses"])
    assert post["security"] == [{"HTTPBearer": []}]
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    metrics = client.get("/metrics").text
    assert "sealstream_ingest_messages_total" in metrics
    assert "sealstream_ingest_batch_size_bucket" in metrics


def test_same_client_id_with_another_text_is_a_conflict_over_http_and_websocket(
    client: TestClient, gateway_settings: Settings
) -> None:
    settings = gateway_settings
    chat = new_chat(client, settings, "quinn")
    url, quinn = f"/v1/chats/{chat}/messages", auth(settings, "quinn")
    first = client.post(url, json={"text": "original", "client_message_id": "q-1"}, headers=quinn)
    assert first.status_code == 202, first.text

    changed = client.post(url, json={"text": "changed", "client_message_id": "q-1"}, headers=quinn)
    assert changed.status_code == 409, changed.text
    assert changed.json()["error"]["code"] == "idempotency_conflict"
    assert changed.json()["error"]["field"] == "client_message_id"
    assert "changed" not in changed.text and "original" not in changed.text

    batch = client.post(
        f"{url}:batch",
        json={
            "messages": [
                {"text": "fresh", "client_message_id": "q-2"},
                {"text": "changed", "client_message_id": "q-1"},
            ]
        },
        headers=quinn,
    )
    assert batch.status_code == 409, batch.text
    assert batch.json()["error"]["field"] == "messages.1.client_message_id"
    twice = client.post(
        f"{url}:batch",
        json={
            "messages": [
                {"text": "one", "client_message_id": "q-3"},
                {"text": "two", "client_message_id": "q-3"},
            ]
        },
        headers=quinn,
    )
    assert twice.status_code == 409 and twice.json()["error"]["field"] == (
        "messages.1.client_message_id"
    )
    # The refused batch claimed nothing: its new id is free for another text.
    other = client.post(url, json={"text": "other", "client_message_id": "q-2"}, headers=quinn)
    assert other.status_code == 202 and other.json()["duplicate"] is False

    with client.websocket_connect(f"/v1/ws?token={mint_token(settings.auth, 'quinn')}") as ws:
        ws.send_json({"chat_id": chat, "text": "changed", "client_message_id": "q-1"})
        reply = ws.receive_json()
        assert reply["ok"] is False and reply["error"]["code"] == "idempotency_conflict"
        assert reply["error"]["field"] == "client_message_id"
        ws.send_json({"chat_id": chat, "text": "original", "client_message_id": "q-1"})
        same = ws.receive_json()
        assert same["ok"] is True and same["message_id"] == first.json()["message_id"]

    records = consume(settings, chat, 2, settle=1.0)
    assert [(r.text, r.client_message_id) for _, r, _ in records] == [
        ("original", "q-1"),
        ("other", "q-2"),
    ]
