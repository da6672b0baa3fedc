"""A small fake of `SearchIndex.analyze` for unit tests of the reader (no OpenSearch).

The real analysis is OpenSearch's ICU analysis (docs/search.md, "Analysis"; its own tests are
tests/integration/test_search_languages.py). This fake keeps the reader's logic testable without a
server: every token's `term` is the NFKC-casefolded word, `folded == term` (no accent folding),
`position` counts words in text order, and `start`/`end` are code-point offsets into the text as
written. Words are runs of letters/digits; CJK, Thai, Lao, Khmer and Myanmar characters are one
token each (the pre-ICU Python analyzer's rules).
"""

from __future__ import annotations

import re
import unicodedata

from sealstream.tokens import TextToken

MAX_TOKEN_CHARS = 255
"""Longer words are cut into pieces of this many characters (as OpenSearch's standard tokenizer
does): a keyword term must stay well under Lucene's 32,766-byte limit."""

# Scripts written without spaces between words: every character is a token of its own (with the
# combining marks that follow it), as OpenSearch's standard tokenizer does for Han and Hiragana.
# Katakana, Thai, Lao, Khmer and Myanmar runs are kept whole by that tokenizer; here they are split
# into characters too, so that a word inside a run is still found. Ranges of code points.
_SINGLE_CHARACTER_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # ideographic iteration mark, closing mark, number zero
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3038, 0x303B),
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x16FE0, 0x16FFF),  # ideographic symbols
    (0x1B000, 0x1B16F),  # Kana supplement, extended
    (0x20000, 0x323AF),  # CJK extensions B-H, compatibility supplement
)


def _single_character(code: int) -> bool:
    return any(low <= code <= high for low, high in _SINGLE_CHARACTER_SCRIPTS)


class _Classes(dict[int, str]):
    """Code point -> class letter, for `str.translate`: "w" letter or digit (categories L*, N*),
    "m" combining mark (M*), "s" a character of the scripts above, " " anything else.
    Computed on first sight and kept (up to a bound, so odd input cannot grow it without end)."""

    LIMIT = 65_536

    def __missing__(self, code: int) -> str:
        major = unicodedata.category(chr(code))[0]
        if major == "M":
            found = "m"
        elif _single_character(code):
            found = "s"
        else:
            found = "w" if major in "LN" else " "
        if len(self) < self.LIMIT:
            self[code] = found
        return found


_CLASSES = _Classes()
# A token: one single-script character with its marks, or a run of letters/digits and marks.
_TOKEN_CLASSES = re.compile(r"sm*|w[wm]*")


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
