"""Live delivery benchmark (`sealstream bench delivery`): what one delivery process holds per
connected client, and how long a post takes to reach another client.

Starts a gateway, an encryptor and one delivery process (`sealstream run ...`) as child processes
in a namespace of their own (topics, keyspace, schema, Redis prefix, Transit key, index; removed
afterwards) on the real stack, and drives them from this process with asyncio `websockets`:

* **idle clients**: `clients` WebSocket connections to delivery, each subscribed to one chat
  (chats of up to 500 participants that get no posts). The delivery process's resident memory
  (`/proc/<pid>/status` VmRSS) is read before the first and after the last subscription was
  acknowledged (and a settling second); `rss_per_client_kib` = delta / clients.
* **post -> delivery**: `senders` WebSocket clients post to the gateway (`/v1/ws`) at `rate`
  messages/s in all, paced, spread over `hot_chats` chats, for `seconds`; one receiving client,
  subscribed to every hot chat on the same delivery process (the idle clients stay connected),
  notes when each message's `message` frame arrives. Latency = arrival - the moment the post
  was sent (both on this machine's monotonic clock); p50 / p99 / max over every message, and
  how many arrived. For where the time goes: post -> gateway ack (every message) and post ->
  written to Cassandra (the encryptor's write timestamp, a sample of 500). The default rate (700 msg/s) is half the end-to-end WebSocket rate of
  docs/benchmarks.md ("Throughput": 1,337-1,603 msg/s sustained on this machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.auth import mint_token
from sealstream.bench.pipeline_bench import _free_port, isolated
from sealstream.migrate import migrate_all
from sealstream.services import settings_env, spawn, stop, wait_ready
from sealstream.settings import DeliveryHttp, HttpLimits, Settings

POSTER = "poster"
RECEIVER = "receiver"
PER_IDLE_CHAT = 500  # participants of each idle chat (the gateway allows 1,000)
CONNECT_CONCURRENCY = 50  # idle connections opened at once


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _settings(base: Settings, run: str, clients: int) -> Settings:
    cfg = isolated(base, run, prefix="dlbench")
    return cfg.model_copy(
        update={
            "kafka": cfg.kafka.model_copy(update={"changes_topic": f"dlbench.{run}.changes"}),
            "delivery": DeliveryHttp(
                port=_free_port(), limits=HttpLimits(max_connections=clients + 100)
            ),
        }
    )


def _drop(cfg: Settings) -> None:
    kafka = cfg.kafka
    delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic, kafka.changes_topic])
    store = MessageStore(cfg.cassandra)
    store.connect()
    try:
        store.drop_keyspace()
    finally:
        store.close()
    index = SearchIndex(cfg.opensearch)
    try:
        index.drop()
    finally:
        index.close()
    db = Database(cfg.postgres)
    db.open()
    try:
        db.drop_schema()
    finally:
        db.close()
    TransitKms(cfg.vault).delete_key(cfg.vault.default_key)


def run(
    clients: int = 2_000,
    rate: float = 700.0,
    seconds: float = 15.0,
    hot_chats: int = 20,
    senders: int = 20,
    settings: Settings | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Start the services, measure both phases, stop them and remove the namespace."""
    cfg = _settings(settings or Settings(), secrets.token_hex(3), clients)
    migrate_all(cfg)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        env = {**os.environ, **settings_env(cfg)}
        logs = Path(tempfile.mkdtemp(prefix="sealstream-delivery-bench-"))
        for name in ("ingest", "encryptor", "delivery"):
            children[name] = spawn(name, env, log=logs / f"{name}.log")
        log(f"services started (logs in {logs}/)")
        wait_ready(
            {
                "ingest": f"http://127.0.0.1:{cfg.ingest.port}",
                "encryptor": f"http://127.0.0.1:{cfg.encryptor_http.port}",
                "delivery": f"http://127.0.0.1:{cfg.delivery.port}",
            }
        )
        return asyncio.run(
            _phases(cfg, children["delivery"].pid, clients, rate, seconds, hot_chats, senders, log)
        )
    finally:
        stop(list(children.values()))
        _drop(cfg)


def _create_chats(cfg: Settings, count: int, members: Callable[[int], list[str]]) -> list[str]:
    token = mint_token(cfg.auth, POSTER)
    with httpx.Client(base_url=f"http://127.0.0.1:{cfg.ingest.port}", timeout=60) as http:
        return [
            http.post(
                "/v1/chats",
                json={"participants": members(i)},
                headers={"Authorization": f"Bearer {token}"},
            ).json()["chat_id"]
            for i in range(count)
        ]


async def _subscribe(url: str, token: str, chats: list[str]) -> Any:
    ws = await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60
    )
    for chat in chats:
        await ws.send(json.dumps({"type": "subscribe", "chat_id": chat}))
    acknowledged = 0
    while acknowledged < len(chats):
        frame = json.loads(await ws.recv())
        if frame["type"] != "subscribed":
            raise RuntimeError(f"subscription refused: {frame}")
        acknowledged += 1
    return ws


