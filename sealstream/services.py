"""Starting the services (the four of the pipeline and the admin API): one in the foreground, or
all of them as supervised child processes."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from sealstream.settings import Settings

_ENTRYPOINTS = {
    "ingest": "ingest.wiring:run",
    "encryptor": "encryptor.worker:run",
    "indexer": "indexer.worker:run",
    "reader": "reader.wiring:run",
    "admin": "admin.wiring:run",
}


def run_service(name: str, settings: Settings) -> None:
    module, func = _ENTRYPOINTS[name].split(":")
    getattr(importlib.import_module(module), func)(settings)


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
    """Start `sealstream run <name>` as a child process (own process group), logging to `log`."""
    out = log.open("ab") if log is not None else None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "sealstream.cli", "run", name],
            env=env if env is not None else dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


def run_all() -> int:
    """Run every service; SIGTERM/SIGINT stops them all gracefully. Returns an exit code."""
    children = {name: spawn(name) for name in _ENTRYPOINTS}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(
                    f"{name} exited with {child.returncode}; stopping the others", file=sys.stderr
                )
                code = child.returncode or 1
                stopping = True
        time.sleep(0.2)
    stop(list(children.values()))
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
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


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
