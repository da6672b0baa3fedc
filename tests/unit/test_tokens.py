"""How an `_analyze` answer for a batch of texts becomes one token list per text (no server:
answers shaped like OpenSearch's; tests/integration/test_search_languages.py runs the real one)."""

from __future__ import annotations

import pytest

from sealstream.tokens import (
    TextToken,
    document_terms,
    split_analyzed,
    split_terms,
    utf16_units,
)


def token(text: str, start: int, end: int, position: int) -> dict[str, object]:
    return {"token": text, "start_offset": start, "end_offset": end, "position": position}


def test_tokens_go_back_to_their_text_with_code_point_offsets() -> None:
    # UTF-16 offsets run across the texts, each after the previous one's length + 1; the emoji
    # is two units; positions continue with a gap of 100 between texts.
    texts = ["Café 😀 ok", "", "   ", "naïve"]
    answer = [
        token("café", 0, 4, 0),
        token("cafe", 0, 4, 0),  # the folded form, same position
        token("😀", 5, 7, 1),
        token("ok", 8, 10, 2),
        token("naïve", 16, 21, 303),
        token("naive", 16, 21, 303),
    ]
    split = split_analyzed(texts, answer)
    assert split == [
        [
            TextToken("café", "cafe", 0, 4, 0),
            TextToken("😀", "😀", 5, 6, 1),
            TextToken("ok", "ok", 7, 9, 2),
        ],
        [],
        [],
        [TextToken("naïve", "naive", 0, 5, 0)],
    ]
    assert [texts[0][t.start : t.end] for t in split[0]] == ["Café", "😀", "ok"]


def test_no_tokens_and_tokens_beyond_the_texts() -> None:
    assert split_analyzed(["...", "?!"], []) == [[], []]
    with pytest.raises(ValueError, match="beyond the texts"):
        split_analyzed(["ab"], [token("zz", 5, 7, 0)])


def test_utf16_table_only_when_needed() -> None:
    assert utf16_units("plain ascii") is None and utf16_units("東京 ünï") is None
    assert utf16_units("a😀b") == [0, 1, 1, 2, 3]


def test_document_terms_are_the_words_and_their_differing_folded_forms_marked() -> None:
    tokens = [
        TextToken("café", "cafe", 0, 4, 0),
        TextToken("cafe", "cafe", 5, 9, 1),
        TextToken("b", "b", 10, 11, 2),
    ]
    # `cafe` as written and `café`'s folded form are different terms: a query for `cafe` can
    # rank the message that holds `cafe` as written above one that holds only `café`.
    assert document_terms(tokens) == ["b", "cafe", "café", "~cafe"]
    assert document_terms(tokens[1:]) == ["b", "cafe"]
    assert document_terms([]) == []


def test_a_word_folding_cannot_empty_keeps_its_term() -> None:
    # ICU folding maps an Arabic tatweel to nothing: the word stays searchable as written.
    split = split_analyzed(["ـ"], [token("ـ", 0, 1, 0), token("", 0, 1, 0)])
    assert split == [[TextToken("ـ", "ـ", 0, 1, 0)]]
    assert document_terms(split[0]) == ["ـ"]


def test_split_terms_is_document_terms_of_split_analyzed() -> None:
    texts = ["Café 😀 ok", "", "ـ", "naïve café"]
    answer = [
        token("café", 0, 4, 0),
        token("cafe", 0, 4, 0),
        token("😀", 5, 7, 1),
        token("ok", 8, 10, 2),
        token("ـ", 12, 13, 203),
        token("", 12, 13, 203),
        token("naïve", 14, 19, 304),
        token("naive", 14, 19, 304),
        token("café", 20, 24, 305),
        token("cafe", 20, 24, 305),
    ]
    short = [{"token": t["token"], "start_offset": t["start_offset"]} for t in answer]
    expected = [document_terms(tokens) for tokens in split_analyzed(texts, answer)]
    assert split_terms(texts, short) == expected
    assert expected == [
        ["café", "ok", "~cafe", "😀"],
        [],
        ["ـ"],
        ["café", "naïve", "~cafe", "~naive"],
    ]
    assert split_terms(["a"], []) == [[]]
    with pytest.raises(ValueError, match="beyond the texts"):
        split_terms(["ab"], [{"token": "zz", "start_offset": 5}])
