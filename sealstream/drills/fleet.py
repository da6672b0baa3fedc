"""The service processes a drill runs against: two gateways, one encryptor, one indexer, one
reader and one admin API, each a `sealstream run <service>` child with its own log file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from sealstream.services import settings_env, spawn, stop
from sealstream.settings import Settings

GATEWAYS = ("gateway-1", "gateway-2")  # two ingest processes: clients fail over between them
_SERVICES = ("encryptor", "indexer", "reader", "admin")


class Fleet:
    """Starts, kills and restarts the services; notices those that exited on their own."""

    def __init__(self, settings: Settings, gateway_ports: tuple[int, int], logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, **settings_env(settings)}
        self.env: dict[str, dict[str, str]] = {name: base for name in _SERVICES}
        self.service: dict[str, str] = {name: name for name in _SERVICES}
        self.urls = {
            "encryptor": _url(settings.encryptor_http.port),
            "indexer": _url(settings.indexer_http.port),
            "reader": _url(settings.reader.port),
            "admin": _url(settings.admin.port),
        }
        for key, port in zip(GATEWAYS, gateway_ports, strict=True):
            # No configured worker id: each gateway leases its own (sealstream.worker_ids), and a
            # gateway restarted after SIGKILL takes a free id while its old lease runs out.
            env = {**base, "SEALSTREAM_INGEST__PORT": str(port)}
            env.pop("SEALSTREAM_WORKER_ID", None)
            self.env[key] = env
            self.service[key] = "ingest"
            self.urls[key] = _url(port)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: list[str] = []  # "encryptor exited with 1" for each unplanned exit seen

    @property
    def gateway_urls(self) -> list[str]:
        return [self.urls[key] for key in GATEWAYS]

    def start(self, key: str) -> None:
        self.procs[key] = spawn(self.service[key], self.env[key], self.logs / f"{key}.log")

    def start_all(self) -> None:
        for key in self.service:
            self.start(key)
        self.wait_ready(list(self.service))

    def kill(self, key: str, sig: signal.Signals) -> None:
        proc = self.procs.pop(key)
        os.killpg(proc.pid, sig)
        proc.wait(60)

    def stop_all(self) -> None:
        stop(list(self.procs.values()))
        self.procs.clear()

    def check_exits(self) -> list[str]:
        """Services that exited although nobody stopped them; restarted as a supervisor would."""
        found = []
        for key, proc in list(self.procs.items()):
            if proc.poll() is not None:
                found.append(f"{key} exited with {proc.returncode}")
                self.start(key)
        self.exits.extend(found)
        return found

    def wait_ready(self, keys: list[str], timeout: float = 180.0) -> None:
        """Until each service answers /readyz with 200 (a worker: joined its consumer group)."""
        deadline = time.monotonic() + timeout
        for key in keys:
            while True:
                try:
                    if httpx.get(f"{self.urls[key]}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                self.check_exits()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{key} not ready after {timeout:.0f}s ({self.urls[key]}/readyz; "
                        f"log {self.logs / f'{key}.log'})"
                    )
                time.sleep(0.2)


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"
