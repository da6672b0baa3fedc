"""Per-tenant blind-index keys: made by the KMS, stored wrapped in Postgres, used in memory only.

A tenant with the blind index on has one *active* index-key version (the indexer keys new
documents with it) and, while a re-index under a newer version runs, *retiring* ones (queries
still match documents keyed with them). A key is a Transit data key generated under the
tenant's master key with the context `sealstream/index-key/v1:` || tenant || version, so a
wrapped key copied to another tenant or version does not unwrap. The plaintext lives only in
this process's memory (bounded TTL cache, like chat DEKs); never in Redis, which would put it
next to the index it protects in a single leak, and never in a log line or an exception
(`IndexKey`'s repr is redacted).

Changes of a tenant's keys (on, rotation) reach other processes within `ttl_seconds` (the
cache of the tenant's key list); the re-index waits twice that before its final sweep
(sealstream/search_reindex.py), so every indexer keys with the new version by then.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sealstream.adapters.postgres import (
    AuditRecord,
    ChatKeyRepository,
    IndexKeyRepository,
    IndexKeyRow,
)
from sealstream.crypto import IndexKey, keyed_term
from sealstream.errors import KeyDestroyed, KeyNotFound
from sealstream.keys.cache import TtlCache
from sealstream.keys.ports import Kms
from sealstream.tokens import marked

__all__ = ["IndexKey", "IndexKeys", "KeyedWord", "TenantIndex", "index_key_context"]

log = logging.getLogger(__name__)

_CONTEXT_LABEL = b"sealstream/index-key/v1:"
_VERSION = struct.Struct(">I")


def index_key_context(tenant_id: str, version: int) -> bytes:
    """Transit derivation context binding a wrapped index key to its tenant and version."""
    tenant = tenant_id.encode("utf-8")
    return _CONTEXT_LABEL + struct.pack(">H", len(tenant)) + tenant + _VERSION.pack(version)


@dataclass(frozen=True)
class TenantIndex:
    """What a tenant's search terms look like right now.

    `mode`: 'off' (plain words), 'enabling' (keyed, but documents indexed before are still
    being re-indexed: queries also use plain words), 'on' (keyed only). `current`: the version
    new documents are keyed with (None when off); `live`: versions queries use, newest first."""

    mode: str
    current: int | None
    live: tuple[int, ...]
    rows: tuple[IndexKeyRow, ...] = ()


@dataclass(frozen=True)
class KeyedWord:
    """One query word of a blind tenant: the `WordMatch` parts (SEARCH_CONTRACT.md) — a document
    matches when it holds any of `any_of`; `exact` only raises the score."""

    any_of: list[str]
    exact: list[str]


class IndexKeys:
    """Index keys of every tenant, for the indexer, the reader and the re-index job."""

    def __init__(
        self,
        repo: IndexKeyRepository,
        chats: ChatKeyRepository,
        kms: Kms,
        ttl_seconds: float = 30.0,
        key_ttl_seconds: float = 300.0,
        max_entries: int = 10_000,
        actor: str = "sealstream",
    ) -> None:
        self.repo = repo
        self.chats = chats
        self.kms = kms
        self.ttl_seconds = ttl_seconds
        self.actor = actor
        self._tenants: TtlCache[str, TenantIndex] = TtlCache(max_entries, ttl_seconds)
        self._keys: TtlCache[tuple[str, int], IndexKey] = TtlCache(max_entries, key_ttl_seconds)
        self._chat_tenants: TtlCache[uuid.UUID, str] = TtlCache(100_000, 3600.0)

    def as_actor(self, actor: str) -> IndexKeys:
        other = IndexKeys.__new__(IndexKeys)
        other.__dict__.update(self.__dict__)
        other.actor = actor
        return other

    # --- reading --------------------------------------------------------------------------------

    def tenant(self, tenant_id: str) -> TenantIndex:
        """The tenant's mode and key versions (cached `ttl_seconds`); an unknown tenant is 'off'."""
        state, _ = self._tenants.get_or_load(tenant_id, lambda: self._load_tenant(tenant_id))
        return state

    def _load_tenant(self, tenant_id: str) -> TenantIndex:
        mode = self.repo.mode(tenant_id) or "off"
        if mode == "off":
            return TenantIndex("off", None, ())
        rows = tuple(self.repo.keys(tenant_id))
        live = tuple(r.key_version for r in rows if r.state in ("active", "retiring"))
        current = next((r.key_version for r in rows if r.state == "active"), None)
        return TenantIndex(mode, current, live, rows)

    def current(self, tenant_id: str) -> IndexKey | None:
        """The key new documents of the tenant are keyed with; None: a plain tenant.

        Raises `KmsUnavailable` (retriable) when the key must be unwrapped and the KMS is down."""
        _, keys = self._fresh(tenant_id, lambda s: () if s.current is None else (s.current,))
        return keys[0] if keys else None

    def live(self, tenant_id: str) -> list[IndexKey]:
        """Every version queries must use (active and retiring), newest first; [] when plain."""
        return self._fresh(tenant_id, lambda s: s.live)[1]

    def _fresh(
        self, tenant_id: str, versions: Callable[[TenantIndex], Sequence[int]]
    ) -> tuple[TenantIndex, list[IndexKey]]:
        """The tenant's state and the keys of `versions(state)`. The cached state may be older
        than the keys' states (`ttl_seconds` against `key_ttl_seconds`): when a version it names
        was destroyed since (a finished re-index) and is no longer in memory, the state is read
        again, once, instead of failing with `KeyDestroyed` (a reader would answer 410)."""
        state = self.tenant(tenant_id)
        try:
            return state, [self.key(tenant_id, v) for v in versions(state)]
        except KeyDestroyed:
            self._tenants.pop(tenant_id)
            state = self.tenant(tenant_id)
            return state, [self.key(tenant_id, v) for v in versions(state)]

    def key(self, tenant_id: str, version: int) -> IndexKey:
        """One version's key, unwrapped by the KMS on first use and then kept in memory."""
        cached = self._keys.get((tenant_id, version))
        if cached is not None:
            return cached
        key, _ = self._keys.get_or_load(
            (tenant_id, version), lambda: self._unwrap(tenant_id, version)
        )
        return key

    def _unwrap(self, tenant_id: str, version: int) -> IndexKey:
        row = next((r for r in self.repo.keys(tenant_id) if r.key_version == version), None)
        if row is None:
            raise KeyNotFound(f"tenant '{tenant_id}' has no index key version {version}")
        if row.wrapped_key is None:
            raise KeyDestroyed(f"index key version {version} of tenant '{tenant_id}' destroyed")
        material = self.kms.unwrap(
            row.kms_key_name, row.wrapped_key, index_key_context(tenant_id, version)
        )
        self.chats.audit(
            self.actor, "index_key_unwrapped", None, version, f"tenant {tenant_id}: cache miss"
        )
        return IndexKey(tenant_id, version, material)

    def tenants_of(self, chat_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        """The tenant of each chat known to Postgres (cached for good: chats never move)."""
        found: dict[uuid.UUID, str] = {}
        missing = []
        for chat_id in chat_ids:
            tenant = self._chat_tenants.get(chat_id)
            if tenant is None:
                missing.append(chat_id)
            else:
                found[chat_id] = tenant
        if missing:
            for chat_id, tenant in self.repo.chat_tenants(missing).items():
                self._chat_tenants.put(chat_id, tenant)
                found[chat_id] = tenant
        return found

    # --- terms ----------------------------------------------------------------------------------

    def document_tokens(self, tenant_id: str, terms: list[str]) -> tuple[list[str], int | None]:
        """A document's index terms as stored: keyed under the tenant's current key (sorted and
        distinct) with that version, or the terms themselves with None for a plain tenant."""
        key = self.current(tenant_id)
        if key is None:
            return terms, None
        return keyed_terms(key, terms), key.version

    def query_word(self, tenant_id: str, term: str, folded: str) -> KeyedWord | None:
        """One query word of a tenant as keyed terms under every live key version (None: a
        plain tenant). While the tenant is being switched on, the plain words are included
        too, since documents indexed before are re-indexed one by one."""
        state, keys = self._fresh(tenant_id, lambda s: s.live)
        if not keys:
            return None
        # As for a plain tenant (reader.query.PlainQueryTerms): the folded form as written or
        # `marked`, or the word itself, matches; the word itself ranks first.
        plain = [folded, marked(folded), term]
        any_of = [keyed_term(k, word) for k in keys for word in plain]
        exact = [keyed_term(k, term) for k in keys]
        if state.mode == "enabling":
            any_of.extend(plain)
            exact.append(term)
        return KeyedWord(any_of=sorted(set(any_of)), exact=sorted(set(exact)))

    # --- changes (admin, CLI) ---------------------------------------------------------------------

    def enable(self, tenant_id: str, reason: str) -> int:
        """Turn the blind index on: make index key version 1 and queue the tenant's re-index
        (documents indexed before hold plain words), audited in the same transaction."""
        return self._new_key(tenant_id, reason, enable=True)

    def rotate(self, tenant_id: str, reason: str) -> int:
        """Make a new index-key version; the old one stays live until the re-index under the
        new one completes (then it is destroyed). Audited in the same transaction."""
        return self._new_key(tenant_id, reason, enable=False)

    def _new_key(self, tenant_id: str, reason: str, enable: bool) -> int:
        kms_key_name = self.chats.tenant_key_name(tenant_id)
        if kms_key_name is None:
            raise KeyNotFound(f"unknown tenant '{tenant_id}'")
        rows = self.repo.keys(tenant_id)
        version = (rows[0].key_version if rows else 0) + 1
        data_key = self.kms.generate_data_key(kms_key_name, index_key_context(tenant_id, version))
        action = "blind_index_enabled" if enable else "index_key_rotated"
        self.repo.add_key(
            tenant_id,
            data_key.wrapped,
            kms_key_name,
            version,
            enable,
            AuditRecord(self.actor, action, f"tenant {tenant_id}: {reason}"),
        )
        # We hold the plaintext already: no unwrap needed for this process's first use.
        self._keys.put((tenant_id, version), IndexKey(tenant_id, version, data_key.plaintext))
        self._tenants.pop(tenant_id)
        return version

    def forget(self, tenant_id: str) -> None:
        """Drop what this process knows of the tenant (after a change or a finished re-index)."""
        self._tenants.pop(tenant_id)
        self._keys.discard(lambda k: k[0] == tenant_id)


def keyed_terms(key: IndexKey, terms: list[str]) -> list[str]:
    """`keyed_term` of each term, sorted and distinct (the `tokens` of a blind document)."""
    return sorted({keyed_term(key, t) for t in terms})
