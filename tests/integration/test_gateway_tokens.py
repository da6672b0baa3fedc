"""The gateway caches verified tokens (sealstream.auth.VerifiedTokens) and keeps every rule of
a token all the same: a real gateway process on the shared stack, its own topics and schema."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from sealstream.auth import mint_token
from sealstream.settings import Settings
from tests.integration.test_gateway_failures import (
    base,  # noqa: F401 - the module's topics, a fixture
    gateway,
)

SHORT_TTL = 20


def _post(url: str, chat: str, token: str, text: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chats/{chat}/messages",
        json={"text": text},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def test_a_token_accepted_before_is_refused_once_expired_and_its_claims_are_its_own(
    base: Settings,  # noqa: F811
) -> None:
    with gateway(base) as gw:
        auth = gw.settings.auth
        chat = gw.new_chat("tia")
        # Long enough for three posts and a WebSocket frame on a loaded machine: with 3 s,
        # which `exp`'s whole seconds make 2 to 3, the uses "before expiry" could come after it.
        short = mint_token(auth, "tia", ttl_seconds=SHORT_TTL)
        expires = time.time() + SHORT_TTL  # not before the token's `exp`
        for i in range(3):  # the first use verifies it, the next ones find it verified
            answer = _post(gw.url, chat, short, f"before expiry {i}")
            assert answer.status_code == 202, answer.text
        ws_url = f"ws://127.0.0.1:{gw.settings.ingest.port}/v1/ws"
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {short}"}) as ws:
            ws.send(json.dumps({"chat_id": chat, "text": "over the socket"}))
            assert json.loads(ws.recv(timeout=60))["ok"] is True

        # Other claims are another token: not the cached principal of tia's.
        other_user = mint_token(auth, "mallory")
        refused = _post(gw.url, chat, other_user, "let me in")
        assert refused.status_code == 403, refused.text
        # A cached token with its signature changed is not that token.
        head, body, signature = short.split(".")
        forged = f"{head}.{body}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}"
        forged += signature[-1]
        refused = _post(gw.url, chat, forged, "forged")
        assert refused.status_code == 401 and "invalid token" in refused.text

        time.sleep(max(0.0, expires - time.time()) + 1.5)
        expired = _post(gw.url, chat, short, "after expiry")
        assert expired.status_code == 401, expired.text
        assert expired.json()["error"]["message"] == "token expired"
        with (
            connect(ws_url, additional_headers={"Authorization": f"Bearer {short}"}) as ws,
            pytest.raises(ConnectionClosed) as closed,
        ):
            ws.recv(timeout=60)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")
        # A fresh token of the same user goes on.
        fresh = _post(gw.url, chat, mint_token(auth, "tia"), "fresh token")
        assert fresh.status_code == 202, fresh.text
