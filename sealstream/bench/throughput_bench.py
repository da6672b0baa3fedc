"""Throughput benchmark (`sealstream bench throughput`): the issue-11 figures end to end, each
beside its baseline from the same run.

The bench starts its own services (N gateways, 1-3 encryptors, one indexer) on a namespace of
its own (topics, groups, keyspace, index, schema, Redis prefix, Transit key; removed afterwards)
and drives them from one asyncio load generator in this process (`load_generator`):

1. warm-up (batched posts, not measured: the servers' JVMs compile their hot paths);
2. end to end with `clients` WebSocket clients, one message at a time each, for every gateway
   count asked for: posted -> row written AND document indexed, i.e. acknowledged messages over
   (first send -> the moment both workers' processed counters covered them);
3. end to end with 100-message HTTP posts (`batch_clients` requests in flight);
4. the same batched load with 2 and 3 encryptor processes (written rate and end-to-end rate);
5. an offered-load sweep of single-message WebSocket traffic at fractions of the sustained rate
   of step 2: achieved rate, post -> ack and post -> written p50/p99. "Written" is the row's
   Cassandra store time (`MessageStore.written_at`: the row's `stored_at`, Cassandra's clock in
   ms as the coordinator executes the batch; same host clock as the load generator's send time): a lower bound of "readable"
   by the write's own round trip, and measured without polling the reader. The 0.5 point is
   the "p99 post -> readable at half the sustained rate" figure;
6. the plaintext baseline (`plaintext_baseline`): the product workers are stopped, the gateways
   restarted on a plaintext topic, and two baseline workers (same runtime, no key lookup, no
   crypto) write to a bench-only keyspace and index; steps 2 and 3 again, at the best gateway
   count;
7. the accounting: every acknowledged message is in Cassandra and in the index (product and
   baseline stores counted separately).

CPU figures are each process group's CPU time (/proc, user + system) over a phase (load + drain)
divided by the messages acknowledged in it; the load generator's is this process's CPU during
the load. The machine's busy cores over each phase are reported too, since the two cores are
shared. Prints nothing; `sealstream bench throughput` prints the tables.
"""

from __future__ import annotations

import os
import random
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import delete_topics, ensure_topics
from sealstream.adapters.opensearch import SearchIndex
from sealstream.auth import mint_token
from sealstream.bench.load_generator import LoadResult, batch_load, websocket_load
from sealstream.bench.pipeline_bench import (
    _free_port,
    _metric,
    _pct,
    _process_groups,
    drop_namespace,
    isolated,
)
from sealstream.errors import StoreUnavailable
from sealstream.migrate import migrate_all
from sealstream.services import settings_env, spawn, stop
from sealstream.settings import Settings, StackSettings
from sealstream.stack.runner import group_cpu_seconds

BENCH_USER = "bench"
READER_USER = "bench-reader"
_PROCESSED = "sealstream_consumer_records_total"  # written or dead-lettered, per worker
_LATENCY_SAMPLES = 1000  # messages per sweep point whose write time is read back


@dataclass(frozen=True)
class ThroughputConfig:
    """Durations in seconds. `gateways` and `encryptors`: the process counts to measure."""

    seconds: float = 20.0  # load per sustained phase
    sweep_seconds: float = 15.0  # load per offered-load point
    clients: int = 200  # WebSocket clients, one message in flight each
    gateways: tuple[int, ...] = (1, 2)
    encryptors: tuple[int, ...] = (1, 2, 3)
    batch_clients: int = 4  # HTTP batch requests in flight
    per_request: int = 100
    chats: int = 50
    warmup: int = 10_000  # messages, batched, before anything is measured
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25)  # x the sustained WebSocket rate
    drain_timeout: float = 600.0
    plots_dir: Path | None = None  # PNG plots of the sweep written here, if set

    def __post_init__(self) -> None:
        if not self.gateways or min(self.gateways) < 1 or max(self.gateways) > 8:
            raise ValueError("gateways: 1 to 8 processes")
        if not self.encryptors or min(self.encryptors) < 1 or max(self.encryptors) > 6:
            raise ValueError("encryptors: 1 to 6 processes (the topic has 6 partitions)")
        if not 1 <= self.clients <= 1000:
            raise ValueError("clients: 1 to 1000 (the gateway's max_connections)")
        if self.seconds <= 0 or self.sweep_seconds <= 0:
            raise ValueError("seconds, sweep_seconds: above 0")
        if not self.sweep or min(self.sweep) <= 0:
            raise ValueError("sweep: fractions of the sustained rate, above 0")


