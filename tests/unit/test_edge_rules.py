"""The edge rules without I/O: token redaction in log lines, the JSON 500, the body limit, the
text rules, and the OpenAPI descriptions documenting every error with the real body."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from admin.api import create_app as admin_app
from ingest.api import create_app as ingest_app
from reader.api import create_app as reader_app
from sealstream.auth import mint_token
from sealstream.http import install
from sealstream.http_limits import BodyLimit
from sealstream.observability import JsonFormatter, redact
from sealstream.settings import AuthSettings, Settings
from sealstream.text_rules import storable_text

TOKEN = mint_token(AuthSettings(), "alice")


async def _ready() -> bool:
    return True


@pytest.mark.parametrize(
    "line",
    [
        f'127.0.0.1:5555 - "WebSocket /v1/ws?token={TOKEN}" [accepted]',
        f"Authorization: Bearer {TOKEN}",
        f"sec-websocket-protocol: bearer, {TOKEN}",
        f"GET /x?access_token={TOKEN}&y=1",
        f"the token is {TOKEN}.",
        "GET /v1/ws?token=not-even-a-jwt",
    ],
)
def test_token_like_text_is_redacted(line: str) -> None:
    cleaned = redact(line)
    assert TOKEN not in cleaned and TOKEN.split(".")[2] not in cleaned
    assert "not-even-a-jwt" not in cleaned and "[redacted]" in cleaned
    assert redact(cleaned) == cleaned


def test_every_log_line_is_redacted_whoever_wrote_it() -> None:
    # uvicorn's handshake line: the URL arrives as a %-argument, not in the message itself.
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:1", f"/v1/ws?token={TOKEN}"), None,
    )  # fmt: skip
    record.header = f"Bearer {TOKEN}"
    line = JsonFormatter("ingest").format(record)
    assert TOKEN not in line and json.loads(line)["msg"].endswith('token=[redacted]" [accepted]')


def test_an_unexpected_error_is_a_json_500() -> None:
    app = FastAPI()
    install(app, "test", AuthSettings(), _ready)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug that mentions secret text")

    answer = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert answer.status_code == 500
    assert answer.json() == {"error": {"code": "internal", "message": "internal error"}}


def test_body_limit_counts_bodies_with_and_without_content_length() -> None:
    app = FastAPI()
    install(app, "test", AuthSettings(), _ready)

    @app.post("/echo")
    def echo(body: dict[str, Any]) -> int:
        return len(body)

    app.add_middleware(BodyLimit, limit=1024)
    client = TestClient(app)
    assert client.post("/echo", json={"a": "x" * 100}).status_code == 200
    big = client.post("/echo", json={"a": "x" * 2000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    streamed = client.post(
        "/echo",
        content=iter([b'{"a": "', b"x" * 800, b"x" * 800, b'"}']),
        headers={"Content-Type": "application/json"},
    )
    assert streamed.status_code == 413 and "1024" in streamed.json()["error"]["message"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [("alice", True), ("é 世界", True), ("a\x00b", False), ("a\nb", False), ("a\ud800", False)],
)
def test_storable_text(value: str, ok: bool) -> None:
    assert storable_text(value) is ok


def _apps() -> list[FastAPI]:
    settings = Settings()
    return [
        ingest_app(None, settings, _ready),  # type: ignore[arg-type]
        reader_app(None, settings, _ready),  # type: ignore[arg-type]
        admin_app(None, None, settings, _ready),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("app", _apps(), ids=["ingest", "reader", "admin"])
def test_openapi_documents_every_error_with_the_real_body(app: FastAPI) -> None:
    schema = app.openapi()
    assert "HTTPValidationError" not in json.dumps(schema)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"401", "408", "413", "422", "431", "500", "503"} <= codes, (method, path)
            if "{" in path:
                assert {"403", "404"} <= codes, (method, path)
            if "{chat_id}" in path:
                assert "410" in codes, (method, path)
            for code, response in operation["responses"].items():
                if code[0] in "45":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (method, path, code)


def test_openapi_bounds_participant_ids() -> None:
    schema = _apps()[0].openapi()
    item = schema["components"]["schemas"]["CreateChatIn"]["properties"]["participants"]["items"]
    assert item["maxLength"] == 128 and "pattern" in item
