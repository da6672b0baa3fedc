"""End-to-end pipeline benchmark: the four services as processes on the real stack, real HTTP.

Runs in its own namespace (topics, groups, keyspace, index, schema, Redis prefix, Transit key) and
removes it afterwards. Prints nothing itself; `sealstream bench pipeline` prints the figures.
Figures (docs/benchmarks.md): gateway throughput for single and batched posts, sustained end-to-end
throughput (first post to last row written), the same with sealed Kafka records beside plaintext
ones in alternating rounds (`compare_*`, `sealed_*_throughput_loss_pct`), post-to-readable latency
at about half that rate, reader latency (one message, a 50-message page), KMS calls, and where the
encryptor's time goes.
"""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import httpx

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import Database
from sealstream.adapters.vault import TransitKms
from sealstream.auth import mint_token
from sealstream.migrate import migrate_all
from sealstream.services import service_urls, settings_env, spawn, stop, wait_for, wait_ready
from sealstream.settings import (
    CassandraSettings,
    HttpSettings,
    KafkaSettings,
    OpenSearchSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
    StackSettings,
)
from sealstream.stack.runner import group_cpu_seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated(base: Settings, run: str, prefix: str = "bench") -> Settings:
    """`base` with its own topics, groups, keyspace, schema, Redis prefix, Transit key and
    index named after `prefix` and `run`, and free ports for the services."""
    return base.model_copy(
        update={
            # The base's connection and credentials, with topics and groups of the run's own.
            "kafka": base.kafka.model_copy(
                update={
                    "messages_topic": f"{prefix}.{run}.messages",
                    "dead_letter_topic": f"{prefix}.{run}.dlq",
                    "encryptor_group": f"{prefix}-{run}-enc",
                    "indexer_group": f"{prefix}-{run}-idx",
                }
            ),
            "cassandra": CassandraSettings(
                hosts=base.cassandra.hosts, port=base.cassandra.port, keyspace=f"{prefix}_{run}"
            ),
            "postgres": PostgresSettings(
                host=base.postgres.host, port=base.postgres.port, schema_name=f"{prefix}_{run}"
            ),
            "redis": RedisSettings(url=base.redis.url, key_prefix=f"sealstream-{prefix}:{run}:"),
            # A copy, so a token file or KMS clusters configured for another stack carry over.
            "vault": base.vault.model_copy(update={"default_key": f"{prefix}-{run}"}),
            "opensearch": OpenSearchSettings(
                url=base.opensearch.url, index_prefix=f"{prefix}-{run}"
            ),
            "ingest": HttpSettings(port=_free_port()),
            "reader": HttpSettings(port=_free_port()),
            "encryptor_http": HttpSettings(port=_free_port()),
            "indexer_http": HttpSettings(port=_free_port()),
            "admin": HttpSettings(port=_free_port()),
        }
    )


_CHILDREN: dict[str, int] = {}


# Processes whose CPU per message a sealed/plaintext round reports ("gateway": the round's own).
_ROUND_CPU = ("gateway", "encryptor", "indexer", "kafka")


def _unsealed(kafka: KafkaSettings) -> KafkaSettings:
    return kafka.model_copy(update={"seal_records": False})


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _metric(url: str, name: str, label: str | None = None) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _process_groups(children: dict[str, int]) -> dict[str, int]:
    """Process groups to account CPU to: the stack's servers (pid files) and the services."""
    groups = dict(children)
    stack_dir = StackSettings().dir
    for name in ("postgres", "redis", "openbao", "cassandra", "kafka", "opensearch"):
        pid_file = stack_dir / name / "server.pid"
        if pid_file.exists():
            groups[name] = int(pid_file.read_text())
    return groups


