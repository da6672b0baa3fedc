"""What the reader needs from the outside world, as small protocols (the adapters satisfy them)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Iterator
from typing import Protocol

from sealstream.adapters.cassandra import AttachmentRow, StoredMessage
from sealstream.adapters.opensearch import SearchHits, SearchRequest, TextToken, WordMatch
from sealstream.adapters.postgres import ChatRow
from sealstream.crypto import ChatKey


class ChatDirectory(Protocol):
    """Chat metadata (participants, state, creation time); None for an unknown chat."""

    def get(self, chat_id: uuid.UUID) -> ChatRow | None:
        """One chat; may be cached briefly (`CachedChatDirectory`)."""
        ...

    def member_chats(
        self, user_id: str, limit: int, chat_ids: Collection[uuid.UUID] | None = None
    ) -> list[ChatRow]:
        """The not-deleted chats `user_id` belongs to now, newest first, at most `limit`, only
        those of `chat_ids` when given (`ChatKeyRepository.member_chats`). Never cached: search
        re-reads membership on every request and page."""
        ...


class MessageSource(Protocol):
    """Sealed rows of the message store (`sealstream.adapters.cassandra.MessageStore`)."""

    def get(self, chat_id: uuid.UUID, message_id: int) -> StoredMessage | None: ...

    def history(
        self, chat_id: uuid.UUID, before_id: int, oldest_ms: int, limit: int
    ) -> Iterable[StoredMessage]:
        """Rows older than `before_id`, newest first, down to `oldest_ms`; no deleted rows."""
        ...


class AttachmentSource(Protocol):
    """Attachment files of chats (`sealstream.attachments.AttachmentFiles`)."""

    def get(self, chat_id: uuid.UUID, file_id: int) -> AttachmentRow | None:
        """A live attachment of the chat; None if unknown, another chat's or deleted."""
        ...

    def read(
        self, row: AttachmentRow, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Plaintext bytes of the file (a range of it), decrypted segment by segment; header
        and first segment checked before it returns (`DecryptionError`, `ObjectNotFound`,
        `KeyDestroyed`), a later bad segment raises `DecryptionError` from the iterator."""
        ...


class KeySource(Protocol):
    """The DEK of one version of a chat (`sealstream.keys.service.KeyService`)."""

    def key(self, chat_id: uuid.UUID, version: int) -> ChatKey: ...


class SearchPort(Protocol):
    """One page of message ids matching a query, in sort order (`SearchIndex`)."""

    def search_messages(self, request: SearchRequest) -> SearchHits: ...


class TextAnalyzer(Protocol):
    """Words of texts with their offsets and positions, as the index's analyzer sees them
    (`SearchIndex.analyze`; used for queries and for the decrypted texts about to be returned)."""

    def analyze(self, texts: list[str]) -> list[list[TextToken]]: ...


class QueryTerms(Protocol):
    """How one query word becomes index terms for the chats of one tenant.

    The plain implementation (`reader.query.PlainQueryTerms`) uses the words themselves; the
    blind index plugs in here with keyed terms under each live index key of the tenant."""

    def word_match(self, tenant_id: str, token: TextToken, prefix: bool) -> WordMatch:
        """The match for `token` in `tenant_id`'s documents; `prefix` asks for a prefix match
        (the word being typed), which an implementation may decline (blind: no prefix)."""
        ...
