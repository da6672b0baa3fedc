"""The throughput bench's load generator: one asyncio loop driving many clients, each with one
message in flight (send, wait for the gateway's answer, send the next), over the gateway's
WebSocket (`/v1/ws`, token in `Sec-WebSocket-Protocol: bearer, <jwt>`) or as 100-message HTTP
batch posts. Only 127.0.0.1 gateways; every run is bounded by its duration and client count.

A client either sends as fast as its answers come back (`rate=None`, the sustained figures) or on
a schedule (`rate` messages/s over all clients, the latency and offered-load figures). A late
client sends at once but does not burst to catch up, so above capacity the offered rate is not
reached and the achieved rate says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

ANSWER_TIMEOUT = 30.0  # seconds for one answer; past it the client counts a timeout and stops
TEXT = "bench message {seq} from client {client}: lorem ipsum dolor sit amet consectetur"


@dataclass(frozen=True)
class Sample:
    """One acknowledged message."""

    chat_id: str
    message_id: int
    sent_at: float  # time.time() just before the frame or request was sent
    ack_seconds: float  # until the gateway's answer arrived


@dataclass
class LoadResult:
    """What one load run sent and got back; times from `time.time()`."""

    acked: int = 0  # messages the gateways acknowledged
    errors: Counter[str] = field(default_factory=Counter)  # answers other than ok, by code
    started: float = 0.0
    ended: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (user + system) during the load
    samples: list[Sample] = field(default_factory=list)  # when `record` was asked for

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @property
    def ack_rate(self) -> float:
        return self.acked / self.seconds


def _check_local(urls: list[str]) -> None:
    for url in urls:
        if not url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:")):
            raise ValueError(f"gateway url: only 127.0.0.1 is allowed, not {url!r}")


class _Schedule:
    """When a client's next message is due: `interval` seconds apart, first at `first`."""

    def __init__(self, first: float, interval: float | None) -> None:
        self.next_at = first
        self.interval = interval

    async def wait(self) -> None:
        if self.interval is None:
            return
        delay = self.next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # Late: send now, and schedule from now (no burst to catch up).
        self.next_at = max(self.next_at, time.monotonic()) + self.interval


async def _ws_client(
    socket: ClientConnection,
    client: int,
    chats: list[str],
    schedule: _Schedule,
    deadline: float,
    result: LoadResult,
    record: bool,
) -> None:
    seq = 0
    while True:
        await schedule.wait()
        if time.monotonic() >= deadline:
            return
        seq += 1
        chat = chats[(client + seq) % len(chats)]
        frame = json.dumps({"chat_id": chat, "text": TEXT.format(seq=seq, client=client)})
        sent_at, t0 = time.time(), time.perf_counter()
        try:
            await socket.send(frame)
            answer = json.loads(await asyncio.wait_for(socket.recv(), ANSWER_TIMEOUT))
        except TimeoutError:
            result.errors["timeout"] += 1
            return
        except Exception as exc:  # noqa: BLE001 - a closed socket ends this client, counted
            result.errors[type(exc).__name__] += 1
            return
        if not answer.get("ok"):
            result.errors[str(answer.get("error", {}).get("code", "unknown"))] += 1
            continue
        result.acked += 1
        if record:
            result.samples.append(
                Sample(chat, int(answer["message_id"]), sent_at, time.perf_counter() - t0)
            )


async def _websocket_load(
    gateways: list[str],
    token: str,
    chats: list[str],
    clients: int,
    seconds: float,
    rate: float | None,
    record: bool,
) -> LoadResult:
    result = LoadResult()
    sockets = await asyncio.gather(
        *(
            connect(
                f"{gateways[n % len(gateways)].replace('http://', 'ws://', 1)}/v1/ws",
                subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
                compression=None,  # short frames; deflate would cost both sides CPU for nothing
                open_timeout=60,
                max_queue=None,
            )
            for n in range(clients)
        )
    )
    try:
        interval = clients / rate if rate else None
        now = time.monotonic()
        deadline = now + seconds
        result.started, cpu0 = time.time(), time.process_time()
        await asyncio.gather(
            *(
                _ws_client(
                    sockets[n],
                    n,
                    chats,
                    _Schedule(now + (interval or 0) * n / clients, interval),
                    deadline,
                    result,
                    record,
                )
                for n in range(clients)
            )
        )
        result.ended, result.cpu_seconds = time.time(), time.process_time() - cpu0
    finally:
        await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
    return result


async def _batch_load(
    gateways: list[str],
    token: str,
    chats: list[str],
    clients: int,
    seconds: float,
    per_request: int,
) -> LoadResult:
    result = LoadResult()
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=ANSWER_TIMEOUT, limits=limits) as http:

        async def client(n: int) -> None:
            seq = 0
            while time.monotonic() < deadline:
                seq += 1
                chat = chats[(n + seq) % len(chats)]
                url = f"{gateways[(n + seq) % len(gateways)]}/v1/chats/{chat}/messages:batch"
                body = {
                    "messages": [
                        {"text": TEXT.format(seq=f"{seq}.{k}", client=n)}
                        for k in range(per_request)
                    ]
                }
                try:
                    response = await http.post(url, json=body, headers=headers)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                    return
                if response.status_code != 202:
                    result.errors[str(response.status_code)] += 1
                    continue
                result.acked += len(response.json()["accepted"])

        deadline = time.monotonic() + seconds
        result.started, cpu0 = time.time(), time.process_time()
        await asyncio.gather(*(client(n) for n in range(clients)))
        result.ended, result.cpu_seconds = time.time(), time.process_time() - cpu0
    return result


def websocket_load(
    gateways: list[str],
    token: str,
    chats: list[str],
    clients: int,
    seconds: float,
    rate: float | None = None,
    record: bool = False,
) -> LoadResult:
    """`clients` WebSocket clients (spread over `gateways`), each one message at a time, for
    `seconds` (connecting is not counted); at `rate` messages/s in all, or as fast as answered.
    `record`: keep a `Sample` per acknowledged message."""
    _check_local(gateways)
    return asyncio.run(_websocket_load(gateways, token, chats, clients, seconds, rate, record))


def batch_load(
    gateways: list[str],
    token: str,
    chats: list[str],
    clients: int,
    seconds: float,
    per_request: int = 100,
) -> LoadResult:
    """`clients` HTTP clients posting `per_request`-message batches, one request in flight each,
    as fast as answered, for `seconds`."""
    _check_local(gateways)
    return asyncio.run(_batch_load(gateways, token, chats, clients, seconds, per_request))