QUICK = ThroughputConfig(
    seconds=5.0,
    sweep_seconds=5.0,
    clients=50,
    gateways=(1,),
    encryptors=(1,),
    chats=10,
    warmup=500,
    sweep=(0.5,),
    drain_timeout=300.0,
)


@dataclass
class Phase:
    """One measured load: what was acknowledged and when the workers had processed it."""

    load: LoadResult
    written_rate: float  # acknowledged messages / (first send -> all written)
    e2e_rate: float  # acknowledged messages / (first send -> all written and indexed)
    cpu_ms_per_msg: dict[str, float]  # per process role (gateways, encryptors, ..., servers)
    machine_cores: float  # busy cores of the whole machine over load + drain

    @property
    def loadgen_ms_per_msg(self) -> float:
        return 1000 * self.load.cpu_seconds / max(self.load.acked, 1)


@dataclass(frozen=True)
class SweepPoint:
    offered: float  # messages/s asked for
    achieved: float  # acknowledged messages/s
    ack_p50_ms: float
    ack_p99_ms: float
    written_p50_ms: float
    written_p99_ms: float
    samples: int  # messages whose write time was read
    acked: int
    errors: int


@dataclass(frozen=True)
class Row:
    """One line of the report: a figure beside its baseline from the same run."""

    figure: str
    value: str
    baseline: str
    target: str


@dataclass
class ThroughputReport:
    rows: list[Row] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # flat, for the record
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- the processes -------------------------------------------------------------------------


