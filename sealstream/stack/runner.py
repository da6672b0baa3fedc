"""Starts, stops and reports on the local stack: pid files, readiness by real requests, log tails.

`up` installs and spawns every server that is not already answering, then waits for each one's
protocol probe (never a sleep). `down` stops exactly the processes `up` started, by the pid it
recorded (each server runs in its own process group), never by name.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sealstream.stack.base import Server, StackContext, StackError

Report = Callable[[str], None]


@dataclass(frozen=True)
class ServerStatus:
    name: str
    port: int
    pid: int | None
    answering: bool
    detail: str  # the version when answering, the probe's error otherwise
    rss_mb: float  # resident memory of the server's whole process group


def _group_stats(pgid: int) -> list[list[str]]:
    """/proc/PID/stat fields (from field 3 on) of every process in a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if len(fields) > 21 and fields[2] == str(pgid):  # field 5: the process group
            found.append(fields)
    return found


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by every process in a process group."""
    ticks = sum(int(f[11]) + int(f[12]) for f in _group_stats(pgid))  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def group_rss_mb(pgid: int | None) -> float:
    """Resident memory (MiB) of every process in a process group."""
    if pgid is None:
        return 0.0
    pages = sum(int(f[21]) for f in _group_stats(pgid))  # field 24: rss in pages
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def _probe(server: Server) -> tuple[bool, str]:
    try:
        return True, server.probe()
    except Exception as exc:  # noqa: BLE001 - any failure means "not answering"; we report it
        return False, f"{type(exc).__name__}: {exc}"[:300]


def status(servers: Iterable[Server]) -> list[ServerStatus]:
    result = []
    for server in servers:
        pid = _read_pid(server.ctx.pid_file(server.name))
        ok, detail = _probe(server)
        result.append(ServerStatus(server.name, server.port, pid, ok, detail, group_rss_mb(pid)))
    return result


def _spawn(server: Server) -> int:
    ctx = server.ctx
    log = ctx.log_file(server.name).open("ab")
    log.write(f"\n=== sealstream stack up: {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode())
    log.flush()
    proc = subprocess.Popen(
        server.argv(),
        cwd=server.data,
        env=server.env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: `down` signals the group, nothing else
    )
    ctx.pid_file(server.name).write_text(str(proc.pid))
    return proc.pid


def _wait_ready(server: Server, pid: int) -> str:
    deadline = time.monotonic() + server.start_timeout
    last = ""
    while time.monotonic() < deadline:
        if _read_pid(server.ctx.pid_file(server.name)) is None:
            raise StackError(
                f"{server.name} exited during start-up (pid {pid}).\n"
                f"Last lines of {server.ctx.log_file(server.name)}:\n"
                f"{_tail(server.ctx.log_file(server.name))}"
            )
        ok, detail = _probe(server)
        if ok:
            return detail
        last = detail
        time.sleep(0.5)
    raise StackError(
        f"{server.name} did not answer within {server.start_timeout:.0f}s on port {server.port} "
        f"(last probe: {last}).\nLast lines of {server.ctx.log_file(server.name)}:\n"
        f"{_tail(server.ctx.log_file(server.name))}"
    )


def up(servers: list[Server], report: Report = print) -> dict[str, float]:
    """Start every server not already answering; return seconds each took to become ready."""
    timings: dict[str, float] = {}
    pending: list[tuple[Server, int, float]] = []
    for server in servers:
        pid = _read_pid(server.ctx.pid_file(server.name))
        ok, detail = _probe(server)
        if ok:
            report(f"{server.name:<10} already running on {server.port} ({detail})")
            server.after_ready()
            timings[server.name] = 0.0
            continue
        if pid is not None:
            raise StackError(
                f"{server.name}: process {pid} from an earlier `up` is alive but does not answer "
                f"on port {server.port}; run `sealstream stack down` first"
            )
        started = time.monotonic()
        report(f"{server.name:<10} installing ...")
        server.install()
        server.prepare()
        pid = _spawn(server)
        report(f"{server.name:<10} started, pid {pid}, waiting for port {server.port} ...")
        pending.append((server, pid, started))
    # Spawn everything first and wait afterwards: the JVMs then start in parallel.
    for server, pid, started in pending:
        detail = _wait_ready(server, pid)
        server.after_ready()
        timings[server.name] = time.monotonic() - started
        report(f"{server.name:<10} ready in {timings[server.name]:.1f}s ({detail})")
    return timings


def down(servers: list[Server], report: Report = print, timeout: float = 60.0) -> None:
    """Stop the processes recorded by `up`: SIGTERM to each group, SIGKILL after `timeout`."""
    stopping: list[tuple[Server, int]] = []
    for server in reversed(servers):
        pid = _read_pid(server.ctx.pid_file(server.name))
        if pid is None:
            report(f"{server.name:<10} not running")
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        stopping.append((server, pid))
    deadline = time.monotonic() + timeout
    for server, pid in stopping:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            report(f"{server.name:<10} did not stop in {timeout:.0f}s, killing")
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.ctx.pid_file(server.name).unlink(missing_ok=True)
        report(f"{server.name:<10} stopped (pid {pid})")


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# Start order: the quick servers first, the JVMs after (they then start in parallel).
SERVERS: dict[str, str] = {
    "postgres": "sealstream.stack.postgres:PostgresServer",
    "redis": "sealstream.stack.redis:RedisServer",
    "openbao": "sealstream.stack.openbao:OpenBaoServer",
    "cassandra": "sealstream.stack.cassandra:CassandraServer",
    "kafka": "sealstream.stack.kafka:KafkaServer",
    "opensearch": "sealstream.stack.opensearch:OpenSearchServer",
    "s3proxy": "sealstream.stack.s3proxy:S3ProxyServer",
}


def build(ctx: StackContext, names: Iterable[str] | None = None) -> list[Server]:
    """The servers of the stack (all of them, or those named), in start order."""
    wanted = list(SERVERS) if not names else list(names)
    unknown = set(wanted) - set(SERVERS)
    if unknown:
        raise StackError(
            f"unknown server(s): {', '.join(sorted(unknown))}; known: {', '.join(SERVERS)}"
        )
    servers: list[Server] = []
    for name in SERVERS:
        if name in wanted:
            module_name, class_name = SERVERS[name].split(":")
            server_class = getattr(importlib.import_module(module_name), class_name)
            servers.append(server_class(ctx))
    return servers