@contextmanager
def _services(settings: Settings) -> Iterator[dict[str, str]]:
    """The four services, plus a second gateway with sealing off (`ingest_plain`) for the
    sealed-beside-plaintext rounds. The workers run with `kafka.seal_records` off, so they take
    the plain gateway's records too; they open every sealed record all the same (same cost as
    with sealing required, which only adds refusing unsealed records)."""
    plain_port = _free_port()
    env = {
        **os.environ,
        **settings_env(settings.model_copy(update={"kafka": _unsealed(settings.kafka)})),
    }
    started = {
        # The sealing gateway: the production default (kafka.seal_records on).
        "ingest": spawn("ingest", {**env, "SEALSTREAM_KAFKA__SEAL_RECORDS": "true"}),
        "encryptor": spawn("encryptor", env),
        "indexer": spawn("indexer", env),
        "reader": spawn("reader", env),
        "ingest_plain": spawn("ingest", {**env, "SEALSTREAM_INGEST__PORT": str(plain_port)}),
    }
    children: list[subprocess.Popen[bytes]] = list(started.values())
    _CHILDREN.clear()
    _CHILDREN.update({name: child.pid for name, child in started.items()})
    urls = {name: url for name, url in service_urls(settings).items() if name in started}
    urls["ingest_plain"] = f"http://{settings.ingest.host}:{plain_port}"
    try:
        wait_ready(urls)
        yield urls
    finally:
        stop(children)


def run(
    messages: int = 30_000,
    chats: int = 50,
    batch: int = 100,
    settings: Settings | None = None,
    warmup: int = 10_000,
    compare_rounds: int = 3,
    compare_messages: int = 10_000,
) -> dict[str, float]:
    """Run the benchmark in a namespace of its own; `compare_rounds` rounds of
    `compare_messages` per mode measure sealed Kafka records beside plaintext ones."""
    run_id = secrets.token_hex(3)
    cfg = isolated(settings or Settings(), run_id)
    migrate_all(cfg)
    try:
        with _services(cfg) as urls:
            return _measure(
                cfg, urls, messages, chats, batch, warmup, compare_rounds, compare_messages
            )
    finally:
        drop_namespace(cfg)


