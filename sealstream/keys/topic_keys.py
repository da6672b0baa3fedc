"""Topic data keys of the sealed message topic: made by the KMS, stored wrapped in Postgres, used
in memory only, destroyed once the topic's retention is past them.

One key per topic per rotation slot (`kafka.topic_key_rotation_seconds`, an hour by default):
the first producer to need a slot's key asks the KMS for a Transit data key under the default
master key, with the derivation context ``sealstream/topic-key/v1:`` || topic || key id (so a
wrapped key copied to another topic or id does not unwrap), and stores it with
``INSERT ... ON CONFLICT (topic, valid_from) DO NOTHING``; every producer then reads the slot's
row back, so all gateways of a topic seal with the same key. Consumers look keys up by id.

Plaintext keys live only in this process (bounded TTL caches): never in Redis, which would put
them next to a second copy of the wrapped ones, never in a log line or an exception (the
`TopicKey` repr is redacted).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sealstream.adapters.kafka import segment_ms_for
from sealstream.adapters.postgres import AuditRecord, TopicKeyRepository, TopicKeyRow
from sealstream.errors import (
    KmsError,
    KmsKeyUnusable,
    KmsUnavailable,
    SealRefused,
    StoreUnavailable,
)
from sealstream.keys.cache import TtlCache
from sealstream.keys.ports import Kms
from sealstream.record_seal import HEADER_KEY_ID, TopicKey
from sealstream.settings import KafkaSettings

__all__ = ["TopicKeys", "destroy_topic_keys", "topic_key_context", "topic_key_cutoff"]

log = logging.getLogger(__name__)

_CONTEXT_LABEL = b"sealstream/topic-key/v1:"


def topic_key_context(topic: str, key_id: str) -> bytes:
    """Transit derivation context binding a wrapped topic key to its topic and key id."""
    t = topic.encode("ascii")
    k = key_id.encode("ascii")
    return _CONTEXT_LABEL + len(t).to_bytes(2, "big") + t + bytes((len(k),)) + k


class TopicKeys:
    """The `TopicKeySource` of `sealstream.record_seal` on Postgres + the KMS.

    `clock`: Unix seconds (wall clock: producers on different hosts must agree on the slot,
    which a monotonic clock would not give)."""

    def __init__(
        self,
        repo: TopicKeyRepository,
        kms: Kms,
        kms_key_name: str,
        rotation_seconds: int,
        cache_seconds: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
    ) -> None:
        if rotation_seconds < 1:
            raise ValueError("rotation_seconds must be at least 1")
        self.repo = repo
        self.kms = kms
        self.kms_key_name = kms_key_name
        self.rotation_ms = rotation_seconds * 1000
        self._clock = clock
        # The current slot's key, by (topic, slot start in ms): a new slot is a new cache key.
        self._current: TtlCache[tuple[str, int], TopicKey] = TtlCache(1000, float(rotation_seconds))
        self._by_id: TtlCache[str, TopicKey] = TtlCache(max_entries, cache_seconds)

    def _slot(self) -> int:
        now_ms = int(self._clock() * 1000)
        return now_ms - now_ms % self.rotation_ms

    def has_current(self, topic: str) -> bool:
        return self._current.get((topic, self._slot())) is not None

    def current(self, topic: str) -> TopicKey:
        start = self._slot()
        key, _ = self._current.get_or_load((topic, start), lambda: self._load_slot(topic, start))
        return key

    def _load_slot(self, topic: str, start_ms: int) -> TopicKey:
        valid_from = datetime.fromtimestamp(start_ms / 1000, UTC)
        row = self.repo.for_slot(topic, valid_from)
        if row is None:
            key_id = uuid.uuid4().hex
            try:
                data = self.kms.generate_data_key(
                    self.kms_key_name, topic_key_context(topic, key_id)
                )
            except (KmsError, KmsUnavailable) as exc:
                raise StoreUnavailable(f"no topic key: {exc}") from None
            candidate = TopicKeyRow(
                key_id=key_id,
                topic=topic,
                valid_from=valid_from,
                valid_to=valid_from + timedelta(milliseconds=self.rotation_ms),
                kms_key_name=self.kms_key_name,
                wrapped=data.wrapped,
                destroyed_at=None,
            )
            row = self.repo.claim_slot(candidate)
            if row.key_id == key_id:
                key = TopicKey(key_id, topic, data.plaintext)
                self._by_id.put(key_id, key)
                log.info("topic key made", extra={"topic": topic, "key_id": key_id})
                return key
            # Another producer stored the slot's key first: use theirs, drop ours (never stored).
        return self._unwrap(topic, row, refuse=StoreUnavailable)

    def by_id(self, topic: str, key_id: str) -> TopicKey:
        key, _ = self._by_id.get_or_load(key_id, lambda: self._load_id(topic, key_id))
        if key.topic != topic:
            raise SealRefused(f"header {HEADER_KEY_ID}: names a key of another topic")
        return key

    def _load_id(self, topic: str, key_id: str) -> TopicKey:
        row = self.repo.by_id(key_id)
        if row is None:
            raise SealRefused(f"header {HEADER_KEY_ID}: no such topic key")
        if row.topic != topic:
            raise SealRefused(f"header {HEADER_KEY_ID}: names a key of another topic")
        if row.wrapped is None:
            raise SealRefused(
                f"header {HEADER_KEY_ID}: the topic key was destroyed (the record is past the "
                "topic's retention: crypto-shredded)"
            )
        return self._unwrap(topic, row, refuse=SealRefused)

    def _unwrap(
        self, topic: str, row: TopicKeyRow, refuse: type[SealRefused] | type[StoreUnavailable]
    ) -> TopicKey:
        if row.wrapped is None:
            raise refuse(f"header {HEADER_KEY_ID}: the topic key was destroyed")
        try:
            material = self.kms.unwrap(
                row.kms_key_name, row.wrapped, topic_key_context(topic, row.key_id)
            )
        except KmsKeyUnusable:
            raise refuse(
                f"header {HEADER_KEY_ID}: the KMS refuses to unwrap this topic key"
            ) from None
        except (KmsError, KmsUnavailable) as exc:
            raise StoreUnavailable(f"topic key not unwrapped: {exc}") from None
        return TopicKey(row.key_id, topic, material)

    def forget(self) -> None:
        """Drop every cached key (tests; after destroying keys in this process)."""
        self._current.clear()
        self._by_id.clear()


def topic_key_cutoff(kafka: KafkaSettings, now: datetime) -> datetime:
    """Topic keys whose slot ended before this instant have no record left in the topic.

    Kafka deletes a segment once its newest record is past `retention_ms`, and a segment rolls
    every `segment_ms_for(retention_ms)`, so a record sealed at the end of a slot is on disk
    until slot end + retention + segment roll; `topic_key_destroy_grace_ms` covers producers'
    clock skew and the broker's retention check and delete delays."""
    keep_ms = (
        kafka.retention_ms + segment_ms_for(kafka.retention_ms) + kafka.topic_key_destroy_grace_ms
    )
    return now - timedelta(milliseconds=keep_ms)


def destroy_topic_keys(
    repo: TopicKeyRepository,
    kafka: KafkaSettings,
    actor: str,
    now: datetime | None = None,
) -> list[str]:
    """Destroy (erase the wrapped key of) every topic key past `topic_key_cutoff`, audited as
    `topic_keys_destroyed` in the same transaction; returns the key ids destroyed. `now`: the
    database's clock unless given. Records sealed under them can never be opened again, from
    Kafka or from any backup of it. Raises `StoreUnavailable` when Postgres does not answer."""
    at = now if now is not None else repo.db_now()
    cutoff = topic_key_cutoff(kafka, at)
    destroyed = repo.destroy_ended_before(
        cutoff,
        AuditRecord(
            actor=actor,
            action="topic_keys_destroyed",
            reason=f"slot ended before {cutoff.isoformat()} (retention + segment roll + grace)",
        ),
    )
    if destroyed:
        log.info("topic keys destroyed", extra={"count": len(destroyed)})
    return destroyed
