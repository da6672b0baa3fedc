"""Redis-backed idempotency of client message ids: a retried post returns the original id.

Keys hold a hash of (chat, sender, client id) and the message id: no message text goes to Redis.
"""

from __future__ import annotations

import hashlib
import uuid

import redis
import redis.exceptions

from sealstream.errors import StoreUnavailable
from sealstream.settings import RedisSettings

TTL_SECONDS = 24 * 3600


class RedisIdempotency:
    def __init__(self, settings: RedisSettings, ttl_seconds: int = TTL_SECONDS) -> None:
        self.prefix = settings.key_prefix
        self.ttl = ttl_seconds
        self._client = redis.Redis.from_url(
            settings.url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True
        )

    def _key(self, chat_id: uuid.UUID, sender: str, client_id: str) -> str:
        digest = hashlib.sha256(f"{chat_id}\0{sender}\0{client_id}".encode()).hexdigest()[:32]
        return f"{self.prefix}idem:{digest}"

    def claim(self, chat_id: uuid.UUID, sender: str, client_id: str, message_id: int) -> int | None:
        key = self._key(chat_id, sender, client_id)
        try:
            if self._client.set(key, message_id, nx=True, ex=self.ttl):
                return None
            existing = self._client.get(key)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            raise StoreUnavailable("Redis unavailable for idempotency") from None
        return None if existing is None else int(existing)

    def release(self, chat_id: uuid.UUID, sender: str, client_id: str) -> None:
        try:
            self._client.delete(self._key(chat_id, sender, client_id))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            pass  # the claim expires on its own; the retry then gets a new id

    def close(self) -> None:
        self._client.close()
