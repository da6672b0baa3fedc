"""A TCP proxy for fault tests: put it in front of a shared server, then make that server look
hung or down to one process without touching the server itself.

* `forward()`: relays bytes both ways (the normal state).
* `pause()`: stops relaying and holds what arrives, like a server that was sent SIGSTOP: TCP
  connections stay open and nothing is ever answered. `forward()` releases the held bytes.
* `down()`: resets every connection and refuses new ones, like a killed server.

It runs its own event loop in a daemon thread; listen on a port of the 4xxxx range (ports 2xxxx
and 3xxxx belong to the other stacks of this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

_CHUNK = 65536


def free_port() -> int:
    """A free port in 40000..49999 (the fault tests' own range)."""
    for port in range(40000 + (threading.get_native_id() * 7) % 9000, 49999):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 40000..49999")


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: relay; clear: hold (paused)
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def forward(self) -> None:
        self._down = False
        self._loop.call_soon_threadsafe(self._open.set)

    def pause(self) -> None:
        self._down = False
        self._loop.call_soon_threadsafe(self._open.clear)

    def down(self) -> None:
        self._down = True
        self._call(self._reset_all())

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(OSError):
                sock = writer.get_extra_info("socket")
                if sock is not None:  # RST, not FIN: the peer sees a dead server at once
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            await self._reset_all_of(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._relay(reader, up_writer), self._relay(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _reset_all_of(self, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._reset_all()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await self._open.wait()
            data = await reader.read(_CHUNK)
            if not data:
                break
            await self._open.wait()  # bytes read just before a pause are held, not sent
            writer.write(data)
            await writer.drain()
        writer.close()


@contextlib.contextmanager
def proxy(target_host: str, target_port: int) -> Iterator[TcpProxy]:
    running = TcpProxy(target_host, target_port).start()
    try:
        yield running
    finally:
        running.close()
