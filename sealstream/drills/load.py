"""The steady client load of a fault drill: threads posting one message at a time through the
gateways, retrying with the same `client_message_id` and text, every attempt recorded.

Each client behaves like a careful real one: one message in flight, a per-request deadline, a
random gateway per attempt (so a dead gateway is failed over), and a retry of the *same* message
after a 503 (waiting its `Retry-After`, capped), a 409 (`in_flight`), a 5xx, a timeout or a
connection error. A message is retried until the gateway answers 202 or, once the load was asked
to stop, until `give_up_after` seconds have passed; it is then recorded as given up (the client
knows it was not accepted). Other 4xx answers are permanent and recorded as rejected.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import httpx

# Seconds a client waits before retrying when the answer gave no Retry-After, doubling up to 2 s.
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 2.0
# HTTP answers after which the same message is sent again (anything else 4xx is permanent).
_RETRY_STATUSES = {409, 500, 502, 503, 504}
TIMEOUT = "timeout"
CONNECTION_ERROR = "conn_error"


@dataclass(frozen=True)
class Attempt:
    """One HTTP request of one message."""

    sent_at: float  # time.monotonic() when the request was sent
    seconds: float  # until the answer, the timeout or the connection error
    gateway: int  # index into the gateway URLs
    outcome: str  # the HTTP status ("202", "503", ...), TIMEOUT or CONNECTION_ERROR
    retry_after: str | None  # the Retry-After header of the answer, if any


@dataclass
class Posted:
    """One client message: what was sent and everything the gateways answered."""

    client: int
    chat_id: str
    client_message_id: str
    text: str
    token: str  # a word found only in this message's text (for search checks)
    first_sent: float
    attempts: list[Attempt] = field(default_factory=list)
    message_id: str | None = None  # from the 202
    acked_at: float | None = None
    said_duplicate: bool = False  # the 202 carried duplicate: true (a retry matched)
    gave_up: bool = False
    rejected: str | None = None  # the permanent answer, e.g. "422"


class SteadyLoad:
    """`clients` threads, each posting to its own chat at about `rate / clients` messages/s."""

    def __init__(
        self,
        gateways: list[str],
        chats: list[str],
        tokens: list[str],
        tag: str,
        rate: float,
        request_timeout: float,
        give_up_after: float,
    ) -> None:
        if len(chats) != len(tokens):
            raise ValueError("one chat and one bearer token per client")
        self.gateways = gateways
        self.chats = chats
        self.tokens = tokens
        self.tag = tag  # unique per drill run: part of every client_message_id and text
        self.interval = len(chats) / rate
        self.request_timeout = request_timeout
        self.give_up_after = give_up_after
        self.posted: list[Posted] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped_at: float | None = None
        self._threads = [
            threading.Thread(target=self._client, args=(n,), name=f"drill-client-{n}", daemon=True)
            for n in range(len(chats))
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending new messages and wait until every client finished its current one."""
        self._stopped_at = time.monotonic()
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join()

    def snapshot(self) -> list[Posted]:
        with self._lock:
            return list(self.posted)

    def _client(self, n: int) -> None:
        rng = random.Random(f"{self.tag}-{n}")  # noqa: S311 - load spreading, not security
        headers = {"Authorization": f"Bearer {self.tokens[n]}"}
        seq = 0
        next_at = time.monotonic()
        with httpx.Client(timeout=self.request_timeout) as http:
            while not self._stop.is_set():
                seq += 1
                token = f"w{self.tag}c{n}s{seq}z"
                message = Posted(
                    client=n,
                    chat_id=self.chats[n],
                    client_message_id=f"{self.tag}-{n}-{seq}",
                    text=f"drill {self.tag} client {n} message {seq}: {token} café ✓",
                    token=token,
                    first_sent=time.monotonic(),
                )
                with self._lock:
                    self.posted.append(message)
                self._deliver(http, rng, headers, message)
                next_at = max(next_at + self.interval, time.monotonic())
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _deliver(
        self, http: httpx.Client, rng: random.Random, headers: dict[str, str], message: Posted
    ) -> None:
        backoff = _FIRST_BACKOFF
        body = {"text": message.text, "client_message_id": message.client_message_id}
        while True:
            gateway = rng.randrange(len(self.gateways))
            url = f"{self.gateways[gateway]}/v1/chats/{message.chat_id}/messages"
            sent = time.monotonic()
            retry_after: str | None = None
            try:
                response = http.post(url, json=body, headers=headers)
                outcome = str(response.status_code)
                retry_after = response.headers.get("retry-after")
            except httpx.TimeoutException:
                outcome = TIMEOUT
            except httpx.TransportError:
                outcome = CONNECTION_ERROR
            now = time.monotonic()
            message.attempts.append(Attempt(sent, now - sent, gateway, outcome, retry_after))
            if outcome == "202":
                answer = response.json()
                message.message_id = str(answer["message_id"])
                message.said_duplicate = bool(answer.get("duplicate"))
                message.acked_at = now
                return
            if outcome not in (TIMEOUT, CONNECTION_ERROR) and int(outcome) not in _RETRY_STATUSES:
                message.rejected = outcome
                return
            stopped_at = self._stopped_at
            if stopped_at is not None and now - stopped_at > self.give_up_after:
                message.gave_up = True
                return
            time.sleep(_wait(retry_after, backoff))
            backoff = min(backoff * 2, _MAX_BACKOFF)


def _wait(retry_after: str | None, backoff: float) -> float:
    """Seconds before the next attempt: the server's Retry-After (capped), else the backoff."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), _MAX_BACKOFF)
        except ValueError:
            pass  # an HTTP date: not what our gateway sends; fall back on the backoff
    return backoff
