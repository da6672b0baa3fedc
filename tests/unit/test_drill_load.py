"""The drill's client load against a small fake gateway (a local HTTP server of our own): a
message is retried with the same client_message_id and text until a 202, every attempt is
recorded, and a permanent error stops the retries."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sealstream.drills.harness import DrillResult
from sealstream.drills.load import SteadyLoad


class FakeGateway(BaseHTTPRequestHandler):
    """Answers each message's first two attempts 503 (Retry-After: 0) and 409, then 202; a chat
    named `refused` always gets 422."""

    bodies: list[dict[str, str]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.bodies.append(body)
            seen = sum(1 for b in self.bodies if b == body)
        if "/refused/" in self.path:
            status, headers = 422, {}
        elif seen == 1:
            status, headers = 503, {"Retry-After": "0"}
        elif seen == 2:
            status, headers = 409, {}
        else:
            status, headers = 202, {}
        answer = json.dumps({"message_id": str(1000 + seen), "duplicate": False}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    FakeGateway.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def wait_for_a_message(load: SteadyLoad) -> None:
    """Until the load has sent at least one message (a loaded machine may take a while to
    start its client threads; a fixed pause raced it)."""
    deadline = time.monotonic() + 30
    while not load.snapshot():
        assert time.monotonic() < deadline, "the load sent nothing in 30 s"
        time.sleep(0.05)


def test_a_message_is_retried_with_the_same_id_and_text_until_accepted(gateway: str) -> None:
    load = SteadyLoad([gateway], ["chat-a"], ["t"], "u1", 50, 5.0, give_up_after=30)
    load.start()
    wait_for_a_message(load)
    load.stop()
    posted = load.snapshot()
    assert posted and all(m.message_id is not None for m in posted)
    for message in posted:
        assert [a.outcome for a in message.attempts] == ["503", "409", "202"]
        assert message.attempts[0].retry_after == "0"
        sent = [
            b for b in FakeGateway.bodies if b["client_message_id"] == message.client_message_id
        ]
        assert sent == [{"text": message.text, "client_message_id": message.client_message_id}] * 3
    assert len({m.client_message_id for m in posted}) == len(posted)
    assert len({m.text for m in posted}) == len(posted)


def test_a_permanent_error_is_recorded_and_not_retried(gateway: str) -> None:
    load = SteadyLoad([gateway], ["refused"], ["t"], "u2", 20, 5.0, give_up_after=30)
    load.start()
    wait_for_a_message(load)
    load.stop()
    posted = load.snapshot()
    assert posted and all(m.rejected == "422" and len(m.attempts) == 1 for m in posted)
    result = DrillResult("x", rejected=Counter(["422"]), drain_seconds=1.0)
    assert result.failures == ["rejected: 1"]
