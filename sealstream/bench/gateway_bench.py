"""Gateway benchmark: what one gateway process costs per request (`sealstream bench gateway`).

Starts one gateway (`sealstream run ingest`) as a child process in its own namespace (topics,
Postgres schema, Transit key; removed afterwards) on the real stack and drives it from this
process with asyncio: a minimal keep-alive HTTP/1.1 client (cheaper than httpx, so the load
generator takes less of the two cores) and `websockets` clients. The gateway's CPU is read from
`/proc/<pid>/stat` (all its threads) before and after each measured window, the load generator's
from `time.process_time()`, and the machine's from `/proc/stat`, so a reader sees who used the
cores. Prints nothing itself; the CLI prints the figures (docs/benchmarks.md, "Gateway").

Figures (per phase: requests/s, p50/p99 latency, gateway CPU ms per request, load-generator CPU
ms per request):

* `idle`: the gateway's own background CPU (Kafka poll thread, lease renewal), ms per second.
* `healthz`: `GET /healthz` over 16 keep-alive connections (the framework's own cost).
* `post`: single-message `POST /v1/chats/{id}/messages` over 16 connections, no client id.
* `post_cid`: the same with a fresh `client_message_id` each (an idempotency claim each).
* `ws16`, `ws200`: 16 / 200 WebSocket clients, each sending one frame and awaiting its ack
  before the next (post -> ack latency).
* `ws200_at2000`: 200 clients offering 2,000 messages/s in all (one frame every 0.1 s each,
  still one at a time): with clients sending as fast as acks come, Little's law ties p50 to the
  throughput (200 clients / 4,000 per s = 50 ms), so the latency target is read at this load.
* `ws200_cid`: 200 clients whose frames carry a fresh `client_message_id` each.

Each phase also splits the gateway's CPU by thread: `loop` (the main thread), `kafka` (librdkafka's
threads) and `other` (worker threads, the Kafka poll thread, lease renewal).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.typing import Subprotocol

from sealstream.adapters.kafka import delete_topics, ensure_topics
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.vault import TransitKms
from sealstream.auth import mint_token
from sealstream.bench.pipeline_bench import isolated
from sealstream.services import settings_env, spawn, stop, wait_ready
from sealstream.settings import Settings

CONNECTIONS = 16
WS_CLIENTS = 200
CHATS = 50
USER = "bench"


def _pid_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (children not included)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _thread_cpu_seconds(pid: int) -> dict[str, tuple[str, float]]:
    """CPU seconds of each live thread of the process, by thread id: (kind, seconds). Kinds:
    `loop` (the main thread: event loop and request handling), `kafka` (librdkafka's own
    threads, `rdk:*`), `other` (worker threads, Kafka poll thread, lease renewal, ...)."""
    threads: dict[str, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as stat:
                raw = stat.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        kind = "loop" if tid == str(pid) else "kafka" if name.startswith("rdk:") else "other"
        threads[tid] = (kind, seconds)
    return threads


def _cpu_by_kind(
    before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]], total: float
) -> dict[str, float]:
    """CPU seconds by kind between two `_thread_cpu_seconds` samples of a process whose CPU
    grew by `total` meanwhile. Each thread alive at the end counts from its first sample (a
    thread started meanwhile from zero); `other` is the rest of `total`, which also holds what
    threads that ended meanwhile (idle worker threads do) used. Summing each sample by kind
    and subtracting instead made `other` negative when a worker thread ended in the window."""
    kinds = {"loop": 0.0, "kafka": 0.0}
    for tid, (kind, seconds) in after.items():
        if kind in kinds:
            kinds[kind] += seconds - before.get(tid, (kind, 0.0))[1]
    return {**kinds, "other": max(0.0, total - kinds["loop"] - kinds["kafka"])}


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


@dataclass
class _Window:
    """Counters of one measured window (the load runs before and after it, unmeasured)."""

    open: bool = False
    done: int = 0
    latencies: list[float] = field(default_factory=list)

    def record(self, started: float) -> None:
        if self.open:
            self.done += 1
            self.latencies.append(time.perf_counter() - started)


Client = Callable[[_Window, Callable[[], bool]], Coroutine[Any, Any, None]]


async def _measure(
    pid: int, clients: list[Client], warmup: float, seconds: float
) -> dict[str, float]:
    """Run every client until the end; measure the window [warmup, warmup + seconds)."""
    window = _Window()
    stopping = False
    tasks = [asyncio.create_task(client(window, lambda: stopping)) for client in clients]
    await asyncio.sleep(warmup)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    threads0, gateway0 = _thread_cpu_seconds(pid), _pid_cpu_seconds(pid)
    load0, (busy0, total0) = time.process_time(), _machine_busy()
    started = time.perf_counter()
    window.open = True
    await asyncio.sleep(seconds)
    window.open = False
    elapsed = time.perf_counter() - started
    load1, (busy1, total1) = time.process_time(), _machine_busy()
    threads1, gateway1 = _thread_cpu_seconds(pid), _pid_cpu_seconds(pid)
    by_kind = _cpu_by_kind(threads0, threads1, gateway1 - gateway0)
    stopping = True
    await asyncio.gather(*tasks)
    done = max(1, window.done)
    ordered = sorted(window.latencies) or [0.0]
    return {
        "per_s": window.done / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        "gateway_cpu_ms": 1000 * (gateway1 - gateway0) / done,
        "gateway_cores": (gateway1 - gateway0) / elapsed,
        # Where the gateway's CPU went (ms per request): see _thread_cpu_seconds.
        **{f"gateway_{kind}_cpu_ms": 1000 * seconds / done for kind, seconds in by_kind.items()},
        "loadgen_cpu_ms": 1000 * (load1 - load0) / done,
        "loadgen_cores": (load1 - load0) / elapsed,
        # Cores busy on the whole machine (of os.cpu_count()): the gateway, this process,
        # the servers and whatever else ran meanwhile.
        "machine_busy_cores": (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1),
    }


def _http_client(host: str, port: int, request: Callable[[int], bytes], expect: int) -> Client:
    """A keep-alive HTTP/1.1 client sending `request(n)` and awaiting each answer in turn."""

    async def run(window: _Window, stopping: Callable[[], bool]) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        n = 0
        try:
            while not stopping():
                n += 1
                started = time.perf_counter()
                writer.write(request(n))
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if status != expect:
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
                window.record(started)
        finally:
            writer.close()

    return run


def _ws_client(
    url: str, token: str, chat: str, client_ids: bool, tag: str, interval: float | None = None
) -> Client:
    """A WebSocket client sending one frame at a time and awaiting its ack (post -> ack): as
    fast as the acks come, or one frame every `interval` seconds (from a random phase) while
    the acks keep up with that."""

    async def run(window: _Window, stopping: Callable[[], bool]) -> None:
        next_at = time.perf_counter() + (interval or 0) * secrets.randbelow(1000) / 1000
        offered = [Subprotocol("bearer"), Subprotocol(token)]
        async with websockets.connect(
            url, subprotocols=offered, max_queue=None, compression=None
        ) as socket:
            n = 0
            while not stopping():
                if interval is not None:
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at += interval
                n += 1
                frame: dict[str, str] = {"chat_id": chat, "text": f"message {n} from {tag}"}
                if client_ids:
                    frame["client_message_id"] = f"{tag}-{n}"
                started = time.perf_counter()
                await socket.send(json.dumps(frame))
                reply = json.loads(await socket.recv())
                if not reply.get("ok"):
                    raise RuntimeError(f"frame refused: {reply}")
                window.record(started)

    return run


def _post_request(
    host: str, token: str, chats: list[str], client_ids: bool, tag: str
) -> Callable[[int], bytes]:
    def request(n: int) -> bytes:
        body: dict[str, str] = {"text": f"single post number {n} with a few words"}
        if client_ids:
            body["client_message_id"] = f"{tag}-{n}"
        data = json.dumps(body).encode()
        return (
            f"POST /v1/chats/{chats[n % len(chats)]}/messages HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data

    return request


def _prepare(cfg: Settings) -> None:
    """What one gateway needs: its Postgres schema, the tenant's Transit key, the topics."""
    db = Database(cfg.postgres)
    db.open()
    try:
        db.migrate()
        TransitKms(cfg.vault).ensure_key(cfg.vault.default_key)
        ChatKeyRepository(db).upsert_tenant(cfg.keys.default_tenant, cfg.vault.default_key)
    finally:
        db.close()
    ensure_topics(cfg.kafka)


