"""The edge of the three HTTP services, on the running pipeline: text Postgres cannot hold is
refused before any key changes, WebSocket authentication and expiry, size and connection limits,
and no bearer token in any service's log (issue 10)."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from sealstream.auth import mint_token
from tests.e2e.conftest import Pipeline, free_port
from tests.e2e.test_pipeline import create_chat, history, wait_until

NUL_REASON = "rotate \x00 now"
# Every token this module hands a service; none of them may appear in a log.
USED_TOKENS: list[str] = []


@pytest.fixture(scope="module")
def admin(pipeline: Pipeline) -> Iterator[Pipeline]:
    pipeline.start("admin")
    try:
        pipeline.wait_http(pipeline.admin_url)
        yield pipeline
    finally:
        if "admin" in pipeline.procs:
            pipeline.signal("admin", signal.SIGTERM)


def _token(pipe: Pipeline, user: str, ttl: int | None = None, admin: bool = False) -> str:
    token = mint_token(pipe.settings.auth, user, ttl_seconds=ttl, roles=("admin",) if admin else ())
    USED_TOKENS.append(token)
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ws_url(pipe: Pipeline) -> str:
    return pipe.ingest_url.replace("http://", "ws://") + "/v1/ws"


def _frame(chat: str, text: str = "hello over the socket") -> str:
    return json.dumps({"chat_id": chat, "text": text})


# --- 1. text Postgres cannot hold, refused at the edge; every key change audited ------------------


def test_rotation_with_a_nul_reason_is_refused_and_changes_nothing(admin: Pipeline) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    headers = _bearer(_token(admin, "ops", admin=True))
    url = f"{admin.admin_url}/v1/chats/{chat}/keys/rotate"
    refused = httpx.post(url, json={"reason": NUL_REASON}, headers=headers, timeout=60)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "reason"
    surrogate = httpx.post(
        url,
        content=b'{"reason": "\\ud800"}',
        headers={**headers, "Content-Type": "application/json"},
        timeout=60,
    )
    assert surrogate.status_code == 422 and surrogate.json()["error"]["field"] == "reason"
    keys = httpx.get(f"{admin.admin_url}/v1/chats/{chat}/keys", headers=headers, timeout=60)
    assert [v["dek_version"] for v in keys.json()["versions"]] == [1]
    audit = httpx.get(f"{admin.admin_url}/v1/audit", params={"chat_id": chat}, headers=headers)
    assert "dek_rotated" not in [e["action"] for e in audit.json()]


def test_chat_deletion_with_a_nul_reason_is_refused_and_deletes_nothing(admin: Pipeline) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    headers = _bearer(_token(admin, "ops", admin=True))
    refused = httpx.delete(
        f"{admin.admin_url}/v1/chats/{chat}",
        params={"reason": NUL_REASON},
        headers=headers,
        timeout=60,
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "query.reason"
    keys = httpx.get(f"{admin.admin_url}/v1/chats/{chat}/keys", headers=headers, timeout=60)
    assert keys.json()["state"] == "active"
    assert [v["state"] for v in keys.json()["versions"]] == ["active"]
    posted = httpx.post(
        f"{admin.ingest_url}/v1/chats/{chat}/messages",
        json={"text": "still open"},
        headers=_bearer(_token(admin, "alice")),
        timeout=60,
    )
    assert posted.status_code == 202, posted.text


def test_token_whose_sub_postgres_cannot_hold_is_refused_not_a_500(pipeline: Pipeline) -> None:
    settings = pipeline.settings.auth
    now = int(time.time())
    for sub in ("ali\x00ce", "ali\ud800ce"):
        claims = {"sub": sub, "iss": settings.issuer, "iat": now, "exp": now + 600}
        token = jwt.encode(claims, settings.secret.get_secret_value(), algorithm="HS256")
        USED_TOKENS.append(token)
        for url in (f"{pipeline.ingest_url}/v1/chats",):
            answer = httpx.post(url, json={"participants": ["bob"]}, headers=_bearer(token))
            assert answer.status_code == 401, answer.text
            assert "sub" in answer.json()["error"]["message"]


def test_participant_ids_postgres_cannot_hold_are_refused(pipeline: Pipeline) -> None:
    headers = _bearer(_token(pipeline, "alice"))
    for bad in ("bo\x00b", "x" * 129):
        answer = httpx.post(
            f"{pipeline.ingest_url}/v1/chats", json={"participants": [bad]}, headers=headers
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["field"] == "participants.0"


def test_tenant_key_and_retention_changes_are_audited(admin: Pipeline) -> None:
    # Which master key wraps a tenant's DEKs, and after how many days its keys are destroyed,
    # are key-lifecycle decisions: the admin API's description says each is audited.
    headers = _bearer(_token(admin, "ops", admin=True))
    tenant = f"audit-{free_port()}"
    for key in (f"{tenant}-k1", f"{tenant}-k2"):  # register, then re-point its master key
        answer = httpx.post(
            f"{admin.admin_url}/v1/tenants",
            json={"tenant_id": tenant, "kms_key_name": key},
            headers=headers,
            timeout=60,
        )
        assert answer.status_code in (200, 201), answer.text
    answer = httpx.put(
        f"{admin.admin_url}/v1/tenants/{tenant}/retention",
        json={"days": 5},
        headers=headers,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    audit = httpx.get(f"{admin.admin_url}/v1/audit", params={"limit": 1000}, headers=headers)
    assert audit.status_code == 200
    mentioning = [e for e in audit.json() if tenant in json.dumps(e)]
    assert len(mentioning) >= 3, mentioning


# --- 2. WebSocket authentication and expiry ---------------------------------------------------


def _closed(ws: Any) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=60)
    return closed.value


def test_socket_is_closed_1008_when_its_token_expires(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    # 10 s, not 3 (2 to 3, `exp` being whole seconds): the handshake and the first post,
    # acknowledged by Kafka, must come before the expiry, on a loaded machine too.
    token = _token(pipeline, "alice", ttl=10)
    expires = jwt.decode(token, options={"verify_signature": False})["exp"]
    with connect(_ws_url(pipeline), additional_headers=_bearer(token), open_timeout=30) as ws:
        ws.send(_frame(chat))
        assert json.loads(ws.recv(timeout=60))["ok"] is True
        while time.time() < expires + 1:  # let the token expire (no timing is asserted)
            time.sleep(0.2)
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(_frame(chat, "after expiry"))
            ws.recv(timeout=60)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")


@pytest.mark.parametrize(
    ("how", "reason"),
    [("bad", "invalid token"), ("expired", "token expired"), ("none", "authentication required")],
)
def test_refused_handshake_is_a_1008_close_with_a_reason(
    pipeline: Pipeline, how: str, reason: str
) -> None:
    settings = pipeline.settings.auth
    headers: dict[str, str] = {}
    if how == "bad":
        headers = _bearer("not-a-token")
    elif how == "expired":
        now = int(time.time())
        claims = {"sub": "alice", "iss": settings.issuer, "iat": now - 100, "exp": now - 50}
        headers = _bearer(jwt.encode(claims, settings.secret.get_secret_value(), "HS256"))
    with connect(_ws_url(pipeline), additional_headers=headers, open_timeout=30) as ws:
        if how == "none":
            ws.send(json.dumps({"chat_id": "x", "text": "no auth frame first"}))
        closed = _closed(ws)
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (1008, reason)


def test_token_in_the_subprotocol_header(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    token = _token(pipeline, "alice")
    with connect(_ws_url(pipeline), subprotocols=["bearer", token], open_timeout=30) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bearer"
        ws.send(_frame(chat))
        assert json.loads(ws.recv(timeout=60))["ok"] is True


def test_token_in_a_first_auth_frame(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    with connect(_ws_url(pipeline), open_timeout=30) as ws:
        ws.send(json.dumps({"auth": _token(pipeline, "alice")}))
        assert json.loads(ws.recv(timeout=60)) == {"ok": True, "authenticated": True}
        ws.send(_frame(chat))
        assert json.loads(ws.recv(timeout=60))["ok"] is True


def test_an_auth_frame_carrying_a_message_is_refused_not_dropped(pipeline: Pipeline) -> None:
    """A message riding on the auth frame used to be ignored (the client got "authenticated" and
    no word about its message); now the frame is refused by name and nothing is published."""
    chat = create_chat(pipeline, "alice", ["bob"])
    riding = {"auth": _token(pipeline, "alice"), **json.loads(_frame(chat, "riding along"))}
    with connect(_ws_url(pipeline), open_timeout=30) as ws:
        ws.send(json.dumps(riding))
        answer = json.loads(ws.recv(timeout=60))
        assert answer["ok"] is False and answer["error"]["field"] == "frame", answer
        assert "chat_id" in answer["error"]["message"] and "text" in answer["error"]["message"]
        closed = _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    # Only the next, proper message reaches the chat (one partition per chat: in order).
    with connect(_ws_url(pipeline), open_timeout=30) as ws:
        ws.send(json.dumps({"auth": _token(pipeline, "alice")}))
        assert json.loads(ws.recv(timeout=60)) == {"ok": True, "authenticated": True}
        ws.send(_frame(chat, "sent properly"))
        assert json.loads(ws.recv(timeout=60))["ok"] is True
    wait_until(lambda: len(history(pipeline, "bob", chat)) >= 1, what="the proper message")
    assert [m["text"] for m in history(pipeline, "bob", chat)] == ["sent properly"]


def test_query_token_still_works(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    url = f"{_ws_url(pipeline)}?token={_token(pipeline, 'alice')}"
    with connect(url, open_timeout=30) as ws:
        ws.send(_frame(chat))
        assert json.loads(ws.recv(timeout=60))["ok"] is True


# --- 3. limits at the edge --------------------------------------------------------------------


def _exchange(url: str, pieces: Iterable[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP/1.1 request piece by piece and return the answer (status, headers, body).

    Stops sending as soon as the server answers: a server that refuses early may close while the
    client is still sending."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    data = b""
    try:
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except OSError:
                break
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ")[1]), headers, body


def _length(data: bytes) -> int:
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data.split(b"\r\n\r\n", 1)[0])
    return int(found.group(1)) if found else 0


def _services(pipe: Pipeline) -> list[str]:
    return [pipe.ingest_url, pipe.reader_url, pipe.admin_url]


def _listeners(pipe: Pipeline) -> list[str]:
    """Every listener: the three APIs and the workers' health endpoints."""
    workers = (pipe.settings.encryptor_http.port, pipe.settings.indexer_http.port)
    return [*_services(pipe), *(f"http://127.0.0.1:{port}" for port in workers)]


