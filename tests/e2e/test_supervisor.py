"""`sealstream run all` as an operator runs it: a real supervisor process with its five children.

SIGTERM must stop every child within the grace period; a child that dies is started again and the
others are left alone; a child that keeps dying makes the supervisor stop everything and exit 1.
The supervisor gets services of its own (own ports, topics and consumer groups), so the package's
pipeline and other tests never see its workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from sealstream.adapters.kafka import delete_topics, ensure_topics
from sealstream.services import settings_env
from sealstream.settings import HttpSettings, Settings
from tests.e2e.conftest import free_port

SERVICES = ("ingest", "encryptor", "indexer", "reader", "admin", "delivery")
GRACE = 30.0  # the supervisor's default grace period (RestartPolicy.grace_seconds)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def children_of(parent: int) -> dict[str, int]:
    """Service name -> pid of the live `sealstream run <service>` children of `parent`."""
    found: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and b"run" in argv:
            found[argv[argv.index(b"run") + 1].decode()] = int(stat.parent.name)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def supervised(migrated: Settings, kafka_suffix: str) -> Iterator[Settings]:
    """Settings for one `run all`: fresh ports, topics and consumer groups of its own."""
    kafka = migrated.kafka.model_copy(
        update={
            "messages_topic": f"{migrated.kafka.messages_topic}.{kafka_suffix}",
            "dead_letter_topic": f"{migrated.kafka.dead_letter_topic}.{kafka_suffix}",
            "encryptor_group": f"{migrated.kafka.encryptor_group}-{kafka_suffix}",
            "indexer_group": f"{migrated.kafka.indexer_group}-{kafka_suffix}",
        }
    )
    settings = migrated.model_copy(
        update={
            "kafka": kafka,
            "ingest": HttpSettings(port=free_port()),
            "reader": HttpSettings(port=free_port()),
            "encryptor_http": HttpSettings(port=free_port()),
            "indexer_http": HttpSettings(port=free_port()),
            "admin": HttpSettings(port=free_port()),
            "delivery": HttpSettings(port=free_port()),
        }
    )
    ensure_topics(kafka)
    yield settings
    delete_topics(kafka, [kafka.messages_topic, kafka.dead_letter_topic])


@pytest.fixture
def kafka_suffix() -> str:
    return f"sup{uuid.uuid4().hex[:8]}"


def urls(settings: Settings) -> dict[str, str]:
    ports = {
        "ingest": settings.ingest.port,
        "encryptor": settings.encryptor_http.port,
        "indexer": settings.indexer_http.port,
        "reader": settings.reader.port,
        "admin": settings.admin.port,
        "delivery": settings.delivery.port,
    }
    return {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}


class RunAll:
    """One `sealstream run all` process; whatever it leaves behind is killed by pid at the end."""

    def __init__(self, settings: Settings, *options: str) -> None:
        self.urls = urls(settings)
        self.seen: set[int] = set()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sealstream.cli", "run", "all", *options],
            env={**os.environ, **settings_env(settings)},
            start_new_session=True,
        )

    def children(self) -> dict[str, int]:
        found = children_of(self.proc.pid)
        self.seen.update(found.values())
        return found

    def wait_all_healthy(self, timeout: float = 180) -> dict[str, int]:
        wait_until(
            lambda: (
                set(self.children()) == set(SERVICES)
                and all(healthy(url) for url in self.urls.values())
            ),
            timeout,
            "all six services to answer /healthz",
        )
        return self.children()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for pid in self.seen:  # each child leads its own process group
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def run_all(supervised: Settings) -> Iterator[Callable[..., RunAll]]:
    started: list[RunAll] = []

    def start(*options: str) -> RunAll:
        started.append(RunAll(supervised, *options))
        return started[-1]

    yield start
    for run in started:
        run.cleanup()


def test_sigterm_stops_every_child_within_the_grace_period(
    run_all: Callable[..., RunAll],
) -> None:
    run = run_all()
    pids = run.wait_all_healthy()

    run.proc.send_signal(signal.SIGTERM)
    code = run.proc.wait(GRACE + 30)  # every child gone by SIGTERM, or SIGKILLed after GRACE
    left = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert left == {}, f"still running after `run all` exited with {code}: {left}"
    assert code == 0


def test_a_killed_child_is_restarted_and_the_others_are_left_alone(
    run_all: Callable[..., RunAll],
) -> None:
    run = run_all()
    before = run.wait_all_healthy()

    os.killpg(before["reader"], signal.SIGKILL)
    wait_until(
        lambda: (
            run.children().get("reader", before["reader"]) != before["reader"]
            and healthy(run.urls["reader"])
        ),
        120,
        "a new reader process answering /healthz",
    )
    after = run.children()
    assert after["reader"] != before["reader"]
    assert {n: p for n, p in after.items() if n != "reader"} == {
        n: p for n, p in before.items() if n != "reader"
    }, "the other services must keep their processes"
    assert run.proc.poll() is None, "the supervisor must keep running"


def test_a_crash_looping_child_stops_everything_and_exits_non_zero(
    run_all: Callable[..., RunAll], supervised: Settings
) -> None:
    # The reader's port taken by someone else: every reader start fails at once.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", supervised.reader.port))
    blocker.listen()
    try:
        run = run_all("--max-restarts", "2", "--restart-window", "300")
        wait_until(
            lambda: {"ingest", "admin"} <= set(run.children()),
            120,
            "the other services to start",
        )
        others = {n: p for n, p in run.children().items() if n != "reader"}
        code = run.proc.wait(240)  # 1 s + 2 s of backoff, three failed starts, then GRACE
    finally:
        blocker.close()
    assert code == 1
    left = {name: pid for name, pid in others.items() if _alive(pid)}
    assert left == {}, f"`run all` gave up but left these running: {left}"