class _Fleet:
    """The bench's service processes, by key (`gateway-1`, `encryptor-2`, `plain-writer`, ...),
    each a child in its own process group with its own log file and HTTP port."""

    def __init__(self, settings: Settings, plain: Settings, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **settings_env(settings)}
        self.plain_env = {**os.environ, **settings_env(plain)}
        for env in (self.env, self.plain_env):
            env.pop("SEALSTREAM_WORKER_ID", None)  # each gateway leases its own id
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.procs if k.startswith(prefix))

    def gateway_urls(self) -> list[str]:
        return [self.urls[k] for k in self.keys("gateway-")]

    def start(self, key: str, plain: bool = False) -> None:
        port = _free_port()
        env = dict(self.plain_env if plain else self.env)
        log = self.logs / f"{key}.log"
        role = key.rsplit("-", 1)[0] if key[-1].isdigit() else key
        if role == "gateway":
            env["SEALSTREAM_INGEST__PORT"] = str(port)
            self.procs[key] = spawn("ingest", env, log)
        elif role == "encryptor":
            env["SEALSTREAM_ENCRYPTOR_HTTP__PORT"] = str(port)
            self.procs[key] = spawn("encryptor", env, log)
        elif role == "indexer":
            env["SEALSTREAM_INDEXER_HTTP__PORT"] = str(port)
            self.procs[key] = spawn("indexer", env, log)
        elif role in ("plain-writer", "plain-indexer"):
            section = "ENCRYPTOR_HTTP" if role == "plain-writer" else "INDEXER_HTTP"
            env[f"SEALSTREAM_{section}__PORT"] = str(port)
            with log.open("ab") as out:
                self.procs[key] = subprocess.Popen(
                    [sys.executable, "-m", "sealstream.bench.plaintext_baseline", role[6:]],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        else:
            raise ValueError(f"unknown process {key!r}")
        self.urls[key] = f"http://127.0.0.1:{port}"

    def stop(self, keys: list[str]) -> None:
        stop([self.procs.pop(k) for k in keys if k in self.procs])
        for k in keys:
            self.urls.pop(k, None)

    def stop_all(self) -> None:
        self.stop(list(self.procs))

    def gateways(self, count: int, plain: bool = False) -> list[str]:
        """(Re)start exactly `count` gateways (on the plaintext topic if `plain`)."""
        self.stop(self.keys("gateway-"))
        for n in range(1, count + 1):
            self.start(f"gateway-{n}", plain)
        self.wait_ready(self.keys("gateway-"))
        return self.gateway_urls()

    def encryptors(self, count: int) -> None:
        """Start or stop encryptors until exactly `count` run."""
        running = self.keys("encryptor-")
        self.stop(running[count:])
        for n in range(len(running) + 1, count + 1):
            self.start(f"encryptor-{n}")
        if len(running) != count:
            # The group rebalances once the newcomers join (or the leavers' sessions end): let
            # it settle before anything is measured.
            self.wait_ready(self.keys("encryptor-"))
            time.sleep(5)
        self.wait_ready(self.keys("encryptor-"))

    def wait_ready(self, keys: list[str], timeout: float = 180.0) -> None:
        """Until each answers /readyz with 200 (a worker: joined its consumer group)."""
        deadline = time.monotonic() + timeout
        for key in keys:
            while True:
                proc = self.procs[key]
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{key} exited with {proc.returncode} (log {self.logs / f'{key}.log'})"
                    )
                try:
                    if httpx.get(f"{self.urls[key]}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{key} not ready after {timeout:.0f}s")
                time.sleep(0.2)

    def processed(self, keys: list[str]) -> float:
        return sum(_metric(self.urls[k], _PROCESSED) for k in keys)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by role (gateway, encryptor, ...) and by stack server."""
        by_role: dict[str, float] = {}
        for key, proc in self.procs.items():
            role = key.rsplit("-", 1)[0] if key[-1].isdigit() else key
            by_role[role] = by_role.get(role, 0.0) + group_cpu_seconds(proc.pid)
        for server, pid in _process_groups({}).items():
            by_role[server] = group_cpu_seconds(pid)
        return by_role


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine was busy (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --- the phases ----------------------------------------------------------------------------


def _measure(
    fleet: _Fleet,
    load: Callable[[], LoadResult],
    writers: list[str],
    indexers: list[str],
    drain_timeout: float,
) -> Phase:
    """Run `load`, then wait until the writers and the indexers processed every acknowledged
    message; rates from the first send to the moment each was reached."""
    written0, indexed0 = fleet.processed(writers), fleet.processed(indexers)
    cpu0, busy0, wall0 = fleet.cpu(), _machine_busy_seconds(), time.monotonic()
    result = load()
    written_at = indexed_at = None
    deadline = time.monotonic() + drain_timeout
    while written_at is None or indexed_at is None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"workers did not process {result.acked} acknowledged messages in "
                f"{drain_timeout:.0f}s (logs in {fleet.logs})"
            )
        try:
            if written_at is None and fleet.processed(writers) - written0 >= result.acked:
                written_at = time.time()
            if indexed_at is None and fleet.processed(indexers) - indexed0 >= result.acked:
                indexed_at = time.time()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    cpu1, busy1, wall1 = fleet.cpu(), _machine_busy_seconds(), time.monotonic()
    acked = max(result.acked, 1)
    return Phase(
        load=result,
        written_rate=result.acked / (written_at - result.started),
        e2e_rate=result.acked / (max(written_at, indexed_at) - result.started),
        cpu_ms_per_msg={role: 1000 * (cpu1[role] - cpu0.get(role, 0.0)) / acked for role in cpu1},
        machine_cores=(busy1 - busy0) / (wall1 - wall0),
    )


def _sweep_point(
    fleet: _Fleet,
    store: MessageStore,
    token: str,
    chats: list[str],
    clients: int,
    rate: float,
    seconds: float,
    drain_timeout: float,
) -> SweepPoint:
    phase = _measure(
        fleet,
        lambda: websocket_load(
            fleet.gateway_urls(), token, chats, clients, seconds, rate=rate, record=True
        ),
        fleet.keys("encryptor-"),
        fleet.keys("indexer"),
        drain_timeout,
    )
    samples = phase.load.samples
    picked = random.Random(int(rate)).sample(samples, min(len(samples), _LATENCY_SAMPLES))  # noqa: S311
    written: list[float] = []
    for sample in picked:
        at = store.written_at(uuid.UUID(sample.chat_id), sample.message_id)
        if at is None:  # processed means written: this is not expected
            raise RuntimeError(f"message {sample.message_id} processed but not in Cassandra")
        written.append(at - sample.sent_at)
    acks = [s.ack_seconds for s in samples] or [0.0]
    written = written or [0.0]
    return SweepPoint(
        offered=rate,
        achieved=phase.load.ack_rate,
        ack_p50_ms=1000 * statistics.median(acks),
        ack_p99_ms=1000 * _pct(acks, 0.99),
        written_p50_ms=1000 * statistics.median(written),
        written_p99_ms=1000 * _pct(written, 0.99),
        samples=len(picked),
        acked=phase.load.acked,
        errors=sum(phase.load.errors.values()),
    )


# --- the namespace -------------------------------------------------------------------------


def _plain_settings(cfg: Settings) -> Settings:
    """`cfg` with the baseline's own topic, groups, keyspace and index (same schema and chats)."""
    kafka = cfg.kafka
    return cfg.model_copy(
        update={
            "kafka": kafka.model_copy(
                update={
                    "messages_topic": f"{kafka.messages_topic}.plain",
                    "dead_letter_topic": f"{kafka.dead_letter_topic}.plain",
                    "encryptor_group": f"{kafka.encryptor_group}-plain",
                    "indexer_group": f"{kafka.indexer_group}-plain",
                    # The baseline encrypts nothing: its Kafka records are not sealed either.
                    "seal_records": False,
                }
            ),
            "cassandra": cfg.cassandra.model_copy(
                update={"keyspace": f"{cfg.cassandra.keyspace}_plain"}
            ),
            "opensearch": cfg.opensearch.model_copy(
                update={"index_prefix": f"{cfg.opensearch.index_prefix}-plain"}
            ),
        }
    )


