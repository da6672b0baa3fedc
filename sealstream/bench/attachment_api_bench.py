"""The attachment APIs measured end to end (part of `sealstream bench attachments`).

Starts a gateway (`sealstream run ingest`) and a reader (`sealstream run reader`) as child
processes in a namespace of their own (keyspace, Postgres schema, Transit key, index, topics,
bucket; all removed afterwards) on the real stack, then, from this process:

- rounds (`ROUNDS`, after one warm-up round) of, side by side: the raw **put** of the file
  straight to the object store (`ObjectStore.put`, no crypto); the **upload**,
  `POST /v1/chats/{chat_id}/attachments` with the file as a raw body of `Content-Length` bytes
  (issue 14's contract); the raw **get** of that upload's object (the ciphertext the reader
  reads); the **download**, `GET /v1/chats/{chat_id}/attachments/{id}` of the whole file;
- **range first byte**: time from sending a `Range: bytes=a-b` request for 64 KiB in the middle
  of the file to the first byte of its body (median of 20): authentication, the chat and
  attachment lookups, the header and one segment fetched and decrypted.

The client is a plain socket (no HTTP library), so the client's CPU takes as little of the
machine's two cores as possible: the figures are the services'. MB = 10^6 bytes.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.attachments import object_key
from sealstream.auth import mint_token
from sealstream.bench.pipeline_bench import isolated
from sealstream.migrate import migrate_all
from sealstream.services import settings_env, spawn, stop, wait_ready
from sealstream.settings import Settings, StackSettings
from sealstream.wiring import key_service

USER = "bench"
RANGE_BYTES = 64 * 1024
_SEND_BLOCK = 1024 * 1024


class _Http:
    """One request per connection on a raw socket: just enough HTTP/1.1 for these figures."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token

    def _connect(self, method: str, path: str, headers: dict[str, str]) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines.append(f"Authorization: Bearer {self.token}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return sock

    @staticmethod
    def _head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        received = b""
        while b"\r\n\r\n" not in received:
            more = sock.recv(65536)
            if not more:
                raise RuntimeError("connection closed before the response head")
            received += more
        head, rest = received.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
        return int(status_line.split()[1]), headers, rest

    def upload(
        self, path: str, body: Iterator[bytes], size: int, media_type: str
    ) -> tuple[int, bytes]:
        """POST `size` bytes; returns the status and the response body."""
        headers = {"Content-Type": media_type, "Content-Length": str(size)}
        with self._connect("POST", path, headers) as sock:
            for piece in body:
                sock.sendall(piece)
            status, _headers, answer = self._head(sock)
            while more := sock.recv(65536):
                answer += more
            return status, answer

    def download(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, int]:
        """GET `path`; returns (status, body bytes received), the body read into one buffer."""
        with self._connect("GET", path, headers or {}) as sock:
            status, answer, rest = self._head(sock)
            expected = int(answer.get("content-length", "0"))
            buffer = bytearray(_SEND_BLOCK)
            got = len(rest)
            while got < expected:
                n = sock.recv_into(buffer)
                if n == 0:
                    raise RuntimeError(f"body cut short: {got} of {expected} bytes")
                got += n
            return status, got

    def first_byte_seconds(self, path: str, headers: dict[str, str]) -> float:
        """Seconds from sending the request to the first byte of the body."""
        started = time.perf_counter()
        with self._connect("GET", path, headers) as sock:
            status, _answer, rest = self._head(sock)
            if not rest:
                rest = sock.recv(1)
            elapsed = time.perf_counter() - started
            if status != 206 or not rest:
                raise RuntimeError(f"range read answered {status}")
            while sock.recv(65536):
                pass
            return elapsed


def _drop(cfg: Settings, object_keys: list[str]) -> None:
    kafka = cfg.kafka
    delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])
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
    objects = ObjectStore(cfg.object_store)
    try:
        for key in object_keys:
            objects.delete(key)
        objects.abort_incomplete(timedelta(0), now=datetime.now(UTC) + timedelta(days=1))
        objects.delete_empty_bucket()
    finally:
        objects.close()


def run(chunk: bytes, size: int, base: Settings | None = None) -> dict[str, float]:
    """Upload, download and range-read one file of `size` bytes (the concatenation of `chunk`)
    through the services; returns `upload_mb_s` (absent without the upload route),
    `download_mb_s` and `api_range_first_byte_ms` (median of 20)."""
    run_id = secrets.token_hex(3)
    cfg = isolated(base or Settings(), run_id, prefix="attbench")
    cfg = cfg.model_copy(
        update={
            "object_store": cfg.object_store.model_copy(
                update={"bucket": f"sealstream-attbench-{run_id}"}
            ),
            "attachments": cfg.attachments.model_copy(update={"max_bytes": max(size, 1)}),
        }
    )
    migrate_all(cfg)
    children: list[subprocess.Popen[bytes]] = []
    object_keys: list[str] = []
    try:
        env = {**os.environ, **settings_env(cfg)}
        logs = Path(tempfile.mkdtemp(prefix="sealstream-attachments-bench-"))
        for name in ("ingest", "reader"):
            children.append(spawn(name, env, log=logs / f"{name}.log"))
        gateway = f"http://127.0.0.1:{cfg.ingest.port}"
        reader = f"http://127.0.0.1:{cfg.reader.port}"
        wait_ready({"ingest": gateway, "reader": reader})
        return _measure(cfg, chunk, size, object_keys, reader_pid=children[1].pid)
    finally:
        stop(children)
        _drop(cfg, object_keys)


