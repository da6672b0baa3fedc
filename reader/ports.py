"""What the reader needs from the outside world, as small protocols (the adapters satisfy them)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Protocol

from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.opensearch import TextToken
from sealstream.adapters.postgres import ChatRow
from sealstream.crypto import ChatKey
from sealstream.keys.index_keys import KeyedWord


class ChatDirectory(Protocol):
    """Chat metadata (participants, state, creation time); None for an unknown chat."""

    def get(self, chat_id: uuid.UUID) -> ChatRow | None: ...


class MessageSource(Protocol):
    """Sealed rows of the message store (`sealstream.adapters.cassandra.MessageStore`)."""

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None: ...

    def history(
        self, chat_id: uuid.UUID, before_id: int, oldest_ms: int, limit: int
    ) -> Iterable[StoredMessage]:
        """Rows older than `before_id`, newest first, down to `oldest_ms`; no deleted rows."""
        ...


class KeySource(Protocol):
    """The DEK of one version of a chat (`sealstream.keys.service.KeyService`)."""

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey: ...


class SearchPort(Protocol):
    """Ids of a chat's messages matching a query, best first (`SearchIndex`)."""

    def search_chat(self, chat_id: uuid.UUID, query: str, limit: int) -> list[int]: ...

    def analyze(self, texts: list[str]) -> list[list[TextToken]]: ...

    def search_chat_terms(
        self, chat_id: uuid.UUID, words: list[list[str]], limit: int
    ) -> list[int]:
        """Messages holding, for every word, any of its terms (the blind index's queries)."""
        ...


class QueryTerms(Protocol):
    """A query word as a blind-index tenant's keyed terms (`IndexKeys.query_word`); None for a
    plain tenant."""

    def query_word(self, tenant_id: str, term: str, folded: str) -> KeyedWord | None: ...
