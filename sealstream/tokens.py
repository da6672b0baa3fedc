"""Search tokens of a message: what the search index holds instead of the text.

The words of a text come from OpenSearch's ICU analysis (the index's `message_words` analyzer,
schemas/opensearch/messages.json; docs/search.md, "Analysis"): the adapter sends a batch of texts
to `_analyze` and this module turns the answer into one list of `TextToken` per text (pure code,
no I/O). A message's index terms are `document_terms` of its tokens: the *unordered set* of its
normalised and accent-folded words, so neither word order, repetitions nor punctuation reach the
index (docs/security.md, "What the search index holds").

`_analyze` reports the tokens of all the texts of one request as one stream: offsets are Java UTF-16
code units counted across the texts (each text after the previous one's length + 1) and positions
continue across texts; `split_analyzed` undoes both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# `_analyze` adds this many UTF-16 units between consecutive texts of one request (Lucene's
# Analyzer.getOffsetGap, 1 for a custom analyzer).
OFFSET_GAP = 1
_ASTRAL = "\U00010000"


@dataclass(frozen=True, slots=True)
class TextToken:
    """One word of a text as the index's analyzer sees it."""

    term: str  # the word normalised: NFKC + case folding (icu_normalizer nfkc_cf)
    folded: str  # `term` accent-folded (icu_folding); == term when nothing to fold
    start: int  # code-point offsets into the analysed text: text[start:end] is the word as written
    end: int
    position: int  # 0, 1, 2 ... word position in the text (for phrase checks)


FOLDED_MARK = "~"
"""Put before a word's accent-folded form in a message's index terms when it differs from the
word as written (`café` is indexed as `café` and `~cafe`). A query for `cafe` then matches both
`cafe` and `~cafe`, yet only a message that holds `cafe` as written matches its exact term, so
exact spellings rank first in both directions (docs/search.md, "Analysis"). No analysed word
starts with `~` (ICU word breaking never puts it in a token), and keyed terms never hold one."""


def marked(folded: str) -> str:
    """The index term of an accent-folded form that differs from its word (`FOLDED_MARK`)."""
    return FOLDED_MARK + folded


def document_terms(tokens: Sequence[TextToken]) -> list[str]:
    """A message's index terms, sorted and distinct: every `term`, and every `folded` that
    differs from its term, `marked`."""
    found = {token.term for token in tokens}
    found.update(marked(token.folded) for token in tokens if token.folded != token.term)
    return sorted(found)


def utf16_length(text: str) -> int:
    """How many UTF-16 code units `text` is (what Java's offsets count)."""
    if text.isascii() or max(text) < _ASTRAL:
        return len(text)
    return len(text) + sum(1 for char in text if char >= _ASTRAL)


def split_terms(texts: Sequence[str], tokens: Sequence[dict[str, Any]]) -> list[list[str]]:
    """`document_terms` of each text straight from an `_analyze` answer that holds only `token`
    and `start_offset` (the indexer's path: it needs no offsets or positions, and parsing half
    the fields halves its CPU per message). Equal to `document_terms` of `split_analyzed`: a
    token at the same offset as the one before is that word's folded form (the analyzer emits
    it only when it differs), `marked`; an empty folded form (which `split_analyzed` replaces
    by the term) is dropped. ValueError like `split_analyzed`."""
    found: list[set[str]] = [set() for _ in texts]
    if not tokens:
        return [[] for _ in texts]
    ends: list[int] = []
    base = 0
    for text in texts:
        length = utf16_length(text)
        ends.append(base + length)
        base += length + OFFSET_GAP
    which = 0
    end = ends[0]
    current = found[0]
    last_start, last_term = -1, ""  # a word's folded form follows it at the same offsets
    for item in tokens:
        start = item["start_offset"]
        if start > end:
            while start > ends[which]:
                which += 1
                if which == len(texts):
                    raise ValueError("an _analyze token lies beyond the texts sent")
            end, current, last_start = ends[which], found[which], -1
        if start == last_start:
            # Empty: folding left nothing, the word stands for itself (as in `split_analyzed`).
            if item["token"] and item["token"] != last_term:
                current.add(marked(item["token"]))
            last_start = -1  # a third token at one offset would be another word
        else:
            current.add(item["token"])
            last_start, last_term = start, item["token"]
    for terms in found:
        terms.discard("")
    return [sorted(terms) for terms in found]


def utf16_units(text: str) -> list[int] | None:
    """Code-point offset of each UTF-16 unit of `text` (and of its end), or None when the two
    agree (no character outside the Basic Multilingual Plane: the common case, checked in C)."""
    if text.isascii() or max(text) < _ASTRAL:
        return None
    table: list[int] = []
    for index, char in enumerate(text):
        table.append(index)
        if char >= _ASTRAL:  # a surrogate pair: its second unit is still this code point
            table.append(index)
    table.append(len(text))
    return table


def split_analyzed(texts: Sequence[str], tokens: Sequence[dict[str, Any]]) -> list[list[TextToken]]:
    """The tokens of one `_analyze` answer for `texts`, as one list of `TextToken` per text.

    `tokens`: the answer's `tokens` array, in stream order, each with `token`, `start_offset`,
    `end_offset` (UTF-16, across texts) and `position`. The analyzer emits each word's `term`
    first and, at the same position, its folded form only when that differs (`multiplexer` with
    `preserve_original`, duplicates removed). ValueError if an offset lies outside the texts
    (the analyzer's offsets are not what this module expects).
    """
    result: list[list[TextToken]] = [[] for _ in texts]
    if not tokens:
        return result
    tables = [utf16_units(text) for text in texts]
    ends: list[int] = []  # each text's end in the request's UTF-16 offsets
    base = 0
    for text, table in zip(texts, tables, strict=True):
        length = len(text) if table is None else len(table) - 1
        ends.append(base + length)
        base += length + OFFSET_GAP
    which = 0
    start_of_text = 0
    first_position = -1
    words: list[TextToken] = result[0]
    table = tables[0]
    last: TextToken | None = None
    for item in tokens:
        start = item["start_offset"]
        while start > ends[which]:  # a token of a later text (texts without tokens skipped)
            start_of_text = ends[which] + OFFSET_GAP
            which += 1
            if which == len(texts):
                raise ValueError("an _analyze token lies beyond the texts sent")
            words, table, first_position, last = result[which], tables[which], -1, None
        position = item["position"]
        if first_position < 0:
            first_position = position
        if last is not None and last.position == position - first_position:
            # The folded form of the word before (same position): it replaces `folded`, unless
            # folding left nothing (a word of marks only, e.g. a tatweel): then the word stays.
            folded = item["token"] or last.term
            words[-1] = TextToken(last.term, folded, last.start, last.end, last.position)
            last = None  # a third token at one position would be another word: never merged
            continue
        local_start = start - start_of_text
        local_end = item["end_offset"] - start_of_text
        if table is not None:
            local_start, local_end = table[local_start], table[local_end]
        term = item["token"]
        last = TextToken(term, term, local_start, local_end, position - first_position)
        words.append(last)
    return result
