"""What a search query means: its words, its quoted phrases, the index terms each word stands
for, and, after decryption, whether a text really matches and where (highlights).

The index holds no text and no word positions, so two checks happen here on the decrypted text
of each hit: every query word is present (the last one as a prefix while it is being typed), and
every quoted phrase appears as consecutive words. Offsets are code points of the text as written
(Python string indices): an emoji is one code point (two UTF-16 units in JavaScript).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from reader.ports import QueryTerms
from sealstream.adapters.opensearch import TextToken, WordMatch
from sealstream.errors import KeyDestroyed, KmsKeyUnusable
from sealstream.keys.index_keys import KeyedWord
from sealstream.tokens import marked

QUOTE = '"'


@dataclass(frozen=True)
class QueryWord:
    """One distinct word of a query (by its folded form)."""

    token: TextToken  # its first occurrence in the query
    prefix: bool  # the last word, still being typed: matches any word starting with it


@dataclass(frozen=True)
class ParsedQuery:
    """A query's words (distinct, in order) and its quoted phrases of two words or more."""

    words: list[QueryWord]
    phrases: list[list[QueryWord]]

    @property
    def empty(self) -> bool:
        return not self.words


def _quoted_spans(q: str) -> list[tuple[int, int]]:
    """[start, end) code-point spans between double quotes; an unclosed quote runs to the end."""
    spans: list[tuple[int, int]] = []
    opened: int | None = None
    for i, char in enumerate(q):
        if char != QUOTE:
            continue
        if opened is None:
            opened = i + 1
        else:
            spans.append((opened, i))
            opened = None
    if opened is not None:
        spans.append((opened, len(q)))
    return spans


def parse_query(q: str, tokens: list[TextToken]) -> ParsedQuery:
    """The meaning of `q` given its tokens (`TextAnalyzer.analyze([q])[0]`).

    The last word is a prefix when `q` ends inside it (nothing, not even a space, a quote or
    punctuation, after it): search-as-you-type. A word repeated counts once.
    """
    if not tokens:
        return ParsedQuery(words=[], phrases=[])
    typing = tokens[-1].end == len(q)
    occurrence = [
        QueryWord(token, typing and i == len(tokens) - 1) for i, token in enumerate(tokens)
    ]
    counts = Counter(token.folded for token in tokens)
    by_folded: dict[str, QueryWord] = {}
    for o in occurrence:
        # A word typed whole earlier in the query needs no prefix match ("ab ab").
        by_folded.setdefault(
            o.token.folded, QueryWord(o.token, o.prefix and counts[o.token.folded] == 1)
        )
    words = list(by_folded.values())
    phrases: list[list[QueryWord]] = []
    for start, end in _quoted_spans(q):
        inside = [o for o in occurrence if start <= o.token.start and o.token.end <= end]
        if len(inside) >= 2:
            phrases.append(inside)
    return ParsedQuery(words=words, phrases=phrases)


# --- index terms -----------------------------------------------------------------------------


class PlainQueryTerms:
    """Query terms of a tenant without a blind index: the word itself (SEARCH_CONTRACT.md).

    A message holds each word as written (`term`) and, when it differs, its accent-folded form
    `marked` (sealstream.tokens.FOLDED_MARK). A query word matches a message holding its folded
    form as written (`cafe` in the text) or marked (`café` in the text), or its own `term`; only
    `exact` (the `term`) raises the score, so the spelling as typed ranks first both ways. The
    unmarked folded form and the `term` also find documents indexed before ICU analysis (migrated
    in place, not yet re-indexed), which hold only the words as written."""

    def word_match(self, tenant_id: str, token: TextToken, prefix: bool) -> WordMatch:
        return WordMatch(
            any_of=_distinct([token.folded, marked(token.folded), token.term]),
            exact=[token.term],
            prefix=token.folded if prefix else None,
        )


class KeyedWords(Protocol):
    """A blind-index tenant's keyed terms of one query word (`IndexKeys.query_word`)."""

    def query_word(self, tenant_id: str, term: str, folded: str) -> KeyedWord | None:
        """None for a plain tenant."""
        ...


