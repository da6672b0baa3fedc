"""OpenSearch adapter: the search index of message tokens.

The mapping (`schemas/opensearch/messages.json`) indexes the analysed text but excludes it from
`_source`, so the index can answer "which messages contain this word" without being able to hand
back a message. Search returns message ids; the reader decrypts the messages from Cassandra.
Documents use the message id as `_id` and external version 1, so a redelivered record is refused
with a version conflict, which means "already indexed" and counts as done. A deleted message's
document is replaced by a tombstone (no words, `deleted: true`) at version `DELETION_VERSION`,
above any version the indexer writes, so no redelivery or replay can index its words again.
"""

from __future__ import annotations

import json
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

from sealstream.errors import InvalidMessage, SealstreamError, StoreUnavailable
from sealstream.settings import OpenSearchSettings

# External versions: every message document is written at version 1, a deleted message's tombstone
# at 2^62 (OpenSearch accepts up to 2^63 - 1, measured). A write at a version not above the stored
# one is refused with 409, so a tombstone is never overwritten by the indexer.
MESSAGE_VERSION = 1
DELETION_VERSION = 1 << 62
_CONFLICT = 409


@dataclass(frozen=True)
class IndexedMessage:
    message_id: int
    chat_id: uuid.UUID
    tenant_id: str
    sender_id: str
    sent_at: datetime
    text: str


class SearchRejected(SealstreamError):
    """OpenSearch refused a request for a reason a retry will not fix."""

    def __init__(self, status: int | str | None, error_type: str) -> None:
        super().__init__(f"OpenSearch rejected the request (HTTP {status}, {error_type})")
        self.status = status
        self.error_type = error_type


def _retriable_status(status: int | str | None) -> bool:
    return status in (429, 502, 503, 504) or status == "N/A"


class SearchIndex:
    def __init__(self, settings: OpenSearchSettings) -> None:
        self.settings = settings
        self.index = f"{settings.index_prefix}-messages"
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

    def ping(self) -> str:
        info = self._run(self._client.info)
        return f"OpenSearch {info['version']['number']}"

    def migrate(self) -> None:
        body = json.loads(
            resources.files("schemas").joinpath("opensearch/messages.json").read_text()
        )
        exists = self._run(lambda: self._client.indices.exists(index=self.index))
        if exists:  # an index made before the `deleted` field: adding a field is allowed
            deleted = {"deleted": body["mappings"]["properties"]["deleted"]}
            self._run(
                lambda: self._client.indices.put_mapping(
                    index=self.index, body={"properties": deleted}
                )
            )
        else:
            try:
                self._run(lambda: self._client.indices.create(index=self.index, body=body))
            except SearchRejected as exc:
                if "resource_already_exists" not in exc.error_type:
                    raise

    def index_many(self, messages: list[IndexedMessage]) -> None:
        """Bulk index; 429s and unreachable nodes raise `StoreUnavailable` (caller retries).

        A version conflict (the document exists: a redelivery, or a deleted message's tombstone)
        is success: the record was already handled.
        """
        if not messages:
            return
        actions = [
            {
                "_op_type": "index",
                "_index": self.index,
                "_id": str(m.message_id),
                "version": MESSAGE_VERSION,
                "version_type": "external",
                "_source": {
                    "message_id": m.message_id,
                    "chat_id": str(m.chat_id),
                    "tenant_id": m.tenant_id,
                    "sender_id": m.sender_id,
                    "sent_at": m.sent_at.isoformat(),
                    "text": m.text,
                },
            }
            for m in messages
        ]
        _, errors = self._run(
            lambda: helpers.bulk(self._client, actions, raise_on_error=False, stats_only=False)
        )
        statuses = [next(iter(e.values())).get("status") for e in errors]
        errors = [e for e, status in zip(errors, statuses, strict=True) if status != _CONFLICT]
        statuses = [status for status in statuses if status != _CONFLICT]
        if errors:
            if any(_retriable_status(s) for s in statuses):
                raise StoreUnavailable(f"{len(errors)} bulk items rejected (busy: {statuses[:3]})")
            # The mapping rejected a document: nothing a retry can fix. No text in the message.
            raise InvalidMessage(
                f"{len(errors)} documents rejected by the index (status {statuses[0]})"
            )

    def search_chat(self, chat_id: uuid.UUID, query: str, limit: int = 20) -> list[int]:
        body = {
            "size": limit,
            "_source": False,
            "query": {
                "bool": {
                    "filter": [{"term": {"chat_id": str(chat_id)}}],
                    "must": [{"match": {"text": {"query": query, "operator": "and"}}}],
                }
            },
            "sort": [{"_score": "desc"}, {"message_id": "desc"}],
        }
        result = self._run(lambda: self._client.search(index=self.index, body=body))
        return [int(hit["_id"]) for hit in result["hits"]["hits"]]

    def delete_message(self, chat_id: uuid.UUID, message_id: int) -> None:
        """Replace a message's document by its tombstone (idempotent; works before the message
        was ever indexed too: the indexer's later write then conflicts)."""
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
