"""OpenSearch adapter: the search index of message tokens.

The mapping (`schemas/opensearch/messages.json`) indexes the analysed text but excludes it from
`_source`, so the index can answer "which messages contain this word" without being able to hand
back a message. Search returns message ids; the reader decrypts the messages from Cassandra.
Documents use the message id as `_id`, so re-indexing a redelivered record is a no-op overwrite.
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
        if not exists:
            try:
                self._run(lambda: self._client.indices.create(index=self.index, body=body))
            except SearchRejected as exc:
                if "resource_already_exists" not in exc.error_type:
                    raise

    def index_many(self, messages: list[IndexedMessage]) -> None:
        """Bulk index; 429s and unreachable nodes raise `StoreUnavailable` (caller retries)."""
        if not messages:
            return
        actions = [
            {
                "_op_type": "index",
                "_index": self.index,
                "_id": str(m.message_id),
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
        if errors:
            statuses = [next(iter(e.values())).get("status") for e in errors]
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

    def delete_message(self, message_id: int) -> None:
        try:
            self._run(lambda: self._client.delete(index=self.index, id=str(message_id)))
        except SearchRejected as exc:
            if exc.status != 404:
                raise

    def delete_chat(self, chat_id: uuid.UUID, before: datetime | None = None) -> int:
        """Delete every document of a chat; returns how many were deleted.

        Search-then-bulk-delete by id rather than `_delete_by_query`, which lives in OpenSearch's
        reindex module (not loaded by the local stack's node, and not needed for this).
        """
        deleted = 0
        match: dict[str, Any] = {"term": {"chat_id": str(chat_id)}}
        if before is not None:  # retention: only documents older than `before`
            match = {
                "bool": {"filter": [match, {"range": {"sent_at": {"lt": before.isoformat()}}}]}
            }
        query = {"size": 1000, "_source": False, "query": match}
        while True:
            self.refresh()
            hits = self._run(lambda: self._client.search(index=self.index, body=query))["hits"][
                "hits"
            ]
            if not hits:
                return deleted
            actions = [{"_op_type": "delete", "_index": self.index, "_id": h["_id"]} for h in hits]
            self._run(lambda a=actions: helpers.bulk(self._client, a, raise_on_error=False))
            deleted += len(hits)

    def refresh(self) -> None:
        self._run(lambda: self._client.indices.refresh(index=self.index))

    def count(self, chat_id: uuid.UUID | None = None) -> int:
        body = {"query": {"term": {"chat_id": str(chat_id)}}} if chat_id else None
        return int(self._run(lambda: self._client.count(index=self.index, body=body))["count"])

    def searchable_ids(self, message_ids: list[int]) -> set[int]:
        """Which of these messages have a document that search sees now (after a refresh, so
        not the real-time `get`): what "searchable" means to a reader."""
        found: set[int] = set()
        for start in range(0, len(message_ids), 1000):  # well under max_result_window
            chunk = [str(i) for i in message_ids[start : start + 1000]]
            body = {"size": len(chunk), "_source": False, "query": {"ids": {"values": chunk}}}
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