class TenantQueryTerms:
    """Query terms per tenant: the plain words (`PlainQueryTerms`) for a plain tenant, the
    keyed terms under every live index key for a blind-index tenant. Keyed terms match whole
    words only: HMACs of words have no prefixes in common, so there is no prefix match."""

    def __init__(self, keys: KeyedWords) -> None:
        self.keys = keys
        self.plain = PlainQueryTerms()

    def word_match(self, tenant_id: str, token: TextToken, prefix: bool) -> WordMatch:
        keyed = self.keys.query_word(tenant_id, token.term, token.folded)
        if keyed is None:
            return self.plain.word_match(tenant_id, token, prefix)
        return WordMatch(any_of=keyed.any_of, exact=keyed.exact)


def _distinct(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def searchable_tenants(
    query: ParsedQuery, tenant_ids: Sequence[str], terms: QueryTerms
) -> tuple[list[str], list[str]]:
    """(tenants whose chats can be searched, tenants whose can not), each sorted.

    A blind-index tenant whose index key the KMS refuses for good (its master key deleted, a
    wrapped key invalid: `KmsKeyUnusable`) or whose keys were all destroyed has no query terms:
    its chats are left out of the search rather than failing it, so one tenant's lost key does
    not break every search of a user whose chats span tenants. Its messages could not be opened
    either (its DEKs are wrapped by the same master key). A KMS outage (`KmsUnavailable`) still
    raises: the answer is a 503 and the client retries."""
    usable: list[str] = []
    refused: list[str] = []
    for tenant in sorted(set(tenant_ids)):
        try:
            for word in query.words:
                terms.word_match(tenant, word.token, word.prefix)
        except (KmsKeyUnusable, KeyDestroyed):
            refused.append(tenant)
        else:
            usable.append(tenant)
    return usable, refused


def word_matches(
    query: ParsedQuery, tenant_ids: Sequence[str], terms: QueryTerms
) -> list[WordMatch]:
    """One `WordMatch` per query word, the union over the tenants of the searched chats (a
    user's chats can span tenants, some blind; keyed terms of different keys do not collide).
    The prefix is the first tenant's that offers one (a plain tenant's); the index applies it to
    plain documents only, never to a blind tenant's keyed tokens (`SearchIndex.search_messages`)."""
    found: list[WordMatch] = []
    for word in query.words:
        per_tenant = [terms.word_match(t, word.token, word.prefix) for t in sorted(set(tenant_ids))]
        found.append(
            WordMatch(
                any_of=_distinct([term for m in per_tenant for term in m.any_of]),
                exact=_distinct([term for m in per_tenant for term in m.exact]),
                prefix=next((m.prefix for m in per_tenant if m.prefix), None),
            )
        )
    return found


# --- after decryption ------------------------------------------------------------------------


def _word_at(word: QueryWord, token: TextToken) -> bool:
    """Does the text's `token` match the query's `word` (accent-insensitive, prefix if typing)?"""
    wanted = word.token.folded
    if word.prefix:
        return token.folded.startswith(wanted) or token.term.startswith(wanted)
    return wanted in (token.folded, token.term)


def _phrase_in(phrase: list[QueryWord], tokens: list[TextToken]) -> bool:
    at: dict[int, list[TextToken]] = {}
    for token in tokens:
        at.setdefault(token.position, []).append(token)
    for token in tokens:
        if not _word_at(phrase[0], token):
            continue
        first = token.position
        if all(
            any(_word_at(word, t) for t in at.get(first + i, ()))
            for i, word in enumerate(phrase[1:], start=1)
        ):
            return True
    return False


def text_matches(query: ParsedQuery, tokens: list[TextToken]) -> bool:
    """Whether a decrypted text (its tokens) holds every word and every phrase of `query`."""
    if query.empty:
        return False
    if not all(any(_word_at(w, t) for t in tokens) for w in query.words):
        return False
    return all(_phrase_in(phrase, tokens) for phrase in query.phrases)


def highlights(query: ParsedQuery, tokens: list[TextToken]) -> list[tuple[int, int]]:
    """[start, end) code-point spans of the text's words that match a query word, in text order
    (every occurrence; a phrase's words are highlighted wherever they occur)."""
    spans = {(t.start, t.end) for t in tokens if any(_word_at(w, t) for w in query.words)}
    return sorted(spans)
