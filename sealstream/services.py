"""Starting the services (the four of the pipeline, live delivery and the admin API): one in the
foreground, or all of them as supervised child processes."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from sealstream.settings import Settings

_ENTRYPOINTS = {
    "ingest": "ingest.wiring:run",
    "encryptor": "encryptor.worker:run",
    "indexer": "indexer.worker:run",
    "reader": "reader.wiring:run",
    "admin": "admin.wiring:run",
    "delivery": "delivery.wiring:run",
}


def service_settings(name: str, settings: Settings) -> Settings:
    """`settings` as service `name` runs with them: its own Kafka principal unless the settings
    name one (docs/operations.md, "Broker authentication and ACLs").

    Raises `ValueError` (naming `SEALSTREAM_KAFKA__USERNAME`, never a password) when that
    principal is a super user (the broker's or the operator's, `kafka_principals.SUPER_USERS`):
    ACLs do not apply to them, so a service left with an operator's username (compose's migrate
    sets one) would run with every right on the broker. Also what `acting_as` raises.
    """
    from sealstream.kafka_principals import BY_SERVICE, SUPER_USERS

    kafka = settings.kafka.acting_as(BY_SERVICE[name])
    if kafka.principal in SUPER_USERS:
        raise ValueError(
            f"service {name!r} would run as the Kafka super user {kafka.principal!r}, which no "
            f"ACL limits: unset SEALSTREAM_KAFKA__USERNAME (it then runs as "
            f"{BY_SERVICE[name]!r}) or set it to the service's own principal"
        )
    return settings.model_copy(update={"kafka": kafka})


def run_service(name: str, settings: Settings) -> None:
    """Run service `name` in the foreground with `service_settings(name, settings)` (raises
    its `ValueError` before starting anything)."""
    resolved = service_settings(name, settings)
    module, func = _ENTRYPOINTS[name].split(":")
    getattr(importlib.import_module(module), func)(resolved)


def child_env(name: str, env: dict[str, str]) -> dict[str, str]:
    """`env` for a child running service `name`: its own Kafka principal, never its parent's
    (an operator's shell, a test acting as the admin); its password then comes from
    `kafka.credentials_file`, which holds every principal's."""
    from sealstream.kafka_principals import BY_SERVICE

    env = {k: v for k, v in env.items() if k != "SEALSTREAM_KAFKA__PASSWORD"}
    env["SEALSTREAM_KAFKA__USERNAME"] = BY_SERVICE[name]
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The SEALSTREAM_* environment that reproduces `settings` in a child process."""
    env: dict[str, str] = {}
    for section_name, section in settings:
        if not isinstance(section, BaseModel):
            if section is not None:  # e.g. worker_id: unset means "lease one"
                env[f"SEALSTREAM_{section_name.upper()}"] = str(section)
            continue
        for field_name in type(section).model_fields:
            value: object = getattr(section, field_name)
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            elif isinstance(value, tuple | list):
                value = "[" + ",".join(f'"{v}"' for v in value) + "]"
            elif isinstance(value, dict | BaseModel):
                value = json.dumps(_plain(value))  # e.g. vault.clusters, parsed back as JSON
            env[f"SEALSTREAM_{section_name.upper()}__{field_name.upper()}"] = str(value)
    return env


def _plain(value: object) -> object:
    """`value` as JSON data, secrets revealed (the child process needs them)."""
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value if v is not None}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def spawn(
    name: str, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `sealstream run <name>` as a child process (own process group), logging to `log`,
    as the service's own Kafka principal (`child_env`)."""
    out = log.open("ab") if log is not None else None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "sealstream.cli", "run", name],
            env=child_env(name, env if env is not None else dict(os.environ)),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


@dataclass(frozen=True)
class RestartPolicy:
    """What `run_all` does when a child exits on its own (docs/operations.md, "Running the
    services").

    The child is started again after `backoff_seconds`, doubled for every restart of that
    service in the last `window_seconds` (capped at `max_backoff_seconds`). A service that
    exits again after `max_restarts` restarts within `window_seconds` is crash-looping: the
    supervisor then stops every child and exits 1. Stopping (SIGTERM/SIGINT to the supervisor,
    or giving up) sends SIGTERM to every child and SIGKILL to what is left after
    `grace_seconds`.
    """

    max_restarts: int = 5
    window_seconds: float = 60.0
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 16.0
    grace_seconds: float = 30.0

    def delay(self, recent_restarts: int) -> float:
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2.0**recent_restarts))