@contextmanager
def _namespace(base: Settings) -> Iterator[tuple[Settings, Settings]]:
    cfg = isolated(base, secrets.token_hex(3), prefix="tput")
    plain = _plain_settings(cfg)
    migrate_all(cfg)
    try:
        store = MessageStore(plain.cassandra)
        store.connect()
        store.migrate()
        store.close()
        index = SearchIndex(plain.opensearch)
        index.migrate()
        index.close()
        ensure_topics(plain.kafka)
        yield cfg, plain
    finally:
        try:
            store = MessageStore(plain.cassandra)
            store.connect()
            store.drop_keyspace()
            store.close()
            index = SearchIndex(plain.opensearch)
            index.drop()
            index.close()
            delete_topics(plain.kafka, [plain.kafka.messages_topic, plain.kafka.dead_letter_topic])
        finally:
            drop_namespace(cfg)


def _create_chats(gateway: str, token: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=60) as http:
        return [
            str(
                http.post(
                    f"{gateway}/v1/chats", json={"participants": [READER_USER]}, headers=headers
                )
                .raise_for_status()
                .json()["chat_id"]
            )
            for _ in range(count)
        ]


def _stored(settings: Settings) -> tuple[float, float]:
    """(rows in the keyspace's messages table, live documents in the index). The row count is
    a `count(*)` over the whole table: NaN (not counted) if it outlasts the driver's timeout,
    which a run of a few hundred thousand rows on a busy machine can."""
    store = MessageStore(settings.cassandra)
    store.connect()
    try:
        rows = float(store.count())
    except StoreUnavailable:
        rows = float("nan")
    finally:
        store.close()
    index = SearchIndex(settings.opensearch)
    try:
        index.refresh()
        docs = float(index.count())
    finally:
        index.close()
    return rows, docs


# --- the run -------------------------------------------------------------------------------


