"""The faults a drill injects: SIGKILL of one of our service processes, or an outage of one
server of the local stack (crash, graceful stop, or a hang), each followed by its return.

A fault is `inject()` then, after the outage, `restore()`, which returns once the process or
server answers again. Servers are stopped and started with the stack launcher's own functions
(`sealstream.stack.runner`), by the pid it recorded, so this works on whichever stack the
`SEALSTREAM_STACK_*` settings name.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol

from sealstream.drills.fleet import Fleet
from sealstream.stack import runner
from sealstream.stack.base import Server, StackError

# How a server is taken down: a crash (SIGKILL of its process group, nothing flushed), a
# graceful stop (`stack down` for that server: SIGTERM), or a hang (SIGSTOP, then SIGCONT).
SERVER_MODES = ("kill", "term", "hang")


class Fault(Protocol):
    target: str

    def inject(self) -> None: ...

    def restore(self) -> None: ...


class KillService:
    """SIGKILL one service process (no flush, no offset commit); restore starts it again."""

    def __init__(self, fleet: Fleet, key: str) -> None:
        self.fleet = fleet
        self.key = key
        self.target = key

    def inject(self) -> None:
        self.fleet.kill(self.key, signal.SIGKILL)

    def restore(self) -> None:
        self.fleet.start(self.key)
        self.fleet.wait_ready([self.key])


class ServerOutage:
    """Take one server of the local stack away (`mode`: kill, term or hang) and bring it back."""

    def __init__(self, server: Server, mode: str) -> None:
        if mode not in SERVER_MODES:
            raise ValueError(f"mode: must be one of {', '.join(SERVER_MODES)}, not {mode!r}")
        self.server = server
        self.mode = mode
        self.target = server.name

    def _pid(self) -> int:
        try:
            return int(self.server.ctx.pid_file(self.server.name).read_text().strip())
        except (FileNotFoundError, ValueError):
            raise StackError(
                f"{self.server.name}: no pid file under {self.server.ctx.root}; the drill only "
                "stops servers that `sealstream stack up` started"
            ) from None

    def inject(self) -> None:
        if self.mode == "term":
            runner.down([self.server], report=lambda _: None)
            return
        pid = self._pid()
        if self.mode == "hang":
            os.killpg(pid, signal.SIGSTOP)
            return
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.server.ctx.pid_file(self.server.name).unlink(missing_ok=True)

    def restore(self) -> None:
        if self.mode == "hang":
            os.killpg(self._pid(), signal.SIGCONT)
            deadline = time.monotonic() + self.server.start_timeout
            while True:
                try:
                    self.server.probe()
                    return
                except Exception:  # any failure means "not answering yet"
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        runner.up([self.server], report=lambda _: None)


def _group_alive(pgid: int) -> bool:
    try:  # reap the leader if this process started it (a server restarted by an earlier drill)
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
