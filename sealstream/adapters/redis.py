"""Redis adapter: a shared cache of *wrapped* DEKs and current-version pointers, plus the
invalidation channel that tells every process about a rotation or a deleted chat.

Plaintext DEKs never go here: a full Redis dump yields only Transit ciphertexts, which are useless
without the KMS. Connection trouble becomes `StoreUnavailable`; the key service treats that as a
cache miss and falls back to Postgres, because Redis is an optimisation, not a source of truth.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
import redis.exceptions

from sealstream.errors import StoreUnavailable
from sealstream.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
Invalidation = Callable[[str, uuid.UUID], None]
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclass(frozen=True)
class WrappedDek:
    wrapped: str
    kms_key_name: str


class RedisKeyCache:
    def __init__(self, settings: RedisSettings, ttl_seconds: int = 3600) -> None:
        self.prefix = settings.key_prefix
        self.ttl = ttl_seconds
        self._client = redis.Redis.from_url(
            settings.url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self.channel = f"{self.prefix}keys:invalidate"

    def _current_key(self, chat_id: uuid.UUID) -> str:
        return f"{self.prefix}dek:current:{chat_id}"

    def _wrapped_key(self, chat_id: uuid.UUID, version: int) -> str:
        return f"{self.prefix}dek:wrapped:{chat_id}:{version}"

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"Redis unavailable: {type(exc).__name__}") from None

    def current_version(self, chat_id: uuid.UUID) -> int | None:
        value = self._run(lambda: self._client.get(self._current_key(chat_id)))
        return None if value is None else int(value)

    def set_current_version(self, chat_id: uuid.UUID, version: int) -> None:
        self._run(lambda: self._client.set(self._current_key(chat_id), version, ex=self.ttl))

    def wrapped(self, chat_id: uuid.UUID, version: int) -> WrappedDek | None:
        value = self._run(lambda: self._client.get(self._wrapped_key(chat_id, version)))
        if value is None:
            return None
        data = json.loads(value)
        return WrappedDek(wrapped=data["wrapped"], kms_key_name=data["kms_key_name"])

    def set_wrapped(self, chat_id: uuid.UUID, version: int, dek: WrappedDek) -> None:
        value = json.dumps({"wrapped": dek.wrapped, "kms_key_name": dek.kms_key_name})
        self._run(lambda: self._client.set(self._wrapped_key(chat_id, version), value, ex=self.ttl))

    def forget_chat(self, chat_id: uuid.UUID) -> None:
        def forget() -> None:
            keys = list(self._client.scan_iter(f"{self.prefix}dek:*:{chat_id!s}*", count=500))
            if keys:
                self._client.delete(*keys)

        self._run(forget)

    def forget_versions(self, chat_id: uuid.UUID, versions: list[int]) -> None:
        if versions:
            keys = [self._wrapped_key(chat_id, v) for v in versions]
            self._run(lambda: self._client.delete(*keys))

    def publish_invalidation(self, action: str, chat_id: uuid.UUID) -> None:
        """Tell every process that a chat was `rotated` or `deleted` (ids only, no key data)."""
        self._run(lambda: self._client.publish(self.channel, f"{action}:{chat_id}"))

    def subscribe(self, on_chat: Invalidation, on_gap: Callable[[], None]) -> InvalidationListener:
        listener = InvalidationListener(self._client, self.channel, on_chat, on_gap)
        listener.start()
        return listener

    def scan_values(self) -> list[str]:
        """Every value under this prefix (the leak-scan tests read the whole keyspace)."""

        def scan() -> list[str]:
            out: list[str] = []
            for key in self._client.scan_iter(f"{self.prefix}*", count=1000):
                value = self._client.get(key)
                if value is not None:
                    out.append(f"{key!s}={value!s}")
            return out

        return self._run(scan)

    def close(self) -> None:
        self._client.close()


class InvalidationListener(threading.Thread):
    """Background thread that evicts cached pointers when another process rotates or deletes.

    If the subscription drops, messages may have been missed, so `on_gap` (clear every pointer)
    runs when it comes back.
    """

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        on_chat: Invalidation,
        on_gap: Callable[[], None],
    ) -> None:
        super().__init__(name="dek-invalidation", daemon=True)
        self._client = client
        self._channel = channel
        self._on_chat = on_chat
        self._on_gap = on_gap
        self._halt = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        first = True
        while not self._halt.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                if not first:
                    self._on_gap()
                first = False
                self.subscribed.set()
                while not self._halt.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message.get("type") == "message":
                        action, _, chat = str(message["data"]).partition(":")
                        try:
                            self._on_chat(action, uuid.UUID(chat))
                        except ValueError:
                            log.warning("ignored malformed invalidation message")
            except _TRANSIENT:
                self.subscribed.clear()
                self._halt.wait(1.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001, S110 - closing a broken connection may fail
                    pass

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
