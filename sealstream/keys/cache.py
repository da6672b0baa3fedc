"""In-process cache: bounded in size and age, with single-flight loading.

This is the only place a plaintext DEK lives outside the call that uses it. Single flight means
that when many threads miss the same key at once, one of them calls the loader (the KMS) and the
others wait for its result, so a cold start costs one KMS call per chat, not one per message.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        max_entries: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError("cache needs max_entries >= 1 and ttl_seconds > 0")
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[K, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            expires, value = item
            if expires <= self._clock():
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = (self._clock() + self.ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get_or_load(self, key: K, loader: Callable[[], V]) -> tuple[V, bool]:
        """Return (value, loaded_here). Concurrent misses of one key run `loader` once."""
        value = self.get(key)
        if value is not None:
            return value, False
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            value = self.get(key)
            if value is not None:
                return value, False
            try:
                value = loader()
                self.put(key, value)
                return value, True
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def discard(self, predicate: Callable[[K], bool]) -> int:
        with self._lock:
            doomed = [k for k in self._items if predicate(k)]
            for k in doomed:
                del self._items[k]
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
