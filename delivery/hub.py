"""The in-process registry of live subscriptions, by chat, and what each client is sent.

Everything here runs on the event loop (the follower and membership threads hand over with
`call_soon_threadsafe`), so no locks. One `Outbox` per connection (a WebSocket may follow many
chats, an SSE stream one); one `Subscription` per (connection, chat). A subscription buffers
live changes while its resume is read, then sends the replay and the buffer, each change once
per subscriber (deduplicated by event id: the change topic is at-least-once).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

SUBSCRIPTIONS = Gauge("sealstream_delivery_subscriptions", "Live subscriptions held")
DELIVERED = Counter("sealstream_delivery_events", "Change frames queued for clients", ["type"])
DROPPED_SLOW = Counter(
    "sealstream_delivery_slow_clients", "Connections closed because their queue was full"
)
_SEEN_PER_SUBSCRIPTION = 2048  # event ids remembered per subscription for deduplication


@dataclass(frozen=True)
class Delivered:
    """One change ready to send: its chat, its event id (the resume cursor) and its JSON frame
    (`delivery.service.change_frame`; holds the decrypted text, in memory only)."""

    chat_id: uuid.UUID
    event_id: int
    frame: dict[str, Any]


class Outbox:
    """The frames waiting to be written to one connection, at most `limit`: past that the client
    is too slow and `overflowed` is set (the writer then closes the connection)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.overflowed = False
        self.closed = False
        # Set on overflow: the connection is dropped even if its writer is stuck in a send (a
        # client that stopped reading never lets the end mark be reached).
        self.dropped = asyncio.Event()

    def put(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self.limit:
            self.overflowed = True
            DROPPED_SLOW.inc()
            self.close()
            self.dropped.set()
            return
        self.queue.put_nowait(frame)

    def close(self) -> None:
        """No more frames: the writer ends after the ones queued (None is the end mark)."""
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class Subscription:
    """One connection following one chat, as `user_id`.

    Starts buffering (`resuming`): live changes are kept until `replay` sends the resume's
    changes and then the buffered ones not already sent. `ended` once removed or unsubscribed.
    """

    def __init__(self, chat_id: uuid.UUID, user_id: str, outbox: Outbox) -> None:
        self.chat_id = chat_id
        self.user_id = user_id
        self.outbox = outbox
        self.ended = False
        self._buffer: list[Delivered] | None = []
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()

    @property
    def resuming(self) -> bool:
        return self._buffer is not None

    def offer(self, item: Delivered) -> None:
        if self.ended:
            return
        if self._buffer is not None:
            self._buffer.append(item)
            return
        self._send(item)

    def replay(self, items: Iterable[Delivered]) -> None:
        """Send `items` (the resume, in event order), then the live changes buffered meanwhile
        (in arrival order), each event id once; later changes go out as they come."""
        for item in items:
            self._send(item)
        buffered, self._buffer = self._buffer or [], None
        for item in buffered:
            self._send(item)

    def end(self, frame: dict[str, Any] | None) -> None:
        """Stop following the chat, after sending `frame` (e.g. `removed`) if given."""
        if self.ended:
            return
        self.ended = True
        self._buffer = None
        if frame is not None:
            self.outbox.put(frame)

    def _send(self, item: Delivered) -> None:
        if self.ended or item.event_id in self._seen:
            return
        self._seen.add(item.event_id)
        self._seen_order.append(item.event_id)
        if len(self._seen_order) > _SEEN_PER_SUBSCRIPTION:
            self._seen.discard(self._seen_order.popleft())
        DELIVERED.labels(item.frame["type"]).inc()
        self.outbox.put(item.frame)


class Hub:
    """Subscriptions by chat. `dispatch` hands a change to every subscription of its chat."""

    def __init__(self) -> None:
        self._by_chat: dict[uuid.UUID, set[Subscription]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def add(self, sub: Subscription) -> None:
        self.loop = asyncio.get_running_loop()
        self._by_chat.setdefault(sub.chat_id, set()).add(sub)
        SUBSCRIPTIONS.inc()

    def remove(self, sub: Subscription) -> None:
        subs = self._by_chat.get(sub.chat_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        SUBSCRIPTIONS.dec()
        if not subs:
            del self._by_chat[sub.chat_id]

    def has(self, chat_id: uuid.UUID) -> bool:
        """Whether anyone here follows the chat (safe to call from another thread: one dict
        lookup; a subscription added just after a False is served by its resume)."""
        return chat_id in self._by_chat

    def chats(self) -> list[uuid.UUID]:
        """The followed chats (also from another thread: a copy taken again if the loop changed
        the registry while it was being copied)."""
        while True:
            try:
                return list(self._by_chat)
            except RuntimeError:  # "dictionary changed size during iteration"
                continue

    def subscriptions(self, chat_id: uuid.UUID) -> list[Subscription]:
        return list(self._by_chat.get(chat_id, ()))

    def dispatch(self, item: Delivered) -> None:
        for sub in self.subscriptions(item.chat_id):
            sub.offer(item)

    def post(self, items: list[Delivered]) -> None:
        """From another thread: dispatch `items` on the loop, in order."""
        if self.loop is None or not items:
            return  # nobody ever subscribed here
        self.loop.call_soon_threadsafe(self._dispatch_all, items)

    def _dispatch_all(self, items: list[Delivered]) -> None:
        for item in items:
            self.dispatch(item)
