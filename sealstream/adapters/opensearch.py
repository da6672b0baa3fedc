"""OpenSearch adapter: the search index of message tokens.

No message text ever reaches OpenSearch: `index_many` analyses each text in this process
(sealstream/tokens.py) and sends only the sorted set of its distinct tokens, indexed as `keyword`
terms (no positions, no doc values) and excluded from `_source`. OpenSearch's translog and
recovery source do keep what was sent, which is why only tokens are sent (docs/security.md). The
index answers "which messages hold all these words"; the reader decrypts them from Cassandra.
Documents use the message id as `_id` and external version 1, so a redelivered record is refused
with a version conflict, which means "already indexed" and counts as done. A deleted message's
document is replaced by a tombstone (no tokens, `deleted: true`) at version `DELETION_VERSION`,
above any version the indexer writes, so no redelivery or replay can index its words again.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

from opensearchpy import OpenSearch, helpers
from opensearchpy.exceptions import (
    ConnectionError as OsConnectionError,
)
from opensearchpy.exceptions import (
    ConnectionTimeout,
    TransportError,
)

from sealstream.errors import SealstreamError, StoreUnavailable
from sealstream.settings import OpenSearchSettings
from sealstream.tokens import analyzer

# External versions: every message document is written at version 1, a deleted message's tombstone
# at 2^62 (OpenSearch accepts up to 2^63 - 1, measured). A write at a version not above the stored
# one is refused with 409, so a tombstone is never overwritten by the indexer.
MESSAGE_VERSION = 1
DELETION_VERSION = 1 << 62
_CONFLICT = 409


# --- STAND-IN until the `icu` branch merges (SEARCH_CONTRACT.md): `TextToken`, `analyze` and
# `document_terms` with the contract's names and shapes, built on sealstream.tokens (term ==
# folded == the word; positions in sorted order). The lead takes `icu`'s versions at merge.


@dataclass(frozen=True)
class TextToken:
    """One word of a text as the index's analyzer sees it (stand-in: term == folded)."""

    term: str
    folded: str
    start: int
    end: int
    position: int


def document_terms(tokens: list[TextToken]) -> list[str]:
    """Index terms of a message: sorted distinct union of every `term` and `folded`."""
    return sorted({t.term for t in tokens} | {t.folded for t in tokens})


# --- end of the stand-in ------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedMessage:
    """What the indexer hands to `index_many`: ids and the final index terms, no text."""

    message_id: int
    chat_id: uuid.UUID
    tenant_id: str
    sender_id: str
    sent_at: datetime
    tokens: list[str]  # the final index terms, sorted and distinct (keyed for a blind tenant)
    index_key_version: int | None = None  # the blind index key version; None = plain tokens


@dataclass(frozen=True)
class RefusedDocument:
    """A document OpenSearch refused for itself (a bulk item error a retry will not fix)."""

    message_id: int
    reason: str  # status, error type and field name only: OpenSearch's own text quotes values


_FIELDS = (
    "message_id",
    "chat_id",
    "tenant_id",
    "sender_id",
    "sent_at",
    "tokens",
    "index_key_version",
)
_FIELD_IN_REASON = re.compile(r"field \[([A-Za-z_]+)\]")


def _refusal(status: object, error: dict[str, Any]) -> str:
    """`status` + error type (+ the field, when OpenSearch names one of ours), never its reason."""
    error_type = str(error.get("type", "unknown"))[:100]
    fields = {
        name for name in _FIELD_IN_REASON.findall(str(error.get("reason", ""))) if name in _FIELDS
    }
    named = f", field {', '.join(sorted(fields))}" if fields else ""
    return f"the search index refused the document (HTTP {status}, {error_type}{named})"


def reindex_version(index_key_version: int) -> int:
    """External version of a document re-indexed under `index_key_version`: above the indexer's
    `MESSAGE_VERSION` and any earlier re-index (older key versions), far below the tombstone's
    `DELETION_VERSION`, so a deletion still wins over every re-index."""
    return MESSAGE_VERSION + index_key_version


