"""The key service: chat DEKs for encryption (current version) and decryption (by version).

Lookup order for a DEK, cheapest first:
  1. the in-process cache of plaintext DEKs (bounded in size and age; memory only);
  2. the wrapped DEK from Redis, else from Postgres (the source of truth), then one KMS unwrap.
The current-version pointer of a chat follows the same path (in-process, Redis, Postgres) and is
evicted in every process by a Redis pub/sub message when a chat is rotated or deleted.

Plaintext DEKs exist only in this process's memory: Redis and Postgres hold Transit ciphertexts.
"""

from __future__ import annotations

import copy
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sealstream.adapters.postgres import AuditRecord, ChatKeyRepository, ChatRow, DekRow
from sealstream.adapters.redis import InvalidationListener, RedisKeyCache, WrappedDek
from sealstream.crypto import ChatKey
from sealstream.errors import (
    KeyDestroyed,
    KeyNotFound,
    KmsError,
    SealstreamError,
    StoreUnavailable,
)
from sealstream.keys.cache import TtlCache
from sealstream.keys.ports import Kms
from sealstream.keys.router import KmsRouter
from sealstream.metrics import DEK_CACHE
from sealstream.settings import KeyCacheSettings

log = logging.getLogger(__name__)

_KMS_CONTEXT = struct.Struct(">16sI")
_KMS_CONTEXT_LABEL = b"sealstream/dek/v1:"


def kms_context(chat_id: uuid.UUID, version: int) -> bytes:
    """Transit derivation context binding a wrapped DEK to its chat and version (docs/format.md)."""
    return _KMS_CONTEXT_LABEL + _KMS_CONTEXT.pack(chat_id.bytes, version)


@dataclass
class KeyStats:
    """Per-service counters (also exported to Prometheus via sealstream.metrics)."""

    local_hits: int = 0
    redis_hits: int = 0
    postgres_reads: int = 0
    kms_unwraps: int = 0
    kms_generates: int = 0
    lookup_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