async def _phases(
    cfg: Settings,
    pid: int,
    clients: int,
    rate: float,
    seconds: float,
    hot_chats: int,
    senders: int,
    log: Callable[[str], None],
) -> dict[str, float]:
    url = f"ws://127.0.0.1:{cfg.delivery.port}/v1/stream"
    idle_chats = _create_chats(
        cfg,
        -(-clients // PER_IDLE_CHAT),
        lambda i: [f"idle-{i * PER_IDLE_CHAT + j}" for j in range(PER_IDLE_CHAT)],
    )
    hot = _create_chats(cfg, hot_chats, lambda i: [RECEIVER])
    figures: dict[str, float] = {}

    # --- idle clients: memory per connection ---
    await asyncio.sleep(1.0)
    rss0 = _rss_kib(pid)
    started = time.monotonic()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def idle(n: int) -> Any:
        async with gate:
            user = f"idle-{n}"
            return await _subscribe(
                url, mint_token(cfg.auth, user), [idle_chats[n // PER_IDLE_CHAT]]
            )

    sockets = await asyncio.gather(*(idle(n) for n in range(clients)))
    connect_s = time.monotonic() - started
    await asyncio.sleep(1.0)
    rss1 = _rss_kib(pid)
    figures["idle_clients"] = float(clients)
    figures["idle_connect_s"] = connect_s
    figures["delivery_rss_before_mib"] = rss0 / 1024
    figures["delivery_rss_after_mib"] = rss1 / 1024
    figures["rss_per_client_kib"] = (rss1 - rss0) / clients
    log(f"{clients} idle clients subscribed in {connect_s:.1f}s; RSS {rss0} -> {rss1} KiB")

    # --- post -> delivery on another client ---
    receiver = await _subscribe(url, mint_token(cfg.auth, RECEIVER), hot)
    sent: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    acked: dict[str, tuple[float, str, str]] = {}  # text -> (monotonic, chat id, message id)
    arrived: dict[str, float] = {}
    total = max(1, int(rate * seconds))

    async def receive() -> None:
        while len(arrived) < total:
            frame = json.loads(await receiver.recv())
            if frame.get("type") == "message":
                arrived[frame["text"]] = time.monotonic()

    async def send(k: int) -> None:
        token = mint_token(cfg.auth, POSTER)
        async with websockets.connect(
            f"ws://127.0.0.1:{cfg.ingest.port}/v1/ws",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=60,
        ) as ws:
            mine = list(range(k, total, senders))
            acks = asyncio.create_task(_drain(ws, [f"bench {n}" for n in mine], acked))
            interval = senders / rate
            t0 = time.monotonic() + k * interval / senders
            for i, n in enumerate(mine):
                await asyncio.sleep(max(0.0, t0 + i * interval - time.monotonic()))
                text = f"bench {n}"
                sent[text] = time.monotonic()
                sent_wall[text] = time.time()
                await ws.send(json.dumps({"chat_id": hot[n % len(hot)], "text": text}))
            await acks

    receiving = asyncio.create_task(receive())
    started = time.monotonic()
    await asyncio.gather(*(send(k) for k in range(senders)))
    offered_s = time.monotonic() - started
    try:
        await asyncio.wait_for(receiving, 30.0)
    except TimeoutError:
        pass
    latencies = [(arrived[t] - sent[t]) * 1000 for t in arrived if t in sent]
    figures["offered_msgs_per_s"] = total / offered_s
    figures["posted"] = float(total)
    figures["delivered"] = float(len(latencies))
    if latencies:
        figures["post_to_delivery_p50_ms"] = _pct(latencies, 0.50)
        figures["post_to_delivery_p99_ms"] = _pct(latencies, 0.99)
        figures["post_to_delivery_max_ms"] = max(latencies)
    to_ack = [(acked[t][0] - sent[t]) * 1000 for t in acked]
    if to_ack:
        figures["post_to_ack_p50_ms"] = _pct(to_ack, 0.50)
        figures["post_to_ack_p99_ms"] = _pct(to_ack, 0.99)
    written = await asyncio.to_thread(_written_ms, cfg, acked, sent_wall)
    if written:
        figures["post_to_written_p50_ms"] = _pct(written, 0.50)
        figures["post_to_written_p99_ms"] = _pct(written, 0.99)
    figures["delivery_rss_end_mib"] = _rss_kib(pid) / 1024
    await receiver.close()
    await asyncio.gather(*(ws.close() for ws in sockets))
    return figures


async def _drain(ws: Any, texts: list[str], acked: dict[str, tuple[float, str, str]]) -> None:
    """Read one sender's acks (they come in the order of its posts)."""
    for text in texts:
        ack = json.loads(await ws.recv())
        if not ack.get("ok"):
            raise RuntimeError(f"post refused: {ack.get('error')}")
        acked[text] = (time.monotonic(), ack["chat_id"], ack["message_id"])


def _written_ms(
    cfg: Settings, acked: dict[str, tuple[float, str, str]], sent_wall: dict[str, float]
) -> list[float]:
    """Post -> written to Cassandra (the encryptor's write timestamp, wall clock) for a sample of
    at most 500 messages: where delivery's latency starts."""
    store = MessageStore(cfg.cassandra)
    store.connect()
    try:
        found = []
        for text in sorted(acked)[:: max(1, len(acked) // 500)]:
            _, chat_id, message_id = acked[text]
            at = store.written_at(uuid.UUID(chat_id), int(message_id))
            if at is not None:
                found.append((at - sent_wall[text]) * 1000)
        return found
    finally:
        store.close()


if __name__ == "__main__":
    import sys

    for name, value in run(clients=int(sys.argv[1]) if len(sys.argv) > 1 else 2_000).items():
        print(f"{name:<28} {value:,.3f}")
