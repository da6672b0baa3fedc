"""OpenSearch adapter: the search index of message tokens.

No message text is ever stored by OpenSearch. `analyze` sends a batch of texts to the index's
`_analyze` API (ICU analysis, in the node's memory only; docs/search.md, "Analysis") and takes the
words back (sealstream/tokens.py); `index_many` then sends only each message's sorted set of
distinct index terms (`document_terms`), indexed as `keyword` terms (no positions, no doc values)
and excluded from `_source`. OpenSearch's translog and recovery source do keep what was indexed,
which is why only terms are indexed (docs/security.md). The index answers "which messages hold all
these words"; the reader decrypts them from Cassandra.
Documents use the message id as `_id` and external version 1, so a redelivered record is refused
with a version conflict, which means "already indexed" and counts as done. An edit's document is
written at its edit's event id as version (Snowflake ids grow with time, and stay below 2^62
until 2060), so a replayed post or an older edit conflicts and never replaces a newer text. A deleted message's
document is replaced by a tombstone (no tokens, `deleted: true`) at version `DELETION_VERSION`,
above any version the indexer writes, so no redelivery or replay can index its words again.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Literal

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
from sealstream.tokens import TextToken as TextToken  # re-exported: the contract's home for it
from sealstream.tokens import document_terms as document_terms
from sealstream.tokens import marked, split_analyzed, split_terms

# External versions: every message document is written at version 1, a deleted message's tombstone
# at 2^62 (OpenSearch accepts up to 2^63 - 1, measured). A write at a version not above the stored
# one is refused with 409, so a tombstone is never overwritten by the indexer.
MESSAGE_VERSION = 1
DELETION_VERSION = 1 << 62
_CONFLICT = 409


@dataclass(frozen=True)
class IndexedMessage:
    """What the indexer hands to `index_many`: a message's fields and index terms, no text."""

    message_id: int
    chat_id: uuid.UUID
    tenant_id: str
    sender_id: str
    sent_at: datetime
    tokens: list[str]  # the final index terms, sorted and distinct (keyed for a blind tenant)
    index_key_version: int | None = None  # the blind index key version; None = plain tokens
    version: int | None = None  # external version of this document; None: `index_many`'s


@dataclass(frozen=True)
class IndexedDocument:
    """What the index holds for a message id now (`current_documents`): enough to check an edit
    or deletion against, never its terms. `deleted`: a deletion tombstone (no sender)."""

    message_id: int
    chat_id: str
    sender_id: str | None
    tenant_id: str | None
    sent_at: str | None
    deleted: bool
    version: int


@dataclass(frozen=True)
class RefusedDocument:
    """A document OpenSearch refused for itself (a bulk item error a retry will not fix)."""

    message_id: int
    reason: str  # status, error type and field name only: OpenSearch's own text quotes values


# --- search queries (owned by `xsearch`, SEARCH_CONTRACT.md) ---------------------------------


@dataclass(frozen=True)
class WordMatch:
    """One query word. A document matches the word when its `tokens` holds any of `any_of`
    (or, with `prefix`, any token starting with it or with its `marked` form: a folded form
    that differs from its word is indexed marked); `exact` terms only raise the score."""

    any_of: list[str]
    exact: list[str]
    prefix: str | None = None


SearchSort = Literal["newest", "relevance"]


@dataclass(frozen=True)
class SortKey:
    """Where a page ended: the last hit's sort values (`score` is 0.0 for "newest")."""

    score: float
    message_id: int


@dataclass(frozen=True)
class SearchRequest:
    """One page of a search. `chat_ids` are the chats the caller may read (the reader reads
    them from Postgres per request; at most `MAX_SEARCH_CHATS`); `min_id` is inclusive and
    `max_id` exclusive (a time range, as message ids order by time); `size` hits at most."""

    chat_ids: list[uuid.UUID]
    words: list[WordMatch]
    sender_id: str | None = None
    min_id: int | None = None
    max_id: int | None = None
    sort: SearchSort = "newest"
    after: SortKey | None = None
    size: int = 20


@dataclass(frozen=True)
class SearchHit:
    message_id: int
    chat_id: uuid.UUID
    score: float  # the count of exactly matched words for "relevance"; 0.0 for "newest"

    @property
    def key(self) -> SortKey:
        return SortKey(self.score, self.message_id)


