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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from sealstream.adapters.kafka import segment_ms_for, topic_retention
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

__all__ = [
    "TopicKeys",
    "TopicRetention",
    "destroy_topic_keys",
    "max_clock_skew_for",
    "topic_key_context",
    "topic_key_cutoff",
]

log = logging.getLogger(__name__)

_CONTEXT_LABEL = b"sealstream/topic-key/v1:"

DEFAULT_MAX_CLOCK_SKEW_SECONDS = 420.0
"""Half the default destruction grace (15 min), which covers producers' clock skew and the
broker's retention check and delete delays (`max_clock_skew_for` derives it from settings)."""


def max_clock_skew_for(kafka: KafkaSettings) -> float:
    """How far a producer's clock may be from the database's (seconds): half of
    `topic_key_destroy_grace_ms`, at least 5 s."""
    return max(kafka.topic_key_destroy_grace_ms / 2000, 5.0)


def topic_key_context(topic: str, key_id: str) -> bytes:
    """Transit derivation context binding a wrapped topic key to its topic and key id."""
    t = topic.encode("ascii")
    k = key_id.encode("ascii")
    return _CONTEXT_LABEL + len(t).to_bytes(2, "big") + t + bytes((len(k),)) + k


class TopicKeys:
    """The `TopicKeySource` of `sealstream.record_seal` on Postgres + the KMS.

    `clock`: Unix seconds (wall clock: producers on different hosts must agree on the slot,
    which a monotonic clock would not give). `max_clock_skew_seconds`: how far `clock` may be
    from the database's (whose clock `destroy_topic_keys` runs on) when a slot's key is loaded;
    further off, `current` raises the retriable `StoreUnavailable` instead of sealing under a
    key that would be destroyed while records it sealed are still read (a clock behind), or
    kept past its records (ahead). None: no check (tests of far slots only)."""

    def __init__(
        self,
        repo: TopicKeyRepository,
        kms: Kms,
        kms_key_name: str,
        rotation_seconds: int,
        cache_seconds: float,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
        max_clock_skew_seconds: float | None = DEFAULT_MAX_CLOCK_SKEW_SECONDS,
    ) -> None:
        if rotation_seconds < 1:
            raise ValueError("rotation_seconds must be at least 1")
        self.max_clock_skew_seconds = max_clock_skew_seconds
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

    def _check_clock(self) -> None:
        """StoreUnavailable when this process's clock is further from the database's than
        `max_clock_skew_seconds` (one Postgres round trip, once per slot's key loaded)."""
        if self.max_clock_skew_seconds is None:
            return
        skew = self._clock() - self.repo.db_now().timestamp()
        if abs(skew) > self.max_clock_skew_seconds:
            log.error(
                "clock too far from the database's: not sealing",
                extra={"skew_seconds": round(skew, 1), "max": self.max_clock_skew_seconds},
            )
            raise StoreUnavailable(
                f"this host's clock is {skew:+.0f} s off the database's (more than "
                f"{self.max_clock_skew_seconds:.0f} s): its topic key slot would be wrong, so "
                "nothing is sealed until its time is synchronised"
            )

    def _load_slot(self, topic: str, start_ms: int) -> TopicKey:
        self._check_clock()
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


def topic_key_cutoff(
    kafka: KafkaSettings,
    now: datetime,
    broker_retention_ms: int | None = None,
    broker_segment_ms: int | None = None,
) -> datetime:
    """Topic keys whose slot ended before this instant have no record left in the topic.

    Kafka deletes a segment once its newest record is past `retention_ms`, and a segment rolls
    every `segment_ms_for(retention_ms)`, so a record sealed at the end of a slot is on disk
    until slot end + retention + segment roll; `topic_key_destroy_grace_ms` covers producers'
    clock skew and the broker's retention check and delete delays. `broker_retention_ms` /
    `broker_segment_ms`: the topic's as the broker applies them, when known; the longer of
    those and the settings' counts (an operator may raise a retention on the broker alone)."""
    retention_ms = max(kafka.retention_ms, broker_retention_ms or 0)
    segment_ms = max(segment_ms_for(kafka.retention_ms), broker_segment_ms or 0)
    keep_ms = retention_ms + segment_ms + kafka.topic_key_destroy_grace_ms
    return now - timedelta(milliseconds=keep_ms)


TopicRetention = Callable[[Sequence[str]], Mapping[str, tuple[int, int]]]
"""(retention.ms, segment.ms) per topic as the broker applies them (`topic_retention`)."""


def destroy_topic_keys(
    repo: TopicKeyRepository,
    kafka: KafkaSettings,
    actor: str,
    now: datetime | None = None,
    broker: TopicRetention | None = None,
    topics: Sequence[str] | None = None,
) -> list[str]:
    """Destroy (erase the wrapped key of) every topic key past its topic's `topic_key_cutoff`,
    audited as `topic_keys_destroyed` in the same transaction; returns the key ids destroyed.

    The cut-off of each topic takes the longer of the settings' retention and the one the broker
    applies to that topic (`broker`: `sealstream.adapters.kafka.topic_retention` unless given),
    so no key goes while Kafka may still serve a record it sealed; a topic the broker keeps
    forever (retention -1) keeps its keys (logged). `now`: the database's clock unless given.
    Records sealed under a destroyed key can never be opened again, from Kafka or from any
    backup of it. `topics`: only the keys of these topics (the admin API passes the message
    topic, the only one its Kafka principal may describe); None: every topic with live keys (the
    operator's command). Raises `StoreUnavailable` when Postgres or Kafka does not answer, or
    the process's principal may not read a topic's config (then nothing is destroyed)."""
    at = now if now is not None else repo.db_now()
    live = repo.live_topics()
    wanted = live if topics is None else [t for t in live if t in set(topics)]
    if not wanted:
        return []
    configs = (broker or (lambda names: topic_retention(kafka, names)))(wanted)
    destroyed: list[str] = []
    for topic in wanted:
        retention_ms, segment_ms = configs.get(topic, (None, None))
        if retention_ms is not None and retention_ms < 0:
            log.warning(
                "topic keys kept: the broker keeps this topic's records forever",
                extra={"topic": topic},
            )
            continue
        cutoff = topic_key_cutoff(kafka, at, retention_ms, segment_ms)
        destroyed += repo.destroy_ended_before(
            cutoff,
            AuditRecord(
                actor=actor,
                action="topic_keys_destroyed",
                reason=f"slot ended before {cutoff.isoformat()} (retention + segment roll + "
                "grace; the longer of the settings' and the broker's)",
            ),
            topic=topic,
        )
    if destroyed:
        log.info("topic keys destroyed", extra={"count": len(destroyed)})
    return sorted(destroyed)