class _Supervisor:
    """The children of `run_all`, by service name, and their recent restart times."""

    def __init__(self, names: list[str], policy: RestartPolicy) -> None:
        self.policy = policy
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, list[float]] = {name: [] for name in names}
        self.due: dict[str, float] = {}  # service -> monotonic time of its pending restart
        self.stopping = False

    def start(self, name: str) -> None:
        self.children[name] = spawn(name)
        _say(f"{name} started", service=name, pid=self.children[name].pid)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def tick(self) -> int | None:
        """Reap exited children and start due restarts; an exit code when it is time to stop."""
        now = time.monotonic()
        for name, child in list(self.children.items()):
            if name in self.due or child.poll() is None:
                continue
            recent = [t for t in self.restarts[name] if now - t < self.policy.window_seconds]
            self.restarts[name] = recent
            if len(recent) >= self.policy.max_restarts:
                _say(
                    f"{name} exited with {child.returncode} after {len(recent)} restarts in "
                    f"{self.policy.window_seconds:.0f}s; stopping every service",
                    service=name,
                    code=child.returncode,
                )
                return 1
            delay = self.policy.delay(len(recent))
            _say(
                f"{name} exited with {child.returncode}; restarting in {delay:.1f}s",
                service=name,
                code=child.returncode,
            )
            self.due[name] = now + delay
        for name, when in list(self.due.items()):
            if now >= when:
                del self.due[name]
                self.restarts[name].append(now)
                self.start(name)
        return None

    def stop_all(self) -> None:
        stop(list(self.children.values()), timeout=self.policy.grace_seconds)
        _say("every service stopped")


def _say(msg: str, **fields: object) -> None:
    """One JSON line on stderr, like the services' logs."""
    entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "service": "supervisor"}
    print(json.dumps({**entry, "msg": msg, **fields}), file=sys.stderr, flush=True)


def run_all(policy: RestartPolicy | None = None) -> int:
    """Run every service as a child process, supervised by `policy` (defaults: RestartPolicy()).

    SIGTERM or SIGINT stops every child (SIGTERM, then SIGKILL after the grace period) and
    returns 0; a crash-looping service stops every child and returns 1.
    """
    supervisor = _Supervisor(list(_ENTRYPOINTS), policy or RestartPolicy())
    # Handlers first: a SIGTERM while the children start must still stop the ones started.
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    code = 0
    try:
        for name in _ENTRYPOINTS:
            supervisor.start(name)
        while not supervisor.stopping:
            outcome = supervisor.tick()
            if outcome is not None:
                code = outcome
                break
            time.sleep(0.2)
    finally:
        supervisor.stop_all()
    return code


def service_urls(settings: Settings) -> dict[str, str]:
    """Base URL of each service's HTTP endpoint (API or health/metrics)."""
    return {
        name: f"http://{http.host}:{http.port}"
        for name, http in (
            ("ingest", settings.ingest),
            ("encryptor", settings.encryptor_http),
            ("indexer", settings.indexer_http),
            ("reader", settings.reader),
            ("delivery", settings.delivery),
        )
    }


def wait_ready(urls: dict[str, str], timeout: float = 120.0) -> None:
    """Wait until every service answers /readyz with 200 (a worker: joined its group)."""
    import httpx

    deadline = time.monotonic() + timeout
    for name, url in urls.items():
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {timeout:.0f}s ({url}/readyz)")
            time.sleep(0.1)


def stop(children: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM each child's process group, then SIGKILL whatever is left after `timeout`."""
    for child in children:
        if child.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)
            child.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # The child may have exited since it was polled: nothing left to signal then.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str = "condition", interval: float = 0.05
) -> float:
    """Poll `predicate` (HTTP errors count as "not yet"); return the seconds it took."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