def _document(m: IndexedMessage) -> dict[str, Any]:
    source: dict[str, Any] = {
        "message_id": m.message_id,
        "chat_id": str(m.chat_id),
        "tenant_id": m.tenant_id,
        "sender_id": m.sender_id,
        "sent_at": m.sent_at.isoformat(),
        "tokens": m.tokens,
    }
    if m.index_key_version is not None:
        source["index_key_version"] = m.index_key_version
    return source


class SearchRejected(SealstreamError):
    """OpenSearch refused a request for a reason a retry will not fix."""

    def __init__(self, status: int | str | None, error_type: str) -> None:
        super().__init__(f"OpenSearch rejected the request (HTTP {status}, {error_type})")
        self.status = status
        self.error_type = error_type


#: Index settings `migrate` re-applies to an existing index (all dynamic). `translog.durability:
#: request` fsyncs the translog before a bulk request is acknowledged (the indexer commits its
#: offsets after that); `soft_deletes.retention_lease.period` bounds how long the history of
#: deleted documents is kept for a shard copy that went missing (docs/operations.md, "Durability").
DURABLE_SETTINGS = ("translog.durability", "soft_deletes.retention_lease.period")


def _retriable_status(status: int | str | None) -> bool:
    return status in (429, 502, 503, 504) or status == "N/A"


# Item errors about the index rather than the document (missing index, write block after a full
# disk, an outdated mapping): every item of every batch would fail alike, so they are waited
# out, not dead-lettered (a strict-mapping refusal: the index predates these documents, see
# `migrate`).
_INDEX_WIDE_ERRORS = (
    "index_not_found_exception",
    "cluster_block_exception",
    "strict_dynamic_mapping_exception",
)


def _item_can_heal(item: dict[str, Any]) -> bool:
    error_type = str(item.get("error", {}).get("type", ""))
    return _retriable_status(item.get("status")) or error_type in _INDEX_WIDE_ERRORS