@dataclass(frozen=True)
class SearchHits:
    """Hits in sort order; `exhausted` when the index holds no further hit after these."""

    hits: list[SearchHit]
    exhausted: bool


#: The most chats one search filters on: a `terms` query of this many chat ids stays far below
#: OpenSearch's `index.max_terms_count` (65,536) and a ~400 KB request body.
MAX_SEARCH_CHATS = 10_000


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

#: The analyzer `analyze` names (schemas/opensearch/messages.json): ICU words, NFKC + case folding,
#: each word's accent-folded form at the same position when it differs.
WORDS_ANALYZER = "message_words"
#: At most this many characters (code points) of text per `_analyze` request (one longer text goes
#: alone). A token holds at least one character and each word gives at most two tokens (term,
#: folded), so a request stays under the index's `analyze.max_token_count` (100,000, `migrate`).
ANALYZE_CHARS = 50_000
_ANALYZE_FIELDS = "tokens.token,tokens.start_offset,tokens.end_offset,tokens.position"
_TERMS_FIELDS = "tokens.token,tokens.start_offset"


def _retriable_status(status: int | str | None) -> bool:
    return status in (429, 502, 503, 504) or status == "N/A"


# Item errors about the index rather than the document (missing index, write block after a full
# disk, an outdated mapping): every item of every batch would fail alike, so they are waited
# out, not dead-lettered (a strict-mapping refusal: the index predates these documents, see
# `migrate`).
_INDEX_WIDE_ERRORS = (
    "index_not_found_exception",
    "index_closed_exception",  # `migrate` closes the index for a moment to add its analyzers
    "cluster_block_exception",
    "strict_dynamic_mapping_exception",
)


def _item_can_heal(item: dict[str, Any]) -> bool:
    error_type = str(item.get("error", {}).get("type", ""))
    return _retriable_status(item.get("status")) or error_type in _INDEX_WIDE_ERRORS


def _setting_text(value: Any) -> Any:
    """A settings value as OpenSearch reports it (strings; lists of strings; lowercase bools)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return [_setting_text(item) for item in value]
    return value if value is None else str(value)


def _flat_settings(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_settings(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = _setting_text(value)
    return flat


def _analyze_chunks(texts: list[str]) -> list[list[str]]:
    """`texts` in order, cut into runs of at most ANALYZE_CHARS characters (one longer text alone).

    Every token holds at least one character and a word gives at most two tokens, so a request
    yields at most 2 * ANALYZE_CHARS tokens, the index's `analyze.max_token_count`."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    for text in texts:
        if chunk and size + len(text) > ANALYZE_CHARS:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(text)
        size += len(text)
    if chunk:
        chunks.append(chunk)
    return chunks


def _boost(query: dict[str, Any], boost: float) -> dict[str, Any]:
    return {"constant_score": {"filter": query, "boost": boost}}


def _plain_prefix(prefix: str) -> dict[str, Any]:
    """A prefix match on plain words only. A blind-index document (one with `index_key_version`)
    holds keyed tokens, base64url text whose beginnings mean nothing: a prefix would match them
    by chance (`a` about one document in three), finding blind messages the prefix does not
    stand for and costing the reader a decryption for each."""
    either = [{"prefix": {"tokens": prefix}}, {"prefix": {"tokens": marked(prefix)}}]
    return {
        "bool": {
            # The prefix of a word, or of a folded form indexed `marked` (sealstream.tokens).
            "filter": [{"bool": {"should": either, "minimum_should_match": 1}}],
            "must_not": [{"exists": {"field": "index_key_version"}}],
        }
    }


# A query ending in one of these (or a space) has its last word complete: no prefix match.
_QUOTES = frozenset("\"'\u201c\u201d\u2018\u2019\u00ab\u00bb\u300c\u300d")


def _quiet_client_logs() -> None:
    """Keep request bodies out of every log, whatever the logging configuration.

    opensearch-py logs each request and response body on the `opensearch` logger at DEBUG and
    as curl commands on `opensearchpy.trace` at INFO; an `_analyze` body is message text, a bulk
    body a message's words. Both loggers are held at WARNING (failures only, which name the
    URL and status, never a body), so a process run at DEBUG does not write text to its log."""
    for name in ("opensearch", "opensearchpy.trace"):
        library = logging.getLogger(name)
        if library.level < logging.WARNING:  # NOTSET (0) too: it would follow the root's level
            library.setLevel(logging.WARNING)