def _many_headers(total: int) -> Iterator[bytes]:
    yield b"GET /healthz HTTP/1.1\r\nHost: sealstream\r\n"
    for i in range(total // 65536):
        yield b"X-Filler-%d: " % i + b"a" * 65500 + b"\r\n"
    yield b"\r\n"


def _one_header(total: int) -> Iterator[bytes]:
    yield b"GET /healthz HTTP/1.1\r\nHost: sealstream\r\nX-Big: "
    for _ in range(total // 65536):
        yield b"b" * 65536
    yield b"\r\n\r\n"


@pytest.mark.parametrize(("shape", "size"), [("many", 2 << 20), ("one", 8 << 20)])
def test_oversized_request_heads_get_431(admin: Pipeline, shape: str, size: int) -> None:
    for url in _listeners(admin):
        pieces = _many_headers(size) if shape == "many" else _one_header(size)
        status, _, body = _exchange(url, pieces)
        assert status == 431, (url, status)
        assert json.loads(body)["error"]["code"] == "header_too_large"
        assert (
            str(admin.settings.ingest.limits.max_header_bytes)
            in json.loads(body)["error"]["message"]
        )


def test_oversized_bodies_get_413_with_or_without_content_length(admin: Pipeline) -> None:
    for url, path in ((admin.ingest_url, b"/v1/chats"), (admin.admin_url, b"/v1/tenants")):
        limit = 10 << 20  # above every listener's default body limit
        declared = [
            b"POST %s HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path, limit + 1),
            *(b"[" * 65536 for _ in range(limit // 65536 + 1)),
        ]
        status, _, body = _exchange(url, declared)
        assert status == 413, (url, status)
        assert json.loads(body)["error"]["code"] == "payload_too_large"
        chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
        chunked = [
            b"POST %s HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % path,
            *(chunk for _ in range(limit // 65536 + 2)),
            b"0\r\n\r\n",
        ]
        status, _, body = _exchange(url, chunked)
        assert status == 413, (url, status)
        assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_openapi_lists_the_statuses_each_route_really_answers(admin: Pipeline) -> None:
    # The body limit answers 413 on every method (GET included), so every operation lists it;
    # 410 (a deleted chat) is not listed for job and tenant routes, which never answer it.
    chat = create_chat(admin, "alice", ["bob"])
    reader = f"{admin.reader_url}/v1/chats/{chat}/messages"
    limit = admin.settings.reader.limits.max_body_bytes
    oversized = b"GET %s HTTP/1.1\r\nHost: s\r\nAuthorization: Bearer %s\r\n" % (
        urlsplit(reader).path.encode(),
        _token(admin, "alice").encode(),
    )
    status, _, _ = _exchange(reader, [oversized + b"Content-Length: %d\r\n\r\n" % (limit + 1)])
    assert status == 413
    for url in _services(admin):
        spec = httpx.get(f"{url}/openapi.json", timeout=60).json()
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                codes = set(operation["responses"])
                assert "413" in codes, (url, method, path)
                if "/jobs" in path or "/tenants" in path:
                    assert "410" not in codes, (url, method, path)


def test_oversized_websocket_message_closes_1009(pipeline: Pipeline) -> None:
    token = _token(pipeline, "alice")
    limit = 256 * 1024  # above the default frame limit (128 KiB)
    with connect(_ws_url(pipeline), additional_headers=_bearer(token), open_timeout=30) as ws:
        ws.send(json.dumps({"chat_id": "x", "text": "y" * (limit + 1)}))
        closed = _closed(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1009


def test_connections_beyond_the_limit_get_503(pipeline: Pipeline) -> None:
    port = free_port()
    pipeline.start(
        "ingest",
        key="ingest-2-connections",
        env={
            "SEALSTREAM_INGEST__PORT": str(port),
            "SEALSTREAM_INGEST__LIMITS": json.dumps({"max_connections": 2}),
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        pipeline.wait_http(url)
        request = b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n"
        held = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
        try:
            for sock in held:  # two keep-alive connections, answered and left open
                sock.sendall(request)
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            status, headers, body = _exchange(url, [request])
            assert status == 503 and headers.get("retry-after") == "1"
            assert json.loads(body)["error"]["code"] == "unavailable"
        finally:
            for sock in held:
                sock.close()
        # Once they are closed, new connections are served again.
        deadline = time.monotonic() + 60
        while _exchange(url, [request])[0] != 200:
            assert time.monotonic() < deadline, "still refused after the connections closed"
            time.sleep(0.2)
    finally:
        pipeline.signal("ingest-2-connections", signal.SIGTERM)


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or 60 s of silence: then what came)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:  # socket.timeout: the server neither answered nor closed
            return data
        if not chunk:
            return data
        data += chunk


def _ws_handshake(extra: bytes, path: bytes = b"/v1/ws") -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"%s\r\n" % (path, extra)
    )


@pytest.mark.parametrize("shape", ["long header", "many headers", "long url"])
def test_websocket_handshake_under_the_head_limit_is_answered(
    pipeline: Pipeline, shape: str
) -> None:
    # Under the 16 KiB head limit, but past the WebSocket library's own per-line (8 KiB) and
    # header-count (128) limits: the handshake used to get no answer and stay open for ever.
    if shape == "long header":
        request = _ws_handshake(b"X-Big: " + b"a" * 9000 + b"\r\n")
    elif shape == "many headers":
        request = _ws_handshake(b"".join(b"X-%d: a\r\n" % i for i in range(140)))
    else:
        request = _ws_handshake(b"", path=b"/v1/ws?token=" + b"a" * 9000)
    assert len(request) < pipeline.settings.ingest.limits.max_header_bytes
    parts = urlsplit(pipeline.ingest_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(request)
        data = _answer(sock)
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "header_too_large"


def test_slow_or_silent_clients_get_408_and_free_their_connection(pipeline: Pipeline) -> None:
    # Two connections allowed: a client that never finishes its head (or body) must not hold
    # them for ever, or every other client gets 503 (slowloris).
    port = free_port()
    limits = {"max_connections": 2, "head_timeout_seconds": 2, "body_timeout_seconds": 2}
    pipeline.start(
        "ingest",
        key="ingest-2-slow",
        env={"SEALSTREAM_INGEST__PORT": str(port), "SEALSTREAM_INGEST__LIMITS": json.dumps(limits)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        pipeline.wait_http(url)
        slow = {
            "silent": b"",
            "partial head": b"GET /healthz HTTP/1.1\r\nHost: s\r\nX-Slow: a",
            "partial body": b"POST /v1/chats HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n{",
        }
        for what, sent in slow.items():
            held = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
            try:
                for sock in held:
                    sock.sendall(sent)
                answers = [_answer(sock) for sock in held]
            finally:
                for sock in held:
                    sock.close()
            for data in answers:
                assert data.startswith(b"HTTP/1.1 408 "), (what, data[:80])
                body = json.loads(data.partition(b"\r\n\r\n")[2])
                assert body["error"]["code"] == "request_timeout"
        request = b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n"
        deadline = time.monotonic() + 60
        while _exchange(url, [request])[0] != 200:
            assert time.monotonic() < deadline, "still refused after the slow clients were cut"
            time.sleep(0.2)
    finally:
        pipeline.signal("ingest-2-slow", signal.SIGTERM)


# --- no token in any log (runs last in this module) ---------------------------------------------

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")


def test_no_service_log_holds_a_token(admin: Pipeline) -> None:
    # Requests that put tokens where a log line could pick them up, on every service.
    token = _token(admin, "alice")
    for url in _services(admin):
        httpx.get(f"{url}/v1/nothing-here?token={token}", headers=_bearer(token))
        httpx.get(f"{url}/healthz?access_token={token}")
    logs = sorted(admin.log_dir.glob("*.log"))
    assert {p.stem for p in logs} >= {"ingest", "reader", "admin", "encryptor", "indexer"}
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert '"service": "ingest"' in text  # the services did write their logs there
    assert USED_TOKENS
    leaked = [t for t in USED_TOKENS if t in text or t.split(".")[2] in text]
    assert not leaked, f"{len(leaked)} tokens in the service logs"
    assert not _JWT.search(text), _JWT.search(text)
    assert not re.search(r"(?i)bearer [A-Za-z0-9_-]{8,}", text)
    assert not re.search(r"token=(?!\[redacted\])[A-Za-z0-9_-]{8,}", text)