def _drop(cfg: Settings) -> None:
    delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])
    db = Database(cfg.postgres)
    db.open()
    try:
        db.drop_schema()
    finally:
        db.close()
    TransitKms(cfg.vault).delete_key(cfg.vault.default_key)


def run(
    seconds: float = 8.0, warmup: float = 2.0, settings: Settings | None = None
) -> dict[str, float]:
    """Start a gateway, measure every phase, stop it and remove its namespace."""
    cfg = isolated(settings or Settings(), secrets.token_hex(3), prefix="gwbench")
    _prepare(cfg)
    child: subprocess.Popen[bytes] | None = None
    try:
        child = spawn("ingest", {**os.environ, **settings_env(cfg)})
        base = f"http://{cfg.ingest.host}:{cfg.ingest.port}"
        wait_ready({"ingest": base})
        return asyncio.run(_phases(cfg, child.pid, seconds, warmup))
    finally:
        if child is not None:
            stop([child])
        _drop(cfg)


async def _phases(cfg: Settings, pid: int, seconds: float, warmup: float) -> dict[str, float]:
    host, port = cfg.ingest.host, cfg.ingest.port
    token = mint_token(cfg.auth, USER)
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as http:
        chats = [
            http.post(
                "/v1/chats",
                json={"participants": ["reader"]},
                headers={"Authorization": f"Bearer {token}"},
            ).json()["chat_id"]
            for _ in range(CHATS)
        ]
    figures: dict[str, float] = {}
    cpu0 = _pid_cpu_seconds(pid)
    await asyncio.sleep(3.0)
    figures["idle_gateway_cpu_ms_per_s"] = 1000 * (_pid_cpu_seconds(pid) - cpu0) / 3.0

    healthz = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    ws_url = f"ws://{host}:{port}/v1/ws"
    run_tag = secrets.token_hex(3)
    phases: dict[str, list[Client]] = {
        "healthz": [_http_client(host, port, lambda _n: healthz, 200)] * CONNECTIONS,
        "post": [
            _http_client(host, port, _post_request(host, token, chats, False, f"p{i}"), 202)
            for i in range(CONNECTIONS)
        ],
        "post_cid": [
            _http_client(
                host, port, _post_request(host, token, chats, True, f"{run_tag}-c{i}"), 202
            )
            for i in range(CONNECTIONS)
        ],
        "ws16": [_ws_client(ws_url, token, chats[i % CHATS], False, f"w{i}") for i in range(16)],
        "ws200": [
            _ws_client(ws_url, token, chats[i % CHATS], False, f"W{i}") for i in range(WS_CLIENTS)
        ],
        # The target's load: 200 clients, 2,000 messages/s offered (one every 0.1 s each).
        "ws200_at2000": [
            _ws_client(ws_url, token, chats[i % CHATS], False, f"R{i}", WS_CLIENTS / 2000)
            for i in range(WS_CLIENTS)
        ],
        "ws200_cid": [
            _ws_client(ws_url, token, chats[i % CHATS], True, f"{run_tag}-s{i}")
            for i in range(WS_CLIENTS)
        ],
    }
    for name, clients in phases.items():
        for key, value in (await _measure(pid, clients, warmup, seconds)).items():
            figures[f"{name}_{key}"] = value
    figures["post_over_healthz_cpu"] = (
        figures["post_gateway_cpu_ms"] / figures["healthz_gateway_cpu_ms"]
    )
    figures["post_cid_over_healthz_cpu"] = (
        figures["post_cid_gateway_cpu_ms"] / figures["healthz_gateway_cpu_ms"]
    )
    figures["cpu_count"] = float(os.cpu_count() or 1)
    figures["loadavg_1min"] = os.getloadavg()[0]
    return figures


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<40} {value:,.3f}")