class SearchIndex:
    def __init__(self, settings: OpenSearchSettings) -> None:
        _quiet_client_logs()
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
            if exc.error == "index_closed_exception":  # `migrate` reopens it within seconds
                raise StoreUnavailable("OpenSearch index closed (being migrated)") from None
            # Status and error type only: OpenSearch's reason text can quote a field's value,
            # i.e. message text, and callers log what they catch.
            raise SearchRejected(exc.status_code, str(exc.error)[:100]) from None

    def ping(self) -> str:
        info = self._run(self._client.info)
        return f"OpenSearch {info['version']['number']}"

    def migrate(self) -> None:
        """Create the index from `schemas/opensearch/messages.json`, or, if it exists, add the
        fields added since (allowed in place), add or update its analyzers (static settings: the
        index is closed and reopened, a few seconds in which workers wait and retry), and re-apply
        the dynamic settings of `DURABLE_SETTINGS` and the `_analyze` token limit (an index made by
        an older release gets today's durability and history bounds). Documents indexed before
        keep the terms they were indexed with until re-indexed (docs/search.md, "Analysis").
        An index of the text-holding mapping is refused: it cannot be changed in place.
        SealstreamError when the node has no ICU analysis (the analysis-icu plugin)."""
        body = json.loads(
            resources.files("schemas").joinpath("opensearch/messages.json").read_text()
        )
        self._require_icu()
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
        # Fields added since (`deleted`: message tombstones; `index_key_version`: blind index).
        added = {
            name: field
            for name, field in body["mappings"]["properties"].items()
            if name not in properties
        }
        if added:
            self._run(
                lambda: self._client.indices.put_mapping(
                    index=self.index, body={"properties": added}
                )
            )
        self._migrate_analysis(body["settings"]["analysis"])
        update = {
            f"index.{key}": body["settings"][key]
            for key in (*DURABLE_SETTINGS, "analyze.max_token_count")
        }
        self._run(lambda: self._client.indices.put_settings(index=self.index, body=update))

    def _require_icu(self) -> None:
        try:
            self._run(
                lambda: self._client.indices.analyze(
                    body={"tokenizer": "icu_tokenizer", "text": "ok"}
                )
            )
        except SearchRejected:
            raise SealstreamError(
                "OpenSearch has no icu_tokenizer: install the analysis-icu plugin "
                "(`opensearch-plugin install analysis-icu`; the local stack has it built in, "
                "restart an older one: docs/stack.md)"
            ) from None

    def _migrate_analysis(self, analysis: dict[str, Any]) -> None:
        """Give an existing index the analyzers of the mapping file. Analysis settings are
        static: they can only change on a closed index, so it is closed, updated and reopened
        (only when they differ, i.e. once per release that changes them)."""
        wanted = _flat_settings(analysis, "index.analysis")
        current: dict[str, Any] = self._run(
            lambda: self._client.indices.get_settings(
                index=self.index, name="index.analysis.*", flat_settings=True
            )
        )
        have: dict[str, Any] = current.get(self.index, {}).get("settings", {})
        if all(_setting_text(have.get(key)) == value for key, value in wanted.items()):
            return
        self._run(lambda: self._client.indices.close(index=self.index))
        try:
            self._run(
                lambda: self._client.indices.put_settings(
                    index=self.index, body={"index": {"analysis": analysis}}
                )
            )
        finally:
            self._run(
                lambda: self._client.indices.open(
                    index=self.index, wait_for_active_shards="all", request_timeout=120
                )
            )

    def analyze(self, texts: list[str]) -> list[list[TextToken]]:
        """One list of tokens per text, in text order (`TextToken`: term, folded, code-point
        offsets, position), from the index's `message_words` analyzer.

        The texts travel to the node's `_analyze` API and are analysed in its memory only:
        nothing of them is written to an index, a translog or a log (docs/security.md). One
        request per ANALYZE_CHARS characters of text; the answer is cut down to the four fields
        used (`filter_path`) since the indexer parses it for every batch. Raises
        `StoreUnavailable` (retriable) / `SearchRejected` (e.g. a single text of more than
        ANALYZE_CHARS characters, or an index without the analyzer: run `migrate`).
        """
        result: list[list[TextToken]] = []
        for chunk in _analyze_chunks(texts):
            answer = self._run(
                lambda c=chunk: self._client.indices.analyze(
                    index=self.index,
                    body={"analyzer": WORDS_ANALYZER, "text": c},
                    filter_path=_ANALYZE_FIELDS,
                )
            )
            result.extend(split_analyzed(chunk, answer.get("tokens", [])))
        return result

    def analyze_terms(self, texts: list[str]) -> list[list[str]]:
        """`document_terms` of each text's `analyze` tokens, in one pass that asks `_analyze`
        for the two fields it needs. The indexer's path: its CPU per message went from 0.068 ms
        (`analyze` + `document_terms`) to 0.042-0.046 ms (docs/search.md, "Analysis").
        Same errors as `analyze`."""
        result: list[list[str]] = []
        for chunk in _analyze_chunks(texts):
            answer = self._run(
                lambda c=chunk: self._client.indices.analyze(
                    index=self.index,
                    body={"analyzer": WORDS_ANALYZER, "text": c},
                    filter_path=_TERMS_FIELDS,
                )
            )
            result.extend(split_terms(chunk, answer.get("tokens", [])))
        return result

    def index_many(
        self,
        messages: list[IndexedMessage],
        version: int = MESSAGE_VERSION,
        version_type: Literal["external", "external_gte"] = "external",
    ) -> list[RefusedDocument]:
        """Bulk index; returns the documents OpenSearch refused one by one (permanent).

        Raises `StoreUnavailable` when the request as a whole failed (node unreachable, overload)
        or when any item failed with a status that can heal (429, 502-504): the caller retries
        the whole set, which is idempotent by `_id`. `version`: the external version written
        unless a document names its own (the indexer's `MESSAGE_VERSION`, an edit's event id;
        the blind re-index writes `reindex_version(v)`, or an edited row's last event id with
        `external_gte`, which replaces the document of that same edit: re-keyed).
        """
        if not messages:
            return []
        versions = [version if m.version is None else m.version for m in messages]
        if not all(MESSAGE_VERSION <= v < DELETION_VERSION for v in versions):
            raise ValueError(f"version must be in [{MESSAGE_VERSION}, {DELETION_VERSION})")
        actions = [
            {
                "_op_type": "index",
                "_index": self.index,
                "_id": str(m.message_id),
                "version": v,
                "version_type": version_type,
                "_source": _document(m),
            }
            for m, v in zip(messages, versions, strict=True)
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

    def current_documents(self, message_ids: list[int]) -> dict[int, IndexedDocument]:
        """The documents the index holds now under these ids (real-time `mget`, no refresh
        needed), absent ones left out. Raises `StoreUnavailable` (retriable)."""
        if not message_ids:
            return {}
        ids = sorted({str(i) for i in message_ids})
        found = self._run(
            lambda: self._client.mget(
                index=self.index,
                body={"ids": ids},
                _source=["chat_id", "sender_id", "tenant_id", "sent_at", "deleted"],
            )
        )
        return {
            int(doc["_id"]): IndexedDocument(
                message_id=int(doc["_id"]),
                chat_id=str(doc["_source"].get("chat_id")),
                sender_id=doc["_source"].get("sender_id"),
                tenant_id=doc["_source"].get("tenant_id"),
                sent_at=doc["_source"].get("sent_at"),
                deleted=bool(doc["_source"].get("deleted")),
                version=int(doc["_version"]),
            )
            for doc in found["docs"]
            if doc.get("found")
        }

    def search_chat(self, chat_id: uuid.UUID, query: str, limit: int = 20) -> list[int]:
        """Ids of the chat's messages matching every word of `query`, best first.

        The query is analysed like the texts were. A word matches a message holding its
        accent-folded form (every message holds the folded form of each of its words), so `cafe`
        finds `café` and `café` finds `cafe`, or holding the word as written (`term`). The last
        word also matches as a prefix unless the query ends in a space or a quote
        (search-as-you-type). Messages holding the words as
        written (`term`) rank first, then whole words before prefixes, newest first among equals.
        A query without any word matches nothing. Plain (not blind) tenants only.
        """
        words = self.analyze([query])[0]
        if not words:
            return []
        prefix = not query[-1].isspace() and query[-1] not in _QUOTES
        last = words[-1]
        matches: list[dict[str, Any]] = []
        scores: list[dict[str, Any]] = []
        for word in words:
            # The folded form, as written or `marked`, finds every message indexed with ICU
            # analysis; `term` also finds those indexed before it, which hold only the words as
            # written (docs/search.md, "Analysis": an existing index).
            folded = sorted({word.folded, marked(word.folded), word.term})
            either: list[dict[str, Any]] = [{"terms": {"tokens": folded}}]
            if prefix and word is last:
                either.append(_plain_prefix(word.folded))
            matches.append({"bool": {"should": either, "minimum_should_match": 1}})
            scores.append(_boost({"term": {"tokens": word.term}}, 2.0))
        if prefix:  # the last word typed in full ranks above a word it only begins
            whole = sorted({last.folded, marked(last.folded)})
            scores.append(_boost({"terms": {"tokens": whole}}, 1.0))
        body = {
            "size": limit,
            "_source": False,
            "query": {
                "bool": {
                    "filter": [{"term": {"chat_id": str(chat_id)}}, *matches],
                    "should": scores,
                }
            },
            "sort": [{"_score": "desc"}, {"message_id": "desc"}],
        }
        result = self._run(lambda: self._client.search(index=self.index, body=body))
        return [int(hit["_id"]) for hit in result["hits"]["hits"]]

    def search_messages(self, request: SearchRequest) -> SearchHits:
        """One page of the messages of `request.chat_ids` matching every word, in the order of
        `request.sort`, after `request.after` (OpenSearch's `search_after`).

        Deletion tombstones never match. Nothing to match (no word or no chat) is an empty,
        exhausted page without a request. Raises StoreUnavailable (retriable) / SearchRejected.
        """
        if not request.words or not request.chat_ids:
            return SearchHits(hits=[], exhausted=True)
        filters: list[dict[str, Any]] = [
            {"terms": {"chat_id": sorted({str(c) for c in request.chat_ids})}}
        ]
        if request.sender_id is not None:
            filters.append({"term": {"sender_id": request.sender_id}})
        id_range: dict[str, int] = {}
        if request.min_id is not None:
            id_range["gte"] = request.min_id
        if request.max_id is not None:
            id_range["lt"] = request.max_id
        if id_range:
            filters.append({"range": {"message_id": id_range}})
        for word in request.words:
            either: list[dict[str, Any]] = [{"terms": {"tokens": list(word.any_of)}}]
            if word.prefix:
                either.append(_plain_prefix(word.prefix))
            filters.append({"bool": {"should": either, "minimum_should_match": 1}})
        query: dict[str, Any] = {"filter": filters, "must_not": [{"term": {"deleted": True}}]}
        if request.sort == "relevance":
            # Filters do not score; each word matched by one of its exact terms adds 1, so the
            # score is the count of exactly matched words (whole numbers: stable for paging).
            query["should"] = [
                {"constant_score": {"filter": {"terms": {"tokens": list(w.exact)}}, "boost": 1}}
                for w in request.words
                if w.exact
            ]
            sort: list[dict[str, str]] = [{"_score": "desc"}, {"message_id": "desc"}]
        else:
            sort = [{"message_id": "desc"}]
        body: dict[str, Any] = {
            "size": request.size,
            "_source": ["chat_id"],
            "track_total_hits": False,
            "query": {"bool": query},
            "sort": sort,
        }
        if request.after is not None:
            after = request.after
            body["search_after"] = (
                [after.score, after.message_id]
                if request.sort == "relevance"
                else [after.message_id]
            )
        result = self._run(lambda: self._client.search(index=self.index, body=body))
        hits = [
            SearchHit(
                message_id=int(hit["_id"]),
                chat_id=uuid.UUID(hit["_source"]["chat_id"]),
                score=float(hit["sort"][0]) if request.sort == "relevance" else 0.0,
            )
            for hit in result["hits"]["hits"]
        ]
        return SearchHits(hits=hits, exhausted=len(hits) < request.size)

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
