"""Search tokens of a message: what the search index holds instead of the text.

An analyzer turns text into the *unordered set* of its normalised words: Unicode NFKC, then
casefold, then split into words; duplicates are dropped and the rest sorted, so neither word order
nor repetitions nor punctuation survive (docs/security.md, "What a leak of one store reveals").
The indexer analyses each message in-process and sends only the tokens to OpenSearch; the reader
analyses a query with the same analyzer, and a message matches when it holds every query token.

Analyzers are chosen by name (`SEALSTREAM_OPENSEARCH__ANALYZER`) so another one (e.g. ICU word
breaking) can be added later; an index must be rebuilt when its analyzer changes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

Analyzer = Callable[[str], list[str]]

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
_ASCII_WORD = re.compile(r"[a-z0-9]+")


def unicode_words(text: str) -> list[str]:
    """Analyzer "unicode-words-v1": sorted distinct NFKC-casefolded words of `text`.

    A word is a run of letters and digits (with the combining marks inside it); any other
    character separates words, so "e-mail" gives "e" and "mail" and "don't" gives "don" and "t".
    Characters of the scripts above are single-character tokens. Words longer than
    MAX_TOKEN_CHARS are cut into pieces of that length.
    """
    normalised = unicodedata.normalize("NFKC", text).casefold()
    if normalised.isascii():
        words = _ASCII_WORD.findall(normalised)
    else:
        classes = normalised.translate(_CLASSES)  # one class letter per character
        words = [normalised[m.start() : m.end()] for m in _TOKEN_CLASSES.finditer(classes)]
    found = {
        word[start : start + MAX_TOKEN_CHARS]
        for word in words
        for start in range(0, len(word), MAX_TOKEN_CHARS)
    }
    return sorted(found)


ANALYZERS: dict[str, Analyzer] = {"unicode-words-v1": unicode_words}
DEFAULT_ANALYZER = "unicode-words-v1"


def analyzer(name: str) -> Analyzer:
    """The analyzer called `name`; ValueError naming the known ones otherwise."""
    try:
        return ANALYZERS[name]
    except KeyError:
        known = ", ".join(sorted(ANALYZERS))
        raise ValueError(
            f"opensearch.analyzer: unknown analyzer {name!r} (known: {known})"
        ) from None