class KeyService:
    def __init__(
        self,
        repo: ChatKeyRepository,
        kms: Kms,
        redis: RedisKeyCache | None,
        settings: KeyCacheSettings,
        default_kms_key: str,
        actor: str = "sealstream",
    ) -> None:
        self.repo = repo
        self.actor = actor  # recorded in the audit trail for operations this process makes
        self.kms = kms
        self.redis = redis
        self.settings = settings
        self.default_kms_key = default_kms_key
        self.stats = KeyStats()
        self._deks: TtlCache[tuple[uuid.UUID, int], ChatKey] = TtlCache(
            settings.max_entries, settings.ttl_seconds
        )
        self._pointers: TtlCache[uuid.UUID, int] = TtlCache(
            settings.max_entries, settings.pointer_ttl_seconds
        )
        self._listener: InvalidationListener | None = None
        # Other caches of this process keyed by chat (e.g. the reader's chat directory).
        self._on_invalidation: list[Callable[[str, uuid.UUID], None]] = []
        # Bound once: looking a labelled counter up costs ~2 µs, too much for every message.
        self._local_hit = DEK_CACHE.labels(layer="local")
        self._redis_hit = DEK_CACHE.labels(layer="redis")
        self._postgres_read = DEK_CACHE.labels(layer="postgres")

    def as_actor(self, actor: str) -> KeyService:
        """This service (same caches, same connections) recording `actor` in the audit trail,
        e.g. the operator behind an admin request. Close only the original."""
        other = copy.copy(self)
        other.actor = actor
        return other

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Register the default tenant and listen for invalidations from other processes."""
        self.register_tenant(self.settings.default_tenant, self.default_kms_key)
        if self.redis is not None and self._listener is None:
            self._listener = self.redis.subscribe(self._evict_chat, self._pointers.clear)
            self._listener.subscribed.wait(timeout=5)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self._deks.clear()
        self._pointers.clear()

    def _evict_chat(self, action: str, chat_id: uuid.UUID) -> None:
        """Invalidation from any process (ourselves included): a rotation moves the pointer; a
        deletion (`deleted`) or retention (`retired`) drops every plaintext DEK of the chat."""
        self._pointers.pop(chat_id)
        if action != "rotated":
            self._deks.discard(lambda k: k[0] == chat_id)
        for callback in self._on_invalidation:
            callback(action, chat_id)

    def on_invalidation(self, callback: Callable[[str, uuid.UUID], None]) -> None:
        """Call `callback(action, chat_id)` whenever a chat is rotated, deleted or retired in
        any process, so that other per-process caches can drop what they hold about it."""
        self._on_invalidation.append(callback)

    # --- tenants and chats -----------------------------------------------------------------------

    def register_tenant(self, tenant_id: str, kms_key_name: str, region: str | None = None) -> None:
        """Register or update a tenant; its master key is created on the KMS of `region` (None:
        the default KMS) if missing. A tenant never moves region and a key name belongs to one
        region, since wrapped DEKs unwrap only where their master key lives."""
        current = self.repo.tenant(tenant_id)
        others = self.repo.tenants_with_key(kms_key_name)
        for row in ([current] if current else []) + others:
            if row.region != region:
                raise KmsError(
                    f"tenant '{row.tenant_id}' (key '{row.kms_key_name}') is in region "
                    f"'{row.region or 'default'}', not '{region or 'default'}': moving a tenant or "
                    "a master key between KMS clusters is not supported"
                )
        self.kms_for(region, tenant_id).ensure_key(kms_key_name)
        self.repo.upsert_tenant(
            tenant_id,
            kms_key_name,
            region,
            AuditRecord(
                self.actor,
                "tenant_key_set",
                f"tenant {tenant_id}: master key {kms_key_name}, region {region or 'default'}",
            ),
        )

    def set_retention(
        self, days: int | None, tenant_id: str | None = None, chat_id: uuid.UUID | None = None
    ) -> None:
        """Set (or clear, with None) a tenant's or one chat's retention period, audited."""
        scope = f"chat {chat_id}" if chat_id is not None else f"tenant {tenant_id}"
        self.repo.set_retention(
            days,
            tenant_id,
            chat_id,
            AuditRecord(self.actor, "retention_set", f"{scope}: {days} days"),
        )

    def set_participant(
        self, chat_id: uuid.UUID, user_id: str, present: bool, reason: str = "admin request"
    ) -> tuple[ChatRow, bool] | None:
        """Add (`present`) or remove one participant, audited (`participant_added` /
        `participant_removed`) and announced to live delivery (NOTIFY), in one transaction.
        Returns the chat after it and whether it changed; None for an unknown chat."""
        action = "participant_added" if present else "participant_removed"
        return self.repo.set_participant(
            chat_id, user_id, present, AuditRecord(self.actor, action, f"user {user_id}: {reason}")
        )

    def kms_for(self, region: str | None, tenant_id: str) -> Kms:
        """The KMS holding the master keys of `region` (None: the default one)."""
        if isinstance(self.kms, KmsRouter):
            return self.kms.at(region, tenant_id)
        if region is not None:
            raise KmsError(
                f"tenant '{tenant_id}' needs region '{region}' but this service has one KMS"
            )
        return self.kms

    def create_chat(
        self, chat_id: uuid.UUID, participants: tuple[str, ...], tenant_id: str | None = None
    ) -> ChatRow:
        """Create the chat with DEK version 1 (idempotent: an existing chat is returned as is)."""
        existing = self.repo.chat(chat_id)
        if existing is not None:
            return existing
        tenant = tenant_id or self.settings.default_tenant
        key_name = self.repo.tenant_key_name(tenant)
        if key_name is None:
            raise KeyNotFound(f"unknown tenant '{tenant}'")
        data_key = self.kms.generate_data_key(key_name, kms_context(chat_id, 1))
        self.stats.add("kms_generates")
        created = self.repo.create_chat(
            chat_id,
            tenant,
            participants,
            data_key.wrapped,
            key_name,
            AuditRecord(self.actor, "dek_created", "chat created"),
        )
        if created:
            # We hold the plaintext already: the chat's first message needs no unwrap.
            self._deks.put((chat_id, 1), ChatKey(version=1, material=data_key.plaintext))
            self._pointers.put(chat_id, 1)
        chat = self.repo.chat(chat_id)
        assert chat is not None
        return chat

    def chat(self, chat_id: uuid.UUID) -> ChatRow | None:
        return self.repo.chat(chat_id)

    # --- DEKs ------------------------------------------------------------------------------------

    def current_key(self, chat_id: uuid.UUID) -> ChatKey:
        """The DEK new messages of this chat are sealed with."""
        started = time.perf_counter()
        try:
            version = self._pointers.get(chat_id)
            if version is None:
                version = self.current_version(chat_id)
            return self.key(chat_id, version, _timed=False)
        finally:
            self.stats.add("lookup_seconds", time.perf_counter() - started)

    def current_version(self, chat_id: uuid.UUID) -> int:
        version, _ = self._pointers.get_or_load(chat_id, lambda: self._load_pointer(chat_id))
        return version

    def _load_pointer(self, chat_id: uuid.UUID) -> int:
        if self.redis is not None:
            try:
                cached = self.redis.current_version(chat_id)
                if cached is not None:
                    return cached
            except StoreUnavailable:
                log.warning("redis unavailable, reading the DEK pointer from postgres")
        row = self.repo.active_dek(chat_id)
        self.stats.add("postgres_reads")
        self._postgres_read.inc()
        if row is None:
            raise self._missing(chat_id)
        self._remember(row)
        if row.encrypted_dek is not None:
            # The row holds the wrapped DEK too: unwrap it now rather than fetch it again.
            wrapped = WrappedDek(row.encrypted_dek, row.kms_key_name)
            self._deks.get_or_load(
                (chat_id, row.dek_version), lambda: self._unwrap(chat_id, row.dek_version, wrapped)
            )
        return row.dek_version

    def _missing(self, chat_id: uuid.UUID) -> KeyNotFound | KeyDestroyed:
        chat = self.repo.chat(chat_id)
        if chat is not None and chat.state == "deleted":
            return KeyDestroyed(f"chat {chat_id} was deleted and its keys destroyed")
        return KeyNotFound(f"no active DEK for chat {chat_id}")

    def _remember(self, row: DekRow) -> None:
        if self.redis is None or row.encrypted_dek is None:
            return
        try:
            self.redis.set_wrapped(
                row.chat_id, row.dek_version, WrappedDek(row.encrypted_dek, row.kms_key_name)
            )
            if row.state == "active":
                self.redis.set_current_version(row.chat_id, row.dek_version)
        except StoreUnavailable:
            log.warning("redis unavailable, DEK pointer not shared")
            return
        # The row was read before this write: a shred (or retention) that destroyed the version
        # in between has already cleared Redis, so the write above would keep a wrapped DEK of a
        # deleted chat there for the cache TTL. Look again after writing and take it back; a
        # destruction committing after this look clears Redis itself. One read per cache fill.
        fresh = self.repo.dek(row.chat_id, row.dek_version)
        if fresh is None or fresh.encrypted_dek is None:
            if row.state == "active" or fresh is None:
                self.redis.forget_chat(row.chat_id)  # raises if Redis is down: the caller retries
            else:
                self.redis.forget_versions(row.chat_id, [row.dek_version])
            raise KeyDestroyed(f"DEK version {row.dek_version} of chat {row.chat_id} was destroyed")

    def key(self, chat_id: uuid.UUID, version: int, _timed: bool = True) -> ChatKey:
        """The DEK of a given version, e.g. to open an old message."""
        started = time.perf_counter()
        try:
            cached = self._deks.get((chat_id, version))
            if cached is not None:
                self.stats.local_hits += 1  # approximate under threads; fine for a hit counter
                self._local_hit.inc()
                return cached
            key, _ = self._deks.get_or_load(
                (chat_id, version), lambda: self._load_key(chat_id, version)
            )
            return key
        finally:
            if _timed:
                self.stats.add("lookup_seconds", time.perf_counter() - started)

    def _load_key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
        wrapped: WrappedDek | None = None
        if self.redis is not None:
            try:
                wrapped = self.redis.wrapped(chat_id, version)
            except StoreUnavailable:
                log.warning("redis unavailable, reading the wrapped DEK from postgres")
        if wrapped is not None:
            self.stats.add("redis_hits")
            self._redis_hit.inc()
        else:
            row = self.repo.dek(chat_id, version)
            self.stats.add("postgres_reads")
            self._postgres_read.inc()
            if row is None:
                raise KeyNotFound(f"chat {chat_id} has no DEK version {version}")
            if row.encrypted_dek is None:
                raise KeyDestroyed(f"DEK version {version} of chat {chat_id} was destroyed")
            wrapped = WrappedDek(row.encrypted_dek, row.kms_key_name)
            self._remember(row)
        return self._unwrap(chat_id, version, wrapped)

    def _unwrap(self, chat_id: uuid.UUID, version: int, wrapped: WrappedDek) -> ChatKey:
        material = self.kms.unwrap(
            wrapped.kms_key_name, wrapped.wrapped, kms_context(chat_id, version)
        )
        self.stats.add("kms_unwraps")
        self.repo.audit(self.actor, "dek_unwrapped", chat_id, version, "cache miss")
        return ChatKey(version=version, material=material)

    # --- rotation ------------------------------------------------------------------------------

    def rotate(
        self, chat_id: uuid.UUID, reason: str = "on demand", only_if_version: int | None = None
    ) -> int:
        """Make a new active DEK version; old versions stay for reading history.

        Concurrent rotations of one chat create exactly one version (the database row lock
        decides); the loser's freshly generated DEK is simply never stored. With
        `only_if_version`, nothing happens unless that version is still the active one (policy
        rotations by several workers then rotate a chat once, not once per worker).
        """
        chat = self.repo.chat(chat_id)
        if chat is None:
            raise KeyNotFound(f"chat {chat_id} does not exist")
        current = self.repo.active_dek(chat_id)
        if current is None:
            raise self._missing(chat_id)
        if only_if_version is not None and current.dek_version != only_if_version:
            return current.dek_version
        key_name = self.repo.tenant_key_name(chat.tenant_id) or current.kms_key_name
        new_version = current.dek_version + 1
        data_key = self.kms.generate_data_key(key_name, kms_context(chat_id, new_version))
        self.stats.add("kms_generates")
        version = self.repo.add_version(
            chat_id,
            current.dek_version,
            new_version,
            data_key.wrapped,
            key_name,
            AuditRecord(self.actor, "dek_rotated", reason),
        )
        if version == new_version:
            # Seed our own cache with the key we already hold in plaintext: no unwrap needed.
            self._deks.put(
                (chat_id, version), ChatKey(version=version, material=data_key.plaintext)
            )
        self._pointers.put(chat_id, version)
        self._announce("rotated", chat_id, version)
        return version

    def record_usage(self, counts: dict[tuple[uuid.UUID, int], int]) -> list[uuid.UUID]:
        """Count messages sealed per (chat, version); rotate chats past the message limit.

        Called by the encryptor after each written batch. Returns the chats it rotated.
        """
        totals = self.repo.add_usage(counts)
        limit = self.settings.rotate_max_messages
        rotated: list[uuid.UUID] = []
        if limit is None:
            return rotated
        for chat_id, version, total in totals:
            if total < limit:
                continue
            reason = f"policy: {total} messages sealed with version {version} (max {limit})"
            try:
                if self.rotate(chat_id, reason, only_if_version=version) != version:
                    rotated.append(chat_id)
            except SealstreamError as exc:
                # The batch is written: a KMS or database hiccup must not hold it for retries.
                # The chat stays over the limit, so the next batch or `keys rotate-due` rotates it.
                log.warning(
                    "policy rotation deferred",
                    extra={"chat_id": str(chat_id), "error": type(exc).__name__},
                )
        return rotated

    # --- deletion -------------------------------------------------------------------------------

    def delete_chat(self, chat_id: uuid.UUID, reason: str) -> list[int]:
        """Crypto-shred a chat: destroy every DEK version and evict it from every process.

        Once this returns, no wrapped DEK of the chat exists in Postgres or Redis, so its envelopes
        can never be opened again, even with full access to the KMS, Postgres and Redis. Other
        processes drop their in-memory copies when the `deleted:` invalidation reaches them.
        """
        destroyed = self.repo.shred_chat(chat_id, AuditRecord(self.actor, "chat_shredded", reason))
        self._evict_chat("deleted", chat_id)
        if self.redis is not None:
            self.redis.forget_chat(chat_id)  # raises if Redis is down: the caller must retry
        self._announce("deleted", chat_id, None)
        return destroyed

    def destroy_retired(
        self,
        chat_id: uuid.UUID,
        cutoff: datetime,
        action: str,
        reason: str,
        below_version: int | None = None,
        audit_if_none: bool = True,
    ) -> list[int]:
        """Destroy the chat's retired DEK versions whose validity ended before `cutoff`
        (optionally only below `below_version`), audited as `action` in the same transaction,
        and forget them in every process. Returns the versions destroyed."""
        destroyed = self.repo.destroy_versions_retired_before(
            chat_id,
            cutoff,
            below_version,
            AuditRecord(self.actor, action, reason),
            audit_if_none=audit_if_none,
        )
        if destroyed:
            self.drop_versions(chat_id, destroyed)
        return destroyed

    def drop_versions(self, chat_id: uuid.UUID, versions: list[int]) -> None:
        """Forget destroyed versions of a chat here and in Redis (retention)."""
        for version in versions:
            self._deks.pop((chat_id, version))
        if self.redis is not None:
            self.redis.forget_versions(chat_id, versions)
        self._announce("retired", chat_id, None)

    def _announce(self, action: str, chat_id: uuid.UUID, version: int | None) -> None:
        if self.redis is None:
            return
        try:
            if version is not None:
                self.redis.set_current_version(chat_id, version)
            self.redis.publish_invalidation(action, chat_id)
        except StoreUnavailable:
            log.warning(
                "redis unavailable: other processes pick up the rotation of a chat within "
                "pointer_ttl_seconds instead of at once"
            )