def _stream(chunk: bytes, size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        piece = chunk[: size - sent]
        sent += len(piece)
        yield piece


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux /proc); 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _store_pid() -> int | None:
    """The local object store's process (`sealstream stack up` writes its pid file)."""
    try:
        return int((StackSettings().dir / "s3proxy" / "server.pid").read_text().strip())
    except (OSError, ValueError):
        return None


class _CpuMeter:
    """CPU seconds per GB moved, by process: the reader, the object store, this client."""

    def __init__(self, reader_pid: int | None, store_pid: int | None) -> None:
        self.pids = {"reader": reader_pid, "store": store_pid}
        self.spent: dict[str, float] = dict.fromkeys(("reader", "store", "client"), 0.0)
        self.bytes = 0

    def snapshot(self) -> dict[str, float]:
        now = {name: _cpu_seconds(pid) for name, pid in self.pids.items()}
        times = os.times()
        now["client"] = times.user + times.system
        return now

    def add(self, before: dict[str, float], moved: int) -> None:
        after = self.snapshot()
        for name in self.spent:
            self.spent[name] += after[name] - before[name]
        self.bytes += moved

    def per_gb(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_cpu_s_per_gb_{k}": v / self.bytes * 1e9 for k, v in self.spent.items()}


ROUNDS = 5
"""Rounds of (raw put, upload, raw get, download): each figure is the median of its rounds, each
ratio the median of the rounds' ratios, so a burst of load on the shared cores during one
100 ms transfer moves neither."""


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def _measure(
    cfg: Settings, chunk: bytes, size: int, object_keys: list[str], reader_pid: int | None = None
) -> dict[str, float]:
    token = mint_token(cfg.auth, USER)
    chat_id = uuid.uuid4()
    db = Database(cfg.postgres)
    db.open()
    try:
        with key_service(cfg, db) as keys:
            keys.create_chat(chat_id, (USER,))
    finally:
        db.close()
    store = ObjectStore(cfg.object_store)
    uploads = _Http(cfg.ingest.port, token)
    downloads = _Http(cfg.reader.port, token)
    rounds: dict[str, list[float]] = {name: [] for name in ("put", "upload", "get", "download")}
    # Where the CPU goes (the profile of the download figure): seconds per GB of each process
    # during the raw gets and during the downloads.
    store_pid = _store_pid()
    get_cpu, download_cpu = _CpuMeter(None, store_pid), _CpuMeter(reader_pid, store_pid)
    path = ""
    try:
        for number in range(ROUNDS + 1):  # round 0 warms up (connections, caches, the DEK)
            raw_key = f"bench/raw-{number}"
            object_keys.append(raw_key)
            start = time.perf_counter()
            store.put(raw_key, _stream(chunk, size))
            put_seconds = time.perf_counter() - start
            start = time.perf_counter()
            status, answer = uploads.upload(
                f"/v1/chats/{chat_id}/attachments",
                _stream(chunk, size),
                size,
                "application/octet-stream",
            )
            upload_seconds = time.perf_counter() - start
            if status != 201:
                raise RuntimeError(f"upload answered {status}: {answer[:300]!r}")
            file_id = int(json.loads(answer)["attachment_id"])
            object_keys.append(object_key(chat_id, file_id))
            # The raw get reads the very object the reader then fetches and decrypts.
            cpu = get_cpu.snapshot()
            start = time.perf_counter()
            got = sum(len(piece) for piece in store.get(object_key(chat_id, file_id)))
            get_seconds = time.perf_counter() - start
            if number:
                get_cpu.add(cpu, got)
            path = f"/v1/chats/{chat_id}/attachments/{file_id}"
            cpu = download_cpu.snapshot()
            start = time.perf_counter()
            status, body = downloads.download(path)
            download_seconds = time.perf_counter() - start
            if number:
                download_cpu.add(cpu, body)
            if status != 200 or body != size:
                raise RuntimeError(f"download answered {status} with {body} of {size} bytes")
            if number == 0:
                continue
            rounds["put"].append(_rate(size, put_seconds))
            rounds["upload"].append(_rate(size, upload_seconds))
            rounds["get"].append(_rate(got, get_seconds))
            rounds["download"].append(_rate(size, download_seconds))
    finally:
        store.close()
    median = statistics.median
    figures = {
        "store_put_mb_s": median(rounds["put"]),
        "upload_mb_s": median(rounds["upload"]),
        "upload_vs_store_put": median(
            u / p for u, p in zip(rounds["upload"], rounds["put"], strict=True)
        ),
        "store_get_mb_s": median(rounds["get"]),
        "download_mb_s": median(rounds["download"]),
        "download_vs_store_get": median(
            d / g for d, g in zip(rounds["download"], rounds["get"], strict=True)
        ),
        "rounds": float(ROUNDS),
    }
    figures |= get_cpu.per_gb("get") | download_cpu.per_gb("download")
    del figures["get_cpu_s_per_gb_reader"]  # no reader in a raw get
    for name, values in rounds.items():
        figures[f"{name}_mb_s_min"] = min(values)
        figures[f"{name}_mb_s_max"] = max(values)
    middle = size // 2
    wanted = {"Range": f"bytes={middle}-{middle + RANGE_BYTES - 1}"}
    firsts = [downloads.first_byte_seconds(path, wanted) for _ in range(20)]
    figures["api_range_first_byte_ms"] = statistics.median(firsts) * 1000
    return figures
