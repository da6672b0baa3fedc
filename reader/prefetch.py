"""A blocking iterator read ahead in its own thread, consumed from the event loop.

A download's bytes come from a blocking iterator (boto3 reads, AES-GCM per segment). Pulling it
one item at a time through the thread pool (`iterate_in_threadpool`) serialises everything:
the next segment is neither fetched nor decrypted while the loop writes the last one to the
socket. `ReadAhead` runs the iterator in a thread of its own, at most `depth` items ahead of
the consumer, so reading, decrypting and sending overlap while memory stays bounded
(`depth` + 2 items: the queue, the one being produced, the one being sent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterator

_WAKE_SECONDS = 1.0  # how often a producer waiting for room checks that the consumer is there


class _End:
    """Marks the end of the items, with the error the iterator raised, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class ReadAhead:
    """`async for item in ReadAhead(items)`: the items of a blocking iterator, read ahead.

    An error of the iterator is raised from the `async for` after the items before it. When the
    consumer stops early (the client went away), the thread stops at its next item and closes
    the iterator (which releases its object-store connection)."""

    def __init__(self, items: Iterator[bytes], depth: int = 2) -> None:
        self._items = items
        self._depth = depth
        self._stopped = threading.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | _End] = asyncio.Queue(self._depth)
        worker = threading.Thread(
            target=self._produce, args=(loop, queue), name="attachment-read", daemon=True
        )
        worker.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self._stopped.set()
            while not queue.empty():  # make room: a put the thread waits on completes
                queue.get_nowait()

    def _produce(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | _End]) -> None:
        try:
            try:
                for item in self._items:
                    if not self._hand_over(loop, queue, item):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                self._hand_over(loop, queue, _End(exc))
                return
            self._hand_over(loop, queue, _End())
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _hand_over(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[bytes | _End],
        item: bytes | _End,
    ) -> bool:
        """Put `item` on the queue, waiting for room; False once the consumer has stopped (or
        the loop is gone), and the producer should stop too."""
        if self._stopped.is_set():
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # the event loop closed (shutdown): nobody is reading
            return False
        while True:
            try:
                future.result(timeout=_WAKE_SECONDS)
                return not self._stopped.is_set()
            except concurrent.futures.TimeoutError:
                if self._stopped.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False