def _measure(
    cfg: Settings,
    urls: dict[str, str],
    messages: int,
    chats: int,
    batch: int,
    warmup: int,
    compare_rounds: int = 3,
    compare_messages: int = 10_000,
) -> dict[str, float]:
    figures: dict[str, float] = {}
    auth = {"Authorization": f"Bearer {mint_token(cfg.auth, 'bench')}"}
    store = MessageStore(cfg.cassandra)
    store.connect()
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16))
    kms_before = _metric(urls["encryptor"], "sealstream_kms_calls_total")
    phase_before = {
        p: _metric(urls["encryptor"], "sealstream_encryptor_seconds_total", f'phase="{p}"')
        for p in ("key_lookup", "crypto", "store")
    }
    cpu_before = _metric(urls["encryptor"], "process_cpu_seconds_total")
    chat_ids = [
        http.post(
            f"{urls['ingest']}/v1/chats", json={"participants": ["reader"]}, headers=auth
        ).json()["chat_id"]
        for _ in range(chats)
    ]

    # 1. Gateway, single posts (8 concurrent clients).
    singles = 800

    def post_one(i: int) -> None:
        r = http.post(
            f"{urls['ingest']}/v1/chats/{chat_ids[i % chats]}/messages",
            json={"text": f"single post number {i} with a few words"},
            headers=auth,
        )
        r.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(post_one, range(singles)))
    figures["gateway_single_msgs_per_s"] = singles / (time.perf_counter() - started)

    # 2. Sustained end-to-end with batched posts: first post to last row written.
    base_rows = singles
    wait_for(lambda: store.count() >= base_rows, 120, "single posts written", interval=0.5)
    texts = [f"benchmark message {i} lorem ipsum dolor sit amet consectetur" for i in range(batch)]

    def post_batch(i: int, gateway: str = "ingest") -> tuple[uuid.UUID, int]:
        chat = chat_ids[i % chats]
        r = http.post(
            f"{urls[gateway]}/v1/chats/{chat}/messages:batch",
            json={"messages": [{"text": t} for t in texts]},
            headers=auth,
        )
        r.raise_for_status()
        return uuid.UUID(chat), int(r.json()["accepted"][-1]["message_id"])

    def all_written(pending: set[tuple[uuid.UUID, int]]) -> bool:
        # A request's records are contiguous in its chat's partition and written in order, so
        # its last row existing means the whole request was written. Point reads only: polling
        # with count(*) scanned the table 20 times a second and skewed Cassandra's CPU figure.
        for chat, last_id in list(pending):
            if store.get(chat, last_id) is not None:
                pending.discard((chat, last_id))
        return not pending

    def indexed(total: int) -> bool:
        return _metric(urls["indexer"], "sealstream_consumer_records_total") >= total

    # Warm-up, not measured: the JVMs (Cassandra, OpenSearch, Kafka) compile their hot paths
    # during the first thousands of messages, and OpenSearch's CPU per document falls severalfold
    # once they have. A freshly started stack is slower than the figures (docs/benchmarks.md).
    warm_batches = warmup // batch
    with ThreadPoolExecutor(4) as pool:
        pending = set(pool.map(post_batch, range(warm_batches)))
    wait_for(lambda: all_written(pending), 600, "warm-up written")
    wait_for(lambda: indexed(singles + warm_batches * batch), 600, "warm-up indexed", 0.5)
    figures["warmup_messages"] = float(warm_batches * batch)

    batches = messages // batch
    groups = _process_groups(_CHILDREN)
    cpu_at_start = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        pending = set(pool.map(post_batch, range(batches)))
    posted_at = time.perf_counter()
    wait_for(lambda: all_written(pending), 600, "every request written")
    done_at = time.perf_counter()
    figures["gateway_batch_msgs_per_s"] = batches * batch / (posted_at - started)
    e2e_rate = batches * batch / (done_at - started)
    figures["e2e_msgs_per_s"] = e2e_rate
    # Where the two cores went during the sustained phase: CPU ms per message, per process.
    for name, pgid in groups.items():
        used = group_cpu_seconds(pgid) - cpu_at_start[name]
        figures[f"cpu_ms_per_msg_{name}"] = 1000 * used / (batches * batch)

    # The indexer trails the encryptor; let it finish the backlog so that the latency phase
    # measures a pipeline in steady state, not one still busy with the sustained phase.
    posted_total = singles + (warm_batches + batches) * batch
    wait_for(lambda: indexed(posted_total), 600, "indexer caught up", interval=0.5)
    figures["indexer_catch_up_s"] = time.perf_counter() - done_at

    # 2b. Sealed beside plaintext, same run, same workers, same chats: rounds alternate between
    # the sealing gateway and one with sealing off (order swapped each round), each round
    # started on an idle pipeline (the indexer caught up), measured as the sustained phase.
    rates: dict[str, dict[str, list[float]]] = {
        mode: {"e2e": [], "acked": [], "cpu": [], **{f"cpu_{k}": [] for k in _ROUND_CPU}}
        for mode in ("sealed", "plain")
    }
    round_batches = max(1, compare_messages // batch)
    for n in range(compare_rounds):
        for mode in ("sealed", "plain") if n % 2 == 0 else ("plain", "sealed"):
            gateway = "ingest" if mode == "sealed" else "ingest_plain"
            names = {"gateway": gateway, **{k: k for k in _ROUND_CPU if k != "gateway"}}
            cpu_round = {k: group_cpu_seconds(groups[g]) for k, g in names.items() if g in groups}
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                sent = set(pool.map(post_batch, range(round_batches), [gateway] * round_batches))
            acked_at = time.perf_counter()
            wait_for(partial(all_written, sent), 600, f"{mode} round written")
            t1 = time.perf_counter()
            count = round_batches * batch
            rates[mode]["e2e"].append(count / (t1 - t0))
            rates[mode]["acked"].append(count / (acked_at - t0))
            round_cpu = {k: group_cpu_seconds(groups[names[k]]) - v for k, v in cpu_round.items()}
            rates[mode]["cpu"].append(1000 * sum(round_cpu.values()) / count)
            for k, seconds in round_cpu.items():
                rates[mode][f"cpu_{k}"].append(1000 * seconds / count)
            figures[f"compare_round{n + 1}_{mode}_e2e_msgs_per_s"] = count / (t1 - t0)
            posted_total += count
            wait_for(partial(indexed, posted_total), 600, "indexer caught up", interval=0.5)
    for mode, series in rates.items():
        figures[f"compare_{mode}_e2e_msgs_per_s"] = statistics.median(series["e2e"])
        figures[f"compare_{mode}_gateway_msgs_per_s"] = statistics.median(series["acked"])
        # Gateway + encryptor + indexer + Kafka CPU per message of the round, and each.
        figures[f"compare_{mode}_cpu_ms_per_msg"] = statistics.median(series["cpu"])
        for k in _ROUND_CPU:
            figures[f"compare_{mode}_cpu_ms_per_msg_{k}"] = statistics.median(series[f"cpu_{k}"])
    figures["compare_rounds"] = float(compare_rounds)
    figures["compare_messages_per_round"] = float(round_batches * batch)
    figures["sealed_e2e_throughput_loss_pct"] = 100 * (
        1 - figures["compare_sealed_e2e_msgs_per_s"] / figures["compare_plain_e2e_msgs_per_s"]
    )
    figures["sealed_gateway_throughput_loss_pct"] = 100 * (
        1
        - figures["compare_sealed_gateway_msgs_per_s"] / figures["compare_plain_gateway_msgs_per_s"]
    )

    # 3. Post-to-readable latency at about half the sustained rate.
    # The same batched posts as the sustained phase (100 per request), then a chattier client
    # (10 per request, ten times the requests for the same messages).
    for per_request, reader_every, tag in ((batch, 1, ""), (10, 10, "_small_posts")):
        readable, written, acked = _latency_at(
            http,
            urls,
            auth,
            chat_ids,
            store,
            e2e_rate / 2,
            per_request,
            seconds=15,
            settle=5,
            reader_every=reader_every,
        )
        third = len(readable) // 3
        figures |= {
            f"post_to_readable_p50_ms{tag}": statistics.median(readable) * 1000,
            f"post_to_readable_p99_ms{tag}": _pct(readable, 0.99) * 1000,
            f"post_to_readable_max_ms{tag}": max(readable) * 1000,
            f"readable_samples{tag}": len(readable),
            f"post_to_readable_p50_first_third_ms{tag}": statistics.median(readable[:third]) * 1000,
            f"post_to_readable_p50_last_third_ms{tag}": statistics.median(readable[-third:]) * 1000,
            f"post_to_write_timestamp_p50_ms{tag}": statistics.median(written) * 1000,
            f"post_to_write_timestamp_p99_ms{tag}": _pct(written, 0.99) * 1000,
            f"post_to_202_p50_ms{tag}": statistics.median(acked) * 1000,
            f"post_to_202_p99_ms{tag}": _pct(acked, 0.99) * 1000,
        }

    # 4. Reader latency with warm caches.
    reader_auth = {"Authorization": f"Bearer {mint_token(cfg.auth, 'reader')}"}
    page = http.get(
        f"{urls['reader']}/v1/chats/{chat_ids[0]}/messages",
        params={"limit": 50},
        headers=reader_auth,
    ).json()["messages"]
    one_url = f"{urls['reader']}/v1/chats/{chat_ids[0]}/messages/{page[0]['message_id']}"
    page_url = f"{urls['reader']}/v1/chats/{chat_ids[0]}/messages"
    for name, call in (
        ("reader_one", lambda: http.get(one_url, headers=reader_auth)),
        ("reader_page50", lambda: http.get(page_url, params={"limit": 50}, headers=reader_auth)),
    ):
        samples = []
        for _ in range(300):
            t0 = time.perf_counter()
            call().raise_for_status()  # type: ignore[no-untyped-call]
            samples.append(time.perf_counter() - t0)
        figures[f"{name}_p50_ms"] = statistics.median(samples) * 1000
        figures[f"{name}_p99_ms"] = _pct(samples, 0.99) * 1000

    # 5. KMS calls and where the encryptor's CPU went.
    figures["messages_total"] = float(store.count())
    figures["chats"] = float(chats)
    figures["encryptor_kms_calls"] = (
        _metric(urls["encryptor"], "sealstream_kms_calls_total") - kms_before
    )
    cpu = _metric(urls["encryptor"], "process_cpu_seconds_total") - cpu_before
    for phase, before in phase_before.items():
        spent = _metric(urls["encryptor"], "sealstream_encryptor_seconds_total", f'phase="{phase}"')
        figures[f"encryptor_{phase}_share_of_cpu"] = (spent - before) / cpu if cpu else 0.0
    figures["encryptor_cpu_seconds"] = cpu
    http.close()
    store.close()
    return figures


def _latency_at(
    http: httpx.Client,
    urls: dict[str, str],
    auth: dict[str, str],
    chat_ids: list[str],
    store: MessageStore,
    rate: float,
    per_request: int,
    seconds: float,
    settle: float,
    reader_every: int,
) -> tuple[list[float], list[float], list[float]]:
    """Post batches of `per_request` at `rate` messages/s and return three sets of latencies:
    post -> the last message of the request returned by the reader (for one request in
    `reader_every`), post -> its row's store time (every request), post -> the gateway's
    202 (every request). The first `settle` seconds at that rate are not measured: right after the
    sustained phase Cassandra flushes and compacts what it just took in.

    "Readable" is the reader's answer: its client polls every 10 ms once the 202 is in, which
    over-states each latency by up to 10 ms and loads the machine with the polls, so the figure is
    conservative. The store time (`MessageStore.written_at`: Cassandra's clock as the
    coordinator executes the write, read back afterwards) costs nothing to measure but comes
    before the write is acknowledged: it is a lower bound, reported beside.
    """
    interval = per_request / rate
    posted: list[tuple[uuid.UUID, int, float]] = []
    acked: list[float] = []
    via_reader: list[float] = []
    lock = threading.Lock()
    measure_from = time.time() + settle
    end = time.monotonic() + settle + seconds
    pool = ThreadPoolExecutor(16)
    i = 0
    next_at = time.monotonic()
    while time.monotonic() < end:
        chat = chat_ids[i % len(chat_ids)]
        i += 1

        def one(chat: str = chat, n: int = i) -> None:
            sent_at, t0 = time.time(), time.perf_counter()
            r = http.post(
                f"{urls['ingest']}/v1/chats/{chat}/messages:batch",
                json={"messages": [{"text": f"probe {n} {k}"} for k in range(per_request)]},
                headers=auth,
            )
            last = r.json()["accepted"][-1]["message_id"]
            if sent_at < measure_from:
                return
            with lock:
                posted.append((uuid.UUID(chat), int(last), sent_at))
                acked.append(time.perf_counter() - t0)
            if n % reader_every:
                return
            url = f"{urls['reader']}/v1/chats/{chat}/messages/{last}"
            while http.get(url, headers=auth).status_code != 200:
                time.sleep(0.01)
            with lock:
                via_reader.append(time.perf_counter() - t0)

        pool.submit(one)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    pool.shutdown(wait=True)
    written: list[float] = []
    for chat_id, message_id, sent_at in posted:
        at = store.written_at(chat_id, message_id)
        deadline = time.monotonic() + 120
        while at is None and time.monotonic() < deadline:
            time.sleep(0.05)
            at = store.written_at(chat_id, message_id)
        if at is None:
            raise TimeoutError(f"probe message {message_id} not written after 120 s")
        written.append(at - sent_at)
    return via_reader, written, acked


def drop_namespace(cfg: Settings) -> None:
    """Remove what `isolated` settings created: keyspace, index, topics, schema, Transit key."""
    store = MessageStore(cfg.cassandra)
    store.connect()
    store.drop_keyspace()
    store.close()
    index = SearchIndex(cfg.opensearch)
    index.drop()
    index.close()
    delete_topics(cfg.kafka, [cfg.kafka.messages_topic, cfg.kafka.dead_letter_topic])
    db = Database(cfg.postgres)
    db.open()
    db.drop_schema()
    db.close()
    TransitKms(cfg.vault).delete_key(cfg.vault.default_key)


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<40} {value:,.2f}")
