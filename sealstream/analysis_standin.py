"""STAND-IN for `SearchIndex.analyze` until the `icu` branch merges (SEARCH_CONTRACT.md).

MERGE(icu): delete this module; reader/wiring.py then passes the `SearchIndex` itself as the
reader's `TextAnalyzer` (its `analyze` has the same signature and returns the same
`TextToken`s). Nothing else imports this module.

Built on today's analyzer (sealstream.tokens, "unicode-words-v1"), so a query analysed here meets
the tokens the indexer of this branch stores: every token's `term` is the NFKC-casefolded word,
`folded == term` (no accent folding: the stored index holds no folded forms yet), `position`
counts words in text order, and `start`/`end` are code-point offsets into the text as written.
"""

from __future__ import annotations

import unicodedata

from sealstream.adapters.opensearch import TextToken
from sealstream.tokens import _CLASSES, _TOKEN_CLASSES, MAX_TOKEN_CHARS


def _normalised_with_origins(text: str) -> tuple[str, list[int], list[int]]:
    """NFKC-casefolded `text`, and for each of its characters the [start, end) code-point span
    of the original unit it came from. A unit is one character with the combining marks after
    it, normalised on its own (so the mapping back is exact; whole-text NFKC gives the same
    characters for every text the unit tests try)."""
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i = 0
    while i < len(text):
        j = i + 1
        while j < len(text) and unicodedata.category(text[j])[0] == "M":
            j += 1
        piece = unicodedata.normalize("NFKC", text[i:j]).casefold()
        out.append(piece)
        starts.extend([i] * len(piece))
        ends.extend([j] * len(piece))
        i = j
    return "".join(out), starts, ends


def analyze_one(text: str) -> list[TextToken]:
    """The tokens of one text, in text order (see the module docstring)."""
    normalised, starts, ends = _normalised_with_origins(text)
    classes = normalised.translate(_CLASSES)
    tokens: list[TextToken] = []
    for match in _TOKEN_CLASSES.finditer(classes):
        for cut in range(match.start(), match.end(), MAX_TOKEN_CHARS):
            stop = min(cut + MAX_TOKEN_CHARS, match.end())
            term = normalised[cut:stop]
            tokens.append(
                TextToken(
                    term=term,
                    folded=term,
                    start=starts[cut],
                    end=ends[stop - 1],
                    position=len(tokens),
                )
            )
    return tokens


class StandInAnalyzer:
    """`analyze(texts)` with the contract's signature, computed in this process."""

    def analyze(self, texts: list[str]) -> list[list[TextToken]]:
        return [analyze_one(text) for text in texts]
