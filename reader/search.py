"""Search over the chats a user may read: options and their checks, the page cursor, and the
loop that asks the index for hits, opens them and keeps those whose text really matches.

Membership comes from Postgres on every page (`ChatDirectory.member_chats`, never cached): a user
removed from a chat stops finding it at once, and a cursor only says where to resume, never which
chats to search, so a tampered cursor reveals nothing. The store is the truth: a hit whose row is
gone, deleted or crypto-shredded is skipped, as is one whose decrypted text does not hold the
query's phrases (the index has no positions). Such hits still move the cursor on, so a page can
hold fewer than `limit` messages (even none) while `next_cursor` is not null: paging goes on
until `next_cursor` is null, with no duplicate and no gap.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from reader.messages import ReadMessage
from reader.ports import ChatDirectory, MessageSource, QueryTerms, SearchPort, TextAnalyzer
from reader.query import (
    ParsedQuery,
    highlights,
    parse_query,
    searchable_tenants,
    text_matches,
    word_matches,
)
from schemas.ids import first_id_at
from sealstream.adapters.cassandra import StoredMessage
from sealstream.adapters.opensearch import (
    MAX_SEARCH_CHATS,
    SearchHit,
    SearchRequest,
    SearchSort,
    SortKey,
)
from sealstream.adapters.postgres import ChatRow
from sealstream.errors import KeyDestroyed
from sealstream.http import ApiError
from sealstream.text_rules import is_utf8, storable_text

SEARCH_LIMIT_MAX = 50
log = logging.getLogger(__name__)

SEARCH_LIMIT_DEFAULT = 20
QUERY_MAX_CHARS = 256
MAX_CHAT_FILTER = 100  # `chat_id` values one request may name
MAX_SENDER_CHARS = 128
SORTS: tuple[SearchSort, ...] = ("newest", "relevance")
#: Index pages read for one answer page when hits are dropped after decryption (deleted rows,
#: phrase misses): bounds the work of one request; the cursor resumes where it stopped.
MAX_INDEX_ROUNDS = 4
MAX_MESSAGE_ID = 2**63 - 1

_CURSOR = struct.Struct(">BBdQ")  # format version | sort | last score | last message id
_CURSOR_VERSION = 1
_CURSOR_CHARS = 24  # base64url of 18 bytes, no padding


def _invalid(field_name: str, rule: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field_name}: {rule}", field_name)


# --- cursor ----------------------------------------------------------------------------------


def encode_search_cursor(sort: SearchSort, key: SortKey) -> str:
    """Opaque cursor: base64url (no padding) of a format byte, the sort, and the last hit's
    sort values (score, message id)."""
    raw = _CURSOR.pack(_CURSOR_VERSION, SORTS.index(sort), key.score, key.message_id)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_search_cursor(cursor: str, sort: SearchSort) -> SortKey:
    """The position inside a cursor made by `encode_search_cursor` for the same sort; 422
    naming `query.cursor` for anything else."""
    invalid = _invalid("query.cursor", "not a cursor returned by this search")
    if len(cursor) != _CURSOR_CHARS or not cursor.isascii():
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise invalid from None
    if len(raw) != _CURSOR.size:
        raise invalid
    version, sort_index, score, message_id = _CURSOR.unpack(raw)
    if version != _CURSOR_VERSION or sort_index >= len(SORTS) or not 1 <= message_id:
        raise invalid
    if message_id > MAX_MESSAGE_ID or not math.isfinite(score) or score < 0:
        raise invalid
    if SORTS[sort_index] != sort:
        raise _invalid("query.cursor", f"made for sort={SORTS[sort_index]}, not sort={sort}")
    if sort == "newest" and score != 0:
        raise invalid
    key = SortKey(score, message_id)
    if encode_search_cursor(sort, key) != cursor:  # canonical form only
        raise invalid
    return key


# --- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions:
    """What a search may add to its query `q`. `since` is inclusive and `until` exclusive, both
    compared with the message id's time (the clock of record; a producer's `sent_at` is not
    trusted for ranges), both with a time zone."""

    limit: int = SEARCH_LIMIT_DEFAULT
    chat_ids: Sequence[uuid.UUID] | None = None
    sender_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    sort: str = "newest"
    cursor: str | None = None


def _id_at(moment: datetime) -> int:
    return min(MAX_MESSAGE_ID, first_id_at(int(moment.timestamp() * 1000)))


@dataclass(frozen=True)
class CheckedOptions:
    """`SearchOptions` once checked: the time range as message-id bounds ([min_id, max_id)),
    the cursor decoded."""

    limit: int
    chat_ids: list[uuid.UUID] | None
    sender_id: str | None
    min_id: int | None
    max_id: int | None
    sort: SearchSort
    after: SortKey | None


def check_query(q: object) -> str:
    if not isinstance(q, str) or not 1 <= len(q) <= QUERY_MAX_CHARS or not q.strip():
        raise _invalid("query.q", f"must be 1 to {QUERY_MAX_CHARS} characters, not only spaces")
    if not is_utf8(q):
        raise _invalid("query.q", "must be valid UTF-8 (no lone surrogates)")
    return q


def check_options(options: SearchOptions) -> CheckedOptions:
    """The options, checked; 422 naming the first offending field."""
    limit = options.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= SEARCH_LIMIT_MAX:
        raise _invalid("query.limit", f"must be between 1 and {SEARCH_LIMIT_MAX}")
    chat_ids = None if options.chat_ids is None else list(dict.fromkeys(options.chat_ids))
    if chat_ids is not None and not 1 <= len(chat_ids) <= MAX_CHAT_FILTER:
        raise _invalid("query.chat_id", f"1 to {MAX_CHAT_FILTER} chat ids")
    sender = options.sender_id
    if sender is not None and not (
        1 <= len(sender) <= MAX_SENDER_CHARS and storable_text(sender) and sender.strip()
    ):
        raise _invalid(
            "query.sender_id",
            f"must be 1 to {MAX_SENDER_CHARS} characters, visible, without control characters",
        )
    for name, moment in (("query.from", options.since), ("query.to", options.until)):
        if moment is not None and moment.utcoffset() is None:
            raise _invalid(name, "must be an ISO-8601 date-time with a time zone (Z or +hh:mm)")
    if options.since is not None and options.until is not None and options.until <= options.since:
        raise _invalid("query.to", "must be later than `from`")
    if options.sort not in SORTS:
        raise _invalid("query.sort", "must be `newest` or `relevance`")
    sort: SearchSort = "relevance" if options.sort == "relevance" else "newest"
    after = None if options.cursor is None else decode_search_cursor(options.cursor, sort)
    return CheckedOptions(
        limit=limit,
        chat_ids=chat_ids,
        sender_id=sender,
        min_id=None if options.since is None else _id_at(options.since),
        max_id=None if options.until is None else _id_at(options.until),
        sort=sort,
        after=after,
    )


# --- the search ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundMessage:
    """A decrypted message that matches, and the [start, end) code-point spans of the matched
    words in its text."""

    message: ReadMessage
    highlights: list[tuple[int, int]]


@dataclass(frozen=True)
class SearchPage:
    """Matching messages in sort order; `next_cursor` is None once the index has no more."""

    found: list[FoundMessage]
    next_cursor: str | None
    more_chats: bool = False  # the user has more chats than one search covers (newest searched)
    chats_searched: int = 0
    hits_dropped: int = field(default=0, compare=False)  # hits looked at but not returned
    decrypted: int = field(default=0, compare=False)  # envelopes opened for this page


class MessageSearch:
    """The search loop over the reader's ports. `open_row` is the reader's decryption of one
    row (raises DecryptionError, KeyDestroyed)."""

    def __init__(
        self,
        chats: ChatDirectory,
        messages: MessageSource,
        index: SearchPort,
        analyzer: TextAnalyzer,
        terms: QueryTerms,
        open_row: Callable[[StoredMessage], ReadMessage],
    ) -> None:
        self.chats = chats
        self.messages = messages
        self.index = index
        self.analyzer = analyzer
        self.terms = terms
        self.open_row = open_row

    def member_chats(self, user: str, chat_ids: list[uuid.UUID] | None) -> list[ChatRow]:
        return self.chats.member_chats(user, MAX_SEARCH_CHATS + 1, chat_ids)

    def run(
        self, user: str, q: str, options: CheckedOptions, chats: list[ChatRow] | None = None
    ) -> SearchPage:
        """One page for `user`; `chats` when the caller has read the membership already."""
        if chats is None:
            chats = self.member_chats(user, options.chat_ids)
        more_chats = len(chats) > MAX_SEARCH_CHATS
        chats = chats[:MAX_SEARCH_CHATS]
        query = parse_query(q, self.analyzer.analyze([q])[0])
        if query.empty or not chats:
            return SearchPage([], None, more_chats, len(chats))
        usable, refused = searchable_tenants(query, [c.tenant_id for c in chats], self.terms)
        if refused:
            log.warning(
                "tenants left out of a search: index key unusable", extra={"tenants": refused}
            )
            chats = [c for c in chats if c.tenant_id in set(usable)]
            if not chats:
                return SearchPage([], None, more_chats, 0)
        request = SearchRequest(
            chat_ids=[c.chat_id for c in chats],
            words=word_matches(query, [c.tenant_id for c in chats], self.terms),
            sender_id=options.sender_id,
            min_id=options.min_id,
            max_id=options.max_id,
            sort=options.sort,
            after=options.after,
            # One hit more than a page: tells whether another page exists (it is not opened).
            size=options.limit + 1,
        )
        allowed = {c.chat_id for c in chats}
        found: list[FoundMessage] = []
        dropped = 0
        decrypted = 0
        last: SortKey | None = options.after
        for _ in range(MAX_INDEX_ROUNDS):
            page = self.index.search_messages(request)
            kept, consumed, opened = self._keep(
                query, page.hits, options.limit - len(found), allowed
            )
            decrypted += opened
            found.extend(kept)
            dropped += consumed - len(kept)
            if consumed:
                last = page.hits[consumed - 1].key
            if page.exhausted and consumed == len(page.hits):  # nothing after these
                return SearchPage(found, None, more_chats, len(chats), dropped, decrypted)
            if len(found) >= options.limit:
                # A full page; hits of this index page not yet looked at come first next time.
                break
            request = replace(request, after=last)
        # A full page, or out of rounds (a short page): resume after the last hit looked at.
        cursor = None if last is None else encode_search_cursor(options.sort, last)
        return SearchPage(found, cursor, more_chats, len(chats), dropped, decrypted)

    def _keep(
        self, query: ParsedQuery, hits: list[SearchHit], room: int, allowed: set[uuid.UUID]
    ) -> tuple[list[FoundMessage], int, int]:
        """Open hits in order until `room` matching messages are kept; returns them, how many
        hits were consumed (looked at: kept or dropped) and how many envelopes were opened.
        Opens no more hits than the page can still take, a batch at a time (one analysis call
        per batch). Shared by concurrent requests: no state on `self`."""
        kept: list[FoundMessage] = []
        consumed = opened = 0
        while consumed < len(hits) and len(kept) < room:
            batch = hits[consumed : consumed + room - len(kept)]
            consumed += len(batch)
            messages: list[ReadMessage] = []
            for hit in batch:
                if hit.chat_id not in allowed:
                    continue  # the index filtered on these chats already; checked again here
                row = self.messages.get(hit.chat_id, hit.message_id)
                if row is None or row.deleted_at is not None:
                    continue  # the index lags behind deletions; the store is the truth
                opened += 1
                try:
                    messages.append(self.open_row(row))
                except KeyDestroyed:
                    continue  # its key was shredded (retention or deletion): the message is gone
            token_lists = self.analyzer.analyze([m.text for m in messages]) if messages else []
            for message, tokens in zip(messages, token_lists, strict=True):
                if text_matches(query, tokens):
                    kept.append(FoundMessage(message, highlights(query, tokens)))
        return kept, consumed, opened
