"""Redis-backed idempotency of client message ids: a retried post gets the original message id.

One key per (chat, sender, client message id): `{prefix}idem:{sha256 of the three}`. Hashing keeps
keys short and unambiguous (ids may contain ':') and keeps chat and user ids out of Redis, so a
deleted chat leaves nothing readable behind. The value is the message id only, never any text.

A claim is written *pending* (`pending:<id>`, short TTL) with one atomic `SET NX GET`, and becomes
`<id>` for 24 h once Kafka acknowledged the message. So a gateway that dies between claim and
publish cannot make the client's retry report a message that was never published, and a retry
racing the original request is told to wait (`ClaimInFlight`) instead of getting an id too early.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis
import redis.exceptions

from ingest.ports import ClaimInFlight
from sealstream.errors import StoreUnavailable
from sealstream.settings import RedisSettings

T = TypeVar("T")
TTL_SECONDS = 24 * 3600
# Longer than the publisher's delivery timeout (30 s): a live request always confirms in time.
PENDING_TTL_SECONDS = 120
_PENDING = "pending:"
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Compare-and-set / compare-and-delete: only the request holding the pending claim may finish it.
_CONFIRM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisIdempotency:
    """`ingest.ports.IdempotencyStore` on Redis (needs Redis >= 7.0 for `SET NX GET`)."""

    def __init__(
        self,
        settings: RedisSettings,
        ttl_seconds: int = TTL_SECONDS,
        pending_ttl_seconds: int = PENDING_TTL_SECONDS,
    ) -> None:
        self.prefix = settings.key_prefix
        self.ttl = ttl_seconds
        self.pending_ttl = pending_ttl_seconds
        self._client = redis.Redis.from_url(
            settings.url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self._confirm = self._client.register_script(_CONFIRM)
        self._release = self._client.register_script(_RELEASE)

    def key(self, chat_id: uuid.UUID, sender: str, client_id: str) -> str:
        material = "\0".join((str(chat_id), sender, client_id)).encode()
        return f"{self.prefix}idem:{hashlib.sha256(material).hexdigest()[:32]}"

    def _run(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"Redis unavailable: {type(exc).__name__}") from None

    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        key = self.key(chat_id, sender, client_id)
        earlier = self._run(
            lambda: self._client.set(
                key, f"{_PENDING}{message_id}", nx=True, get=True, ex=self.pending_ttl
            )
        )
        if earlier is None:
            return None
        value = str(earlier)
        if value.startswith(_PENDING):
            raise ClaimInFlight(int(value.removeprefix(_PENDING)))
        return int(value)

    def confirm(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        key = self.key(chat_id, sender, client_id)
        self._run(
            lambda: self._confirm(
                keys=[key], args=[f"{_PENDING}{message_id}", message_id, self.ttl]
            )
        )

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> None:
        key = self.key(chat_id, sender, client_id)
        self._run(lambda: self._release(keys=[key], args=[f"{_PENDING}{message_id}"]))

    def ping(self) -> None:
        self._run(self._client.ping)

    def close(self) -> None:
        self._client.close()
