"""Message ids stay unique across gateway processes (issue 9, item 1).

Three gateways started with no configured worker id, as autoscaled replicas behind a load
balancer would be, post concurrently into one chat; every acknowledged message must have an id
of its own and read back with its text. Before worker ids were leased all three used worker id 0
and messages that drew the same id overwrote each other in Cassandra.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx

from schemas.ids import SEQUENCE_BITS, WORKER_BITS
from sealstream.services import spawn
from tests.e2e.conftest import Pipeline, free_port
from tests.e2e.test_pipeline import create_chat, history, wait_until

GATEWAYS = 3
PER_GATEWAY = 1_000
BATCH = 100


def worker_bits(message_id: str) -> int:
    return (int(message_id) >> SEQUENCE_BITS) & ((1 << WORKER_BITS) - 1)


def unconfigured_env(pipeline: Pipeline, port: int) -> dict[str, str]:
    """The pipeline's environment for one more gateway: its own port, no SEALSTREAM_WORKER_ID."""
    env = {k: v for k, v in pipeline.env.items() if k != "SEALSTREAM_WORKER_ID"}
    return {**env, "SEALSTREAM_INGEST__PORT": str(port)}


def start_gateways(pipeline: Pipeline, n: int, logs: Path | None = None) -> dict[str, str]:
    """Start `n` extra gateways (logging to `logs`/<key>.log if given); returns their process
    key -> base URL once all are ready."""
    urls: dict[str, str] = {}
    for i in range(n):
        port = free_port()
        key = f"ingest-replica-{i}"
        log = logs / f"{key}.log" if logs is not None else None
        pipeline.procs[key] = spawn("ingest", unconfigured_env(pipeline, port), log=log)
        urls[key] = f"http://127.0.0.1:{port}"
    for url in urls.values():
        pipeline.wait_http(url, timeout=120)
    return urls


def leased_line(log: Path) -> dict[str, Any]:
    """The start-up log line that names the leased worker id ({} if none)."""
    for line in log.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("msg") == "worker id leased":
            return dict(entry)
    return {}


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not on {url}/metrics"
    return float(found.group(1))


def test_three_unconfigured_gateways_never_share_an_id(pipeline: Pipeline, database: Any) -> None:
    urls = start_gateways(pipeline, GATEWAYS)
    try:
        chat = create_chat(pipeline, "olga", ["petra"])
        posted: dict[str, list[tuple[str, str]]] = {key: [] for key in urls}
        failures: list[str] = []
        start = threading.Barrier(GATEWAYS)

        def post_all(key: str, url: str) -> None:
            with httpx.Client(headers=pipeline.token("olga"), timeout=60) as client:
                start.wait()
                for first in range(0, PER_GATEWAY, BATCH):
                    texts = [f"{key} message {i} — ünïcödé" for i in range(first, first + BATCH)]
                    response = client.post(
                        f"{url}/v1/chats/{chat}/messages:batch",
                        json={"messages": [{"text": t} for t in texts]},
                    )
                    if response.status_code != 202:
                        failures.append(f"{key}: {response.status_code} {response.text}")
                        return
                    ids = [a["message_id"] for a in response.json()["accepted"]]
                    posted[key].extend(zip(ids, texts, strict=True))

        threads = [threading.Thread(target=post_all, args=item) for item in urls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        acknowledged = [pair for pairs in posted.values() for pair in pairs]
        assert len(acknowledged) == GATEWAYS * PER_GATEWAY

        ids = [message_id for message_id, _ in acknowledged]
        shared = len(ids) - len(set(ids))
        assert shared == 0, f"{shared} acknowledged messages got an id another one also got"

        # Each gateway made its ids under one worker id of its own, the one its /metrics shows.
        workers = {key: {worker_bits(m) for m, _ in pairs} for key, pairs in posted.items()}
        assert all(len(bits) == 1 for bits in workers.values()), workers
        assert len(set.union(*workers.values())) == GATEWAYS, workers
        for key, url in urls.items():
            assert metric(url, "sealstream_worker_id") == next(iter(workers[key]))
            assert metric(url, "sealstream_worker_lease_valid") == 1.0

        # Every acknowledged message reads back, with its own text.
        wait_until(
            lambda: len(history(pipeline, "petra", chat)) >= len(acknowledged),
            timeout=300,
            what="every acknowledged message readable",
        )
        read = {m["message_id"]: m["text"] for m in history(pipeline, "petra", chat)}
        assert read == dict(acknowledged)
    finally:
        for key in urls:
            if key in pipeline.procs:
                pipeline.signal(key, signal.SIGTERM)

    # A graceful stop frees the ids at once (no waiting out the TTL).
    with database.connection() as conn:
        rows = conn.execute(
            "SELECT worker_id, holder FROM worker_leases WHERE worker_id = ANY(%s)",
            ([next(iter(bits)) for bits in workers.values()],),
        ).fetchall()
    assert len(rows) == GATEWAYS and all(row["holder"] is None for row in rows), rows


def test_gateway_refuses_to_start_with_a_configured_id_another_holds(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    [(key, url)] = start_gateways(pipeline, 1, logs=tmp_path).items()
    try:
        held = int(metric(url, "sealstream_worker_id"))
        assert leased_line(tmp_path / f"{key}.log").get("worker_id") == held
        log = tmp_path / "clash.log"
        env = {**unconfigured_env(pipeline, free_port()), "SEALSTREAM_WORKER_ID": str(held)}
        clash = spawn("ingest", env, log=log)
        try:
            code = clash.wait(120)
        except subprocess.TimeoutExpired:
            clash.kill()
            clash.wait()
            raise AssertionError("a gateway with a worker id held by another one started") from None
        assert code != 0
        out = log.read_text()
        assert f"worker id {held} (SEALSTREAM_WORKER_ID) is leased by ingest pid" in out, out
        # The holder was not disturbed.
        assert metric(url, "sealstream_worker_id") == held
        assert metric(url, "sealstream_worker_lease_valid") == 1.0
    finally:
        pipeline.signal(key, signal.SIGTERM)