class SearchIndex:
    def __init__(self, settings: OpenSearchSettings) -> None:
        self.settings = settings
        self.index = f"{settings.index_prefix}-messages"
        self._analyzer = analyzer(settings.analyzer)
        self._client = OpenSearch(
            hosts=[settings.url], timeout=30, max_retries=0, retry_on_timeout=False
        )

    def _run(self, fn: Any) -> Any:
        try:
            return fn()
        except (OsConnectionError, ConnectionTimeout) as exc:
            raise StoreUnavailable(f"OpenSearch unavailable: {type(exc).__name__}") from None
        except TransportError as exc:
            if _retriable_status(exc.status_code):
                raise StoreUnavailable(f"OpenSearch busy (HTTP {exc.status_code})") from None
            # Status and error type only: OpenSearch's reason text can quote a field's value,
            # i.e. message text, and callers log what they catch.
            raise SearchRejected(exc.status_code, str(exc.error)[:100]) from None

    def analyze(self, texts: list[str]) -> list[list[TextToken]]:
        """One list of tokens per text, in text order. STAND-IN (see `TextToken`): analyses in
        this process with sealstream.tokens; `icu`'s version calls the index's `_analyze`."""
        return [
            [TextToken(w, w, 0, 0, n) for n, w in enumerate(self._analyzer(text))] for text in texts
        ]

    def ping(self) -> str:
        info = self._run(self._client.info)
        return f"OpenSearch {info['version']['number']}"

    def migrate(self) -> None:
        """Create the index from `schemas/opensearch/messages.json`, or, if it exists, add the
        fields added since (allowed in place) and re-apply the dynamic settings of
        `DURABLE_SETTINGS` (an index made by an older release gets today's durability and history
        bounds). An index of the text-holding mapping is refused: it cannot be changed in place."""
        body = json.loads(
            resources.files("schemas").joinpath("opensearch/messages.json").read_text()
        )
        exists = self._run(lambda: self._client.indices.exists(index=self.index))
        if not exists:
            try:
                self._run(lambda: self._client.indices.create(index=self.index, body=body))
                return
            except SearchRejected as exc:
                if "resource_already_exists" not in exc.error_type:
                    raise
        mapping = self._run(lambda: self._client.indices.get_mapping(index=self.index))
        properties = next(iter(mapping.values()))["mappings"].get("properties", {})
        if "tokens" not in properties:
            # `_source` excludes cannot be changed in place, and the old index holds text.
            raise SealstreamError(
                f"index {self.index} has the mapping of an older version (a text field, no "
                "tokens): delete it and run migrate again, then re-index (docs/security.md)"
            )
        added = [f for f in ("deleted", "index_key_version") if f not in properties]
        if added:  # an index made before message tombstones / the blind index
            fields = {f: body["mappings"]["properties"][f] for f in added}
            self._run(
                lambda: self._client.indices.put_mapping(
                    index=self.index, body={"properties": fields}
                )
            )
        update = {f"index.{key}": body["settings"][key] for key in DURABLE_SETTINGS}
        self._run(lambda: self._client.indices.put_settings(index=self.index, body=update))

    def index_many(
        self, messages: list[IndexedMessage], version: int = MESSAGE_VERSION
    ) -> list[RefusedDocument]:
        """Bulk index; returns the documents OpenSearch refused one by one (permanent).

        Raises `StoreUnavailable` when the request as a whole failed (node unreachable, overload)
        or when any item failed with a status that can heal (429, 502-504): the caller retries
        the whole set, which is idempotent by `_id`. `version`: the external version written
        (the indexer's `MESSAGE_VERSION`; the blind re-index writes `reindex_version(v)`).
        """
        if not messages:
            return []
        if not MESSAGE_VERSION <= version < DELETION_VERSION:
            raise ValueError(f"version must be in [{MESSAGE_VERSION}, {DELETION_VERSION})")
        actions = [
            {
                "_op_type": "index",
                "_index": self.index,
                "_id": str(m.message_id),
                "version": version,
                "version_type": "external",
                "_source": _document(m),
            }
            for m in messages
        ]
        _, errors = self._run(
            lambda: helpers.bulk(self._client, actions, raise_on_error=False, stats_only=False)
        )
        # A version conflict (the document exists: a redelivery, or a deleted message's
        # tombstone) is success: the record was already handled, if by the same chat.
        items = [next(iter(e.values())) for e in errors]
        conflicts = [item for item in items if item.get("status") == _CONFLICT]
        items = [item for item in items if item.get("status") != _CONFLICT]
        busy = [item.get("status") for item in items if _item_can_heal(item)]
        if busy:
            raise StoreUnavailable(f"{len(busy)} bulk items rejected (busy: {busy[:3]})")
        return [
            RefusedDocument(int(item["_id"]), _refusal(item.get("status"), item.get("error", {})))
            for item in items
        ] + self._taken_by_other_chats(messages, conflicts)

    def _taken_by_other_chats(
        self, messages: list[IndexedMessage], conflicts: list[dict[str, Any]]
    ) -> list[RefusedDocument]:
        """Of the conflicting documents, those whose id another chat's document holds.

        Documents are keyed by message id alone: a record reusing another chat's message id (a
        producer not leasing its worker id, or a forged record) conflicts like a redelivery, but
        was never indexed; it is refused (dead-lettered), not counted as done."""
        if not conflicts:
            return []
        chats = {str(m.message_id): str(m.chat_id) for m in messages}
        ids = sorted({str(item["_id"]) for item in conflicts})
        found = self._run(
            lambda: self._client.mget(index=self.index, body={"ids": ids}, _source=["chat_id"])
        )
        return [
            RefusedDocument(
                int(doc["_id"]),
                "the search index holds this message id for another chat (ids must be unique)",
            )
            for doc in found["docs"]
            if doc.get("found") and doc["_source"].get("chat_id") != chats.get(doc["_id"])
        ]

    def search_chat(self, chat_id: uuid.UUID, query: str, limit: int = 20) -> list[int]:
        """Ids of the chat's messages holding every token of `query`, newest first.

        The query is analysed like the texts were; a query without any token matches nothing.
        """
        [tokens] = self.analyze([query])
        return self.search_chat_terms(chat_id, [[t.folded] for t in tokens], limit)

    def search_chat_terms(
        self, chat_id: uuid.UUID, words: list[list[str]], limit: int = 20
    ) -> list[int]:
        """Ids of the chat's messages that, for every word, hold any of its terms; newest first.

        The blind index's reader hook: each word is its keyed terms under every live key version
        (sealstream/keys/index_keys.py). No words matches nothing."""
        if not words or not all(words):
            return []
        body = {
            "size": limit,
            "_source": False,
            "query": {
                "bool": {
                    "filter": [
                        {"term": {"chat_id": str(chat_id)}},
                        *({"terms": {"tokens": sorted(set(terms))}} for terms in words),
                    ]
                }
            },
            "sort": [{"message_id": "desc"}],
        }
        result = self._run(lambda: self._client.search(index=self.index, body=body))
        return [int(hit["_id"]) for hit in result["hits"]["hits"]]

    def stale_documents(
        self, tenant_id: str, index_key_version: int, limit: int = 500
    ) -> list[tuple[uuid.UUID, int]]:
        """(chat id, message id) of the tenant's message documents not keyed with
        `index_key_version` (plain ones included), deletion tombstones excepted: what a
        blind re-index has still to re-key."""
        self.refresh()
        body = {
            "size": limit,
            "_source": ["chat_id"],
            "query": {
                "bool": {
                    "filter": [{"term": {"tenant_id": tenant_id}}],
                    "must_not": [
                        {"term": {"deleted": True}},
                        {"term": {"index_key_version": index_key_version}},
                    ],
                }
            },
            "sort": [{"message_id": "asc"}],
        }
        result = self._run(lambda: self._client.search(index=self.index, body=body))
        return [
            (uuid.UUID(hit["_source"]["chat_id"]), int(hit["_id"]))
            for hit in result["hits"]["hits"]
        ]

    def history_point(self) -> int:
        """The highest sequence number written to any shard so far (`purge_history`'s mark)."""
        stats = self._run(lambda: self._client.indices.stats(index=self.index, level="shards"))
        shards = stats["indices"][self.index]["shards"].values()
        return max(int(copy["seq_no"]["max_seq_no"]) for copies in shards for copy in copies)

    def purge_history(self, point: int) -> bool:
        """Drop from the data folder every document version overwritten up to sequence number
        `point`: flush (the translog of those writes is trimmed) and expunge deleted documents
        from every segment holding any (`expunge_deletes_allowed` 0). Lucene keeps the old
        versions (the words of a re-indexed plain document, in the terms and in
        `_recovery_source`) as soft deletes while a shard's retention lease still covers
        them; the lease moves up every ~30 s. Returns False, doing nothing, until every
        lease retains only what came after `point`: call again later."""
        stats = self._run(lambda: self._client.indices.stats(index=self.index, level="shards"))
        shards = stats["indices"][self.index]["shards"].values()
        floors = [
            int(lease["retaining_seq_no"])
            for copies in shards
            for copy in copies
            for lease in copy.get("retention_leases", {}).get("leases", [])
        ]
        if floors and min(floors) <= point:
            return False
        self._run(
            lambda: self._client.indices.put_settings(
                index=self.index, body={"index.merge.policy.expunge_deletes_allowed": 0}
            )
        )
        self._run(lambda: self._client.indices.flush(index=self.index, params={"force": "true"}))
        self._run(
            lambda: self._client.indices.forcemerge(
                index=self.index, params={"only_expunge_deletes": "true"}
            )
        )
        self._run(lambda: self._client.indices.flush(index=self.index, params={"force": "true"}))
        return True

    def delete_message(self, chat_id: uuid.UUID, message_id: int) -> None:
        """Replace a message's document by its tombstone (idempotent; works before the message
        was ever indexed too: the indexer's later write then conflicts). A document of another
        chat under the same id (ids reused across chats) is left alone: it is not this message.
        """
        existing = self._run(
            lambda: self._client.get(
                index=self.index, id=str(message_id), _source=["chat_id"], ignore=404
            )
        )
        if existing.get("found") and existing["_source"].get("chat_id") != str(chat_id):
            return
        try:
            self._run(
                lambda: self._client.index(
                    index=self.index,
                    id=str(message_id),
                    body={"message_id": message_id, "chat_id": str(chat_id), "deleted": True},
                    version=DELETION_VERSION,
                    version_type="external",
                    refresh=True,  # the words leave search before the call returns
                )
            )
        except SearchRejected as exc:
            if exc.status != _CONFLICT:  # else the tombstone is there already
                raise

    def delete_chat(self, chat_id: uuid.UUID, before_id: int | None = None) -> int:
        """Delete every document of a chat (with `before_id`: those of messages with a smaller
        id, i.e. older by the id's clock, for retention); returns how many message documents were
        deleted (deleted messages' tombstones go too but are not counted).

        Search-then-bulk-delete by id rather than `_delete_by_query`, which lives in OpenSearch's
        reindex module (not loaded by the local stack's node, and not needed for this).
        """
        deleted = 0
        match: dict[str, Any] = {"term": {"chat_id": str(chat_id)}}
        if before_id is not None:  # retention: by the id's time, never the producer's sent_at
            match = {"bool": {"filter": [match, {"range": {"message_id": {"lt": before_id}}}]}}
        query = {"size": 1000, "_source": ["deleted"], "query": match}
        while True:
            self.refresh()
            hits = self._run(lambda: self._client.search(index=self.index, body=query))["hits"][
                "hits"
            ]
            if not hits:
                return deleted
            actions = [{"_op_type": "delete", "_index": self.index, "_id": h["_id"]} for h in hits]
            _, errors = self._run(
                lambda a=actions: helpers.bulk(
                    self._client, a, raise_on_error=False, stats_only=False
                )
            )
            # Count only what this call removed: a concurrent deletion of the same chat answers
            # 404 for the documents it got first. Any other refusal stops here (retriable; the
            # deletion is idempotent) instead of searching for the same documents forever.
            missing: set[str] = set()
            for error in errors:
                item = next(iter(error.values()))
                if item.get("status") != 404:
                    raise StoreUnavailable(
                        f"{len(errors)} index deletions refused (status {item.get('status')})"
                    )
                missing.add(str(item.get("_id")))
            deleted += sum(
                1
                for h in hits
                if h["_id"] not in missing and not h.get("_source", {}).get("deleted")
            )

    def refresh(self) -> None:
        self._run(lambda: self._client.indices.refresh(index=self.index))

    def count(self, chat_id: uuid.UUID | None = None) -> int:
        """Message documents (tombstones of deleted messages not counted), of one chat or all."""
        live: dict[str, Any] = {"must_not": [{"term": {"deleted": True}}]}
        if chat_id:
            live["filter"] = [{"term": {"chat_id": str(chat_id)}}]
        body = {"query": {"bool": live}}
        return int(self._run(lambda: self._client.count(index=self.index, body=body))["count"])

    def searchable_ids(self, message_ids: list[int]) -> set[int]:
        """Which of these messages have a document that search sees now (after a refresh, so
        not the real-time `get`) and that is not a deletion tombstone: what "searchable" means
        to a reader."""
        found: set[int] = set()
        for start in range(0, len(message_ids), 1000):  # well under max_result_window
            chunk = [str(i) for i in message_ids[start : start + 1000]]
            # A deleted message's tombstone document is not searchable: it holds no tokens.
            query = {
                "bool": {
                    "filter": [{"ids": {"values": chunk}}],
                    "must_not": [{"term": {"deleted": True}}],
                }
            }
            body = {"size": len(chunk), "_source": False, "query": query}
            result = self._run(lambda b=body: self._client.search(index=self.index, body=b))
            found.update(int(hit["_id"]) for hit in result["hits"]["hits"])
        return found

    def all_sources(self) -> list[dict[str, Any]]:
        """Every stored `_source` (the leak-scan tests check that none holds message text)."""
        result = self._run(
            lambda: self._client.search(
                index=self.index, body={"size": 10000, "query": {"match_all": {}}}
            )
        )
        return [hit.get("_source", {}) for hit in result["hits"]["hits"]]

    def drop(self) -> None:
        self._run(lambda: self._client.indices.delete(index=self.index, ignore_unavailable=True))

    def close(self) -> None:
        self._client.close()