def run(
    config: ThroughputConfig | None = None,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ThroughputReport:
    """Run every phase on a fresh namespace (removed afterwards) and return the report."""
    config = config or ThroughputConfig()
    with _namespace(settings or Settings()) as (cfg, plain):
        fleet = _Fleet(cfg, plain, StackSettings().dir / "bench-throughput" / secrets.token_hex(3))
        try:
            return _run(config, cfg, plain, fleet, log)
        finally:
            fleet.stop_all()


def _run(
    config: ThroughputConfig,
    cfg: Settings,
    plain: Settings,
    fleet: _Fleet,
    log: Callable[[str], None],
) -> ThroughputReport:
    report = ThroughputReport()
    fig = report.figures
    token = mint_token(cfg.auth, BENCH_USER, ttl_seconds=6 * 3600)
    log(f"services starting; logs in {fleet.logs}")
    gateways = fleet.gateways(max(config.gateways))
    fleet.start("encryptor-1")
    fleet.start("indexer")
    fleet.wait_ready(["encryptor-1", "indexer"])
    chats = _create_chats(gateways[0], token, config.chats)
    acked_main = acked_plain = not_acked = 0

    def measure(load: Callable[[], LoadResult], writers: str = "encryptor-") -> Phase:
        nonlocal acked_main, acked_plain, not_acked
        plain_phase = writers == "plain-writer"
        indexers = "plain-indexer" if plain_phase else "indexer"
        phase = _measure(
            fleet, load, fleet.keys(writers), fleet.keys(indexers), config.drain_timeout
        )
        if plain_phase:
            acked_plain += phase.load.acked
        else:
            acked_main += phase.load.acked
        errors = sum(phase.load.errors.values())
        not_acked += errors
        if errors:
            report.notes.append(f"{errors} messages not acknowledged: {dict(phase.load.errors)}")
        return phase

    def batches(gateway_urls: list[str], seconds: float) -> Callable[[], LoadResult]:
        return lambda: batch_load(
            gateway_urls, token, chats, config.batch_clients, seconds, config.per_request
        )

    def sockets(gateway_urls: list[str]) -> Callable[[], LoadResult]:
        return lambda: websocket_load(gateway_urls, token, chats, config.clients, config.seconds)

    # 1. Warm-up: enough batched messages for the JVMs to compile their hot paths.
    warm_seconds = max(2.0, config.warmup / 2000)
    log(f"warm-up: batched posts for {warm_seconds:.0f} s")
    measure(batches(gateways, warm_seconds))

    # 2. End to end, single-message WebSocket clients, for each gateway count.
    ws: dict[int, Phase] = {}
    for count in config.gateways:
        gateways = fleet.gateways(count)
        log(f"websocket e2e: {config.clients} clients, {count} gateway(s), {config.seconds:.0f} s")
        ws[count] = measure(sockets(gateways))
    best = max(ws, key=lambda n: ws[n].e2e_rate)
    gateways = fleet.gateway_urls()
    if len(gateways) != best:
        gateways = fleet.gateways(best)

    # 3. and 4. End to end, 100-message posts, with each encryptor count.
    batch: dict[int, Phase] = {}
    for count in config.encryptors:
        fleet.encryptors(count)
        log(f"batch e2e: {config.batch_clients} x {config.per_request}-message posts, "
            f"{count} encryptor(s), {config.seconds:.0f} s")  # fmt: skip
        batch[count] = measure(batches(gateways, config.seconds))
    fleet.encryptors(1)

    # 5. Offered-load sweep, single-message WebSocket traffic, 1 encryptor.
    sustained = ws[best].e2e_rate
    store = MessageStore(cfg.cassandra)
    store.connect()
    try:
        for fraction in config.sweep:
            rate = fraction * sustained
            log(f"sweep: {rate:,.0f} msg/s offered ({fraction:g} x sustained)")
            point = _sweep_point(
                fleet,
                store,
                token,
                chats,
                config.clients,
                rate,
                config.sweep_seconds,
                config.drain_timeout,
            )
            acked_main += point.acked
            not_acked += point.errors
            report.sweep.append(point)
    finally:
        store.close()

    # 6. The plaintext baseline: product workers stopped, gateways on the plaintext topic.
    fleet.stop([*fleet.keys("encryptor-"), "indexer"])
    gateways = fleet.gateways(best, plain=True)
    fleet.start("plain-writer", plain=True)
    fleet.start("plain-indexer", plain=True)
    fleet.wait_ready(["plain-writer", "plain-indexer"])
    log("baseline warm-up")
    measure(batches(gateways, 2.0), writers="plain-writer")
    log("baseline: websocket e2e")
    plain_ws = measure(sockets(gateways), writers="plain-writer")
    log("baseline: batch e2e")
    plain_batch = measure(batches(gateways, config.seconds), writers="plain-writer")

    # 7. Accounting: every acknowledged message stored and indexed, in both pipelines.
    fleet.stop_all()
    fig["acked"] = float(acked_main)
    fig["stored"], fig["indexed"] = _stored(cfg)
    fig["plain_acked"] = float(acked_plain)
    fig["plain_stored"], fig["plain_indexed"] = _stored(plain)
    for name in ("stored", "indexed", "plain_stored", "plain_indexed"):
        acked = fig["plain_acked" if name.startswith("plain") else "acked"]
        if fig[name] != acked:  # NaN (not counted) included
            report.notes.append(f"{name}: {fig[name]:.0f} of {acked:.0f} acknowledged messages")
    fig["not_acknowledged"] = float(not_acked)

    _fill(report, config, ws, best, batch, plain_ws, plain_batch)
    if config.plots_dir is not None:
        from sealstream.bench.throughput_plots import write_plots

        report.plots = write_plots(report.sweep, sustained, config.plots_dir)
    return report


# --- the report ----------------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value:,.0f} msg/s"


def _ms(value: float) -> str:
    return f"{value:.3f} ms"


def _fill(
    report: ThroughputReport,
    config: ThroughputConfig,
    ws: dict[int, Phase],
    best: int,
    batch: dict[int, Phase],
    plain_ws: Phase,
    plain_batch: Phase,
) -> None:
    """The rows (each figure beside its same-run baseline and the issue's target) and the flat
    figures."""
    rows, fig = report.rows, report.figures
    one = batch[min(batch)]
    ws_best = ws[best]
    for count, phase in sorted(ws.items()):
        mark = " (best)" if count == best and len(ws) > 1 else ""
        rows.append(
            Row(
                f"end to end, {config.clients} WebSocket clients, {count} gateway(s){mark}",
                f"{_rate(phase.e2e_rate)} (acked {_rate(phase.load.ack_rate)})",
                f"plaintext pipeline: {_rate(plain_ws.e2e_rate)}" if count == best else "-",
                ">= 2,500 msg/s",
            )
        )
        fig[f"ws_e2e_msgs_per_s_{count}gw"] = phase.e2e_rate
        fig[f"ws_acked_msgs_per_s_{count}gw"] = phase.load.ack_rate
        fig[f"ws_written_msgs_per_s_{count}gw"] = phase.written_rate
    fig["best_gateways"] = float(best)
    rows.append(
        Row(
            f"end to end, {config.per_request}-message posts ({min(batch)} encryptor)",
            f"{_rate(one.e2e_rate)} (acked {_rate(one.load.ack_rate)})",
            f"plaintext pipeline: {_rate(plain_batch.e2e_rate)}",
            ">= 5,000 msg/s",
        )
    )
    for label, sealed, plain in (
        (f"{config.per_request}-message posts", one, plain_batch),
        (f"WebSocket, {best} gateway(s)", ws_best, plain_ws),
    ):
        rows.append(
            Row(
                f"Sealstream / plaintext end to end, {label}",
                f"{sealed.e2e_rate / plain.e2e_rate:.2f}",
                f"{_rate(sealed.e2e_rate)} / {_rate(plain.e2e_rate)}",
                ">= 0.8",
            )
        )
    # The same ratio from the workers' CPU per message: less at the mercy of what else the
    # shared cores were doing while each pipeline ran (the two run one after the other).
    for label, sealed, plain in (
        (f"{config.per_request}-message posts", one, plain_batch),
        ("WebSocket", ws_best, plain_ws),
    ):
        sealed_cpu = sealed.cpu_ms_per_msg["encryptor"] + sealed.cpu_ms_per_msg["indexer"]
        plain_cpu = plain.cpu_ms_per_msg["plain-writer"] + plain.cpu_ms_per_msg["plain-indexer"]
        rows.append(
            Row(
                f"plaintext / Sealstream worker CPU per message, {label}",
                f"{plain_cpu / sealed_cpu:.2f}",
                f"{_ms(plain_cpu)} / {_ms(sealed_cpu)} (writer + indexer)",
                ">= 0.8 (as a cost ratio)",
            )
        )
        tag = "ws" if label == "WebSocket" else "batch"
        fig[f"cpu_ratio_{tag}"] = plain_cpu / sealed_cpu
    fig["batch_e2e_msgs_per_s"] = one.e2e_rate
    fig["batch_acked_msgs_per_s"] = one.load.ack_rate
    fig["plain_batch_e2e_msgs_per_s"] = plain_batch.e2e_rate
    fig["plain_ws_e2e_msgs_per_s"] = plain_ws.e2e_rate
    fig["ratio_batch"] = one.e2e_rate / plain_batch.e2e_rate
    fig["ratio_ws"] = ws_best.e2e_rate / plain_ws.e2e_rate

    half = _closest(report.sweep, ws_best.e2e_rate / 2)
    if half is not None:
        rows.append(
            Row(
                f"post -> written p50 / p99, WebSocket at {_rate(half.offered)} offered "
                f"(~half of {_rate(ws_best.e2e_rate)})",
                f"{half.written_p50_ms:.0f} / {half.written_p99_ms:.0f} ms",
                f"post -> ack: {half.ack_p50_ms:.0f} / {half.ack_p99_ms:.0f} ms",
                "p99 <= 200 ms",
            )
        )
        fig["half_rate_written_p50_ms"] = half.written_p50_ms
        fig["half_rate_written_p99_ms"] = half.written_p99_ms
        fig["half_rate_ack_p99_ms"] = half.ack_p99_ms

    for role, plain_role, target in (
        ("encryptor", "plain-writer", "<= 0.08 ms"),
        ("indexer", "plain-indexer", "<= 0.05 ms"),
    ):
        rows.append(
            Row(
                f"{role} CPU per message, {config.per_request}-message posts / WebSocket",
                f"{_ms(one.cpu_ms_per_msg[role])} / {_ms(ws_best.cpu_ms_per_msg[role])}",
                f"plaintext {plain_role[6:]}: {_ms(plain_batch.cpu_ms_per_msg[plain_role])}"
                f" / {_ms(plain_ws.cpu_ms_per_msg[plain_role])}",
                target,
            )
        )
        fig[f"{role}_cpu_ms_per_msg_batch"] = one.cpu_ms_per_msg[role]
        fig[f"{role}_cpu_ms_per_msg_ws"] = ws_best.cpu_ms_per_msg[role]
        fig[f"{plain_role}_cpu_ms_per_msg_batch"] = plain_batch.cpu_ms_per_msg[plain_role]
        fig[f"{plain_role}_cpu_ms_per_msg_ws"] = plain_ws.cpu_ms_per_msg[plain_role]

    for count, phase in sorted(batch.items()):
        rows.append(
            Row(
                f"{config.per_request}-message posts, {count} encryptor(s): written / end to end",
                f"{_rate(phase.written_rate)} / {_rate(phase.e2e_rate)}",
                f"1 encryptor: {_rate(batch[min(batch)].written_rate)} written"
                if count != min(batch)
                else "-",
                "each count; where it flattens",
            )
        )
        fig[f"batch_written_msgs_per_s_{count}enc"] = phase.written_rate
        fig[f"batch_e2e_msgs_per_s_{count}enc"] = phase.e2e_rate

    for label, phase in (("WebSocket", ws_best), (f"{config.per_request}-message posts", one)):
        rows.append(
            Row(
                f"load generator CPU (this process), {label}",
                f"{_ms(phase.loadgen_ms_per_msg)}/msg, "
                f"{phase.load.cpu_seconds / phase.load.seconds:.2f} cores",
                f"whole machine busy: {phase.machine_cores:.2f} of {os.cpu_count()} cores",
                "reported",
            )
        )
    fig["loadgen_cpu_ms_per_msg_ws"] = ws_best.loadgen_ms_per_msg
    fig["loadgen_cores_ws"] = ws_best.load.cpu_seconds / ws_best.load.seconds
    fig["loadgen_cpu_ms_per_msg_batch"] = one.loadgen_ms_per_msg
    fig["machine_busy_cores_ws"] = ws_best.machine_cores
    fig["machine_busy_cores_batch"] = one.machine_cores
    # Where the cores went (ms of CPU per message, by process or server), for the profile.
    for tag, phase in (("ws", ws_best), ("batch", one)):
        for role, ms in phase.cpu_ms_per_msg.items():
            fig[f"cpu_ms_per_msg_{tag}_{role}"] = ms


def _closest(points: list[SweepPoint], offered: float) -> SweepPoint | None:
    return min(points, key=lambda p: abs(p.offered - offered), default=None)
