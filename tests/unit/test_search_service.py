# ruff: noqa: RUF001 (fullwidth letters on purpose: NFKC must find them)
"""Search across a user's chats (reader.search, reader.query) over the fakes of our own ports
(tests/unit/test_reader_service.py) and the real envelope crypto: membership, filters, paging
with cursors, phrases, highlights on non-ASCII text, and the stand-in analyzer."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from reader.query import PlainQueryTerms, parse_query, word_matches
from reader.search import (
    MAX_INDEX_ROUNDS,
    SearchOptions,
    SearchPage,
    decode_search_cursor,
    encode_search_cursor,
)
from reader.service import ReaderService
from schemas.ids import id_millis
from sealstream.adapters.opensearch import SearchHits, SearchRequest, SortKey, TextToken, WordMatch
from sealstream.errors import KmsKeyUnusable
from sealstream.http import ApiError
from tests.fake_analysis import StandInAnalyzer, analyze_one
from tests.unit.test_reader_service import World, api_error


@pytest.fixture
def world() -> World:
    return World()


def texts(page: SearchPage) -> list[str]:
    return [f.message.text for f in page.found]


def all_pages(world: World, user: str, q: str, **options: object) -> list[SearchPage]:
    pages: list[SearchPage] = []
    cursor: str | None = None
    while True:
        opts = SearchOptions(cursor=cursor, **options)  # type: ignore[arg-type]
        pages.append(world.service.search_all(user, q, opts))
        cursor = pages[-1].next_cursor
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


# --- membership ------------------------------------------------------------------------------


def test_finds_messages_of_every_chat_of_the_user_and_no_other(world: World) -> None:
    mine = [world.chat(("alice", "bob")), world.chat(("carol", "alice")), world.chat(("alice",))]
    theirs = world.chat(("carol", "dave"))
    for n, chat in enumerate(mine):
        world.post(chat, f"quokka sighting {n}")
    world.post(theirs, "quokka for carol only")
    page = world.service.search_all("alice", "quokka")
    assert texts(page) == ["quokka sighting 2", "quokka sighting 1", "quokka sighting 0"]
    assert {f.message.chat_id for f in page.found} == set(mine)
    assert texts(world.service.search_all("dave", "quokka")) == ["quokka for carol only"]
    assert world.service.search_all("mallory", "quokka").found == []


def test_removed_member_stops_finding_the_chat_at_once(world: World) -> None:
    chat = world.chat(("alice", "bob"))
    world.post(chat, "the vault code")
    assert texts(world.service.search_all("bob", "vault")) == ["the vault code"]
    assert texts(world.service.search("bob", chat, "vault")) == ["the vault code"]
    row = world.chats.rows[chat]
    world.chats.rows[chat] = replace(row, participants=("alice",))
    # Even with the chat row still in the per-chat cache, membership is read afresh.
    assert world.service.search_all("bob", "vault").found == []
    with pytest.raises(ApiError) as excinfo:
        world.service.search("bob", chat, "vault")
    assert api_error(excinfo)[:2] == (403, "forbidden")


def test_deleted_chat_and_deleted_message_never_appear(world: World) -> None:
    kept, deleted_chat = world.chat(), world.chat()
    live = world.post(kept, "heron one")
    gone = world.post(kept, "heron two")
    world.post(deleted_chat, "heron three")
    world.delete(kept, gone)  # the index still holds it
    world.chats.rows[deleted_chat] = replace(world.chats.rows[deleted_chat], state="deleted")
    page = world.service.search_all("alice", "heron")
    assert [f.message.message_id for f in page.found] == [str(live)]
    assert page.hits_dropped == 1


def test_shredded_key_version_is_skipped_not_an_error(world: World) -> None:
    chat = world.chat()
    world.post(chat, "osprey before")
    world.keys.new_version(chat)
    world.post(chat, "osprey after")
    world.keys.destroyed.add((chat, 1))  # retention destroyed version 1
    assert texts(world.service.search_all("alice", "osprey")) == ["osprey after"]
    assert texts(world.service.search("alice", chat, "osprey")) == ["osprey after"]


def test_chat_filter_only_narrows_and_foreign_chats_add_nothing(world: World) -> None:
    a, b = world.chat(), world.chat()
    foreign = world.chat(("carol",))
    world.post(a, "kestrel in a")
    world.post(b, "kestrel in b")
    world.post(foreign, "kestrel foreign")
    only_b = world.service.search_all("alice", "kestrel", SearchOptions(chat_ids=[b]))
    assert texts(only_b) == ["kestrel in b"]
    both = world.service.search_all("alice", "kestrel", SearchOptions(chat_ids=[a, b, foreign]))
    assert texts(both) == ["kestrel in b", "kestrel in a"]
    assert (
        world.service.search_all("alice", "kestrel", SearchOptions(chat_ids=[foreign])).found == []
    )
    unknown = SearchOptions(chat_ids=[uuid.uuid4()])
    assert world.service.search_all("alice", "kestrel", unknown).found == []


# --- filters ---------------------------------------------------------------------------------


def test_sender_and_time_range_filters(world: World) -> None:
    chat = world.chat(("alice", "bob"))
    ids = [
        world.post(chat, f"plover {n}", sender="bob" if n % 2 else "alice", step_ms=60_000)
        for n in range(6)
    ]
    by_bob = world.service.search_all("alice", "plover", SearchOptions(sender_id="bob"))
    assert texts(by_bob) == ["plover 5", "plover 3", "plover 1"]
    at = [datetime.fromtimestamp(id_millis(i) / 1000, UTC) for i in ids]
    window = SearchOptions(since=at[1], until=at[4])  # from inclusive, to exclusive
    assert texts(world.service.search_all("alice", "plover", window)) == [
        "plover 3",
        "plover 2",
        "plover 1",
    ]
    both = SearchOptions(since=at[1], until=at[4], sender_id="alice")
    assert texts(world.service.search_all("alice", "plover", both)) == ["plover 2"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (SearchOptions(limit=0), "query.limit"),
        (SearchOptions(limit=51), "query.limit"),
        (SearchOptions(chat_ids=[uuid.uuid4() for _ in range(101)]), "query.chat_id"),
        (SearchOptions(chat_ids=[]), "query.chat_id"),
        (SearchOptions(sender_id=""), "query.sender_id"),
        (SearchOptions(sender_id="a\x00b"), "query.sender_id"),
        (SearchOptions(sender_id="x" * 129), "query.sender_id"),
        (SearchOptions(since=datetime(2026, 12, 1)), "query.from"),
        (SearchOptions(until=datetime(2026, 12, 1)), "query.to"),
        (
            SearchOptions(
                since=datetime(2026, 12, 2, tzinfo=UTC), until=datetime(2026, 12, 1, tzinfo=UTC)
            ),
            "query.to",
        ),
        (SearchOptions(sort="oldest"), "query.sort"),
        (SearchOptions(cursor="not-a-cursor"), "query.cursor"),
        (
            SearchOptions(cursor=encode_search_cursor("relevance", SortKey(1.0, 5))),
            "query.cursor",
        ),
    ],
)
def test_every_option_is_checked_with_a_422_naming_it(
    world: World, options: SearchOptions, field: str
) -> None:
    world.post(world.chat(), "anything")
    with pytest.raises(ApiError) as excinfo:
        world.service.search_all("alice", "anything", options)
    assert api_error(excinfo) == (422, "invalid_request", field)
    assert world.search.requests == [] and world.chats.member_lookups == 0


@pytest.mark.parametrize("q", ["", "   ", "x" * 257, "a\ud800"])
def test_bad_query_is_422(world: World, q: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        world.service.search_all("alice", q)
    assert api_error(excinfo) == (422, "invalid_request", "query.q")


# --- paging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sort", ["newest", "relevance"])
def test_paging_has_no_duplicates_and_no_gaps(world: World, sort: str) -> None:
    chats = [world.chat() for _ in range(3)]
    posted = []
    for n in range(23):
        # Half spelled with an accent: relevance ranks "café" (exact) above "cafe" for q=café
        # once the index folds accents; the stand-in does not fold, so all score alike here.
        posted.append(world.post(chats[n % 3], f"café meeting {n}"))
    pages = all_pages(world, "alice", "café", limit=5, sort=sort)
    ids = [int(f.message.message_id) for p in pages for f in p.found]
    assert len(ids) == len(set(ids)) == 23 and set(ids) == set(posted)
    assert [len(p.found) for p in pages] == [5, 5, 5, 5, 3]
    assert ids == sorted(posted, reverse=True)  # equal scores: newest first


def test_hits_dropped_after_decryption_still_move_the_cursor(world: World) -> None:
    chat = world.chat()
    wanted = [world.post(chat, f"red fox number {n}") for n in range(3)]
    # Many newer messages hold both words but not the phrase "red fox": dropped after decryption.
    for n in range(4 * MAX_INDEX_ROUNDS):
        world.post(chat, f"fox and red {n}")
    pages = all_pages(world, "alice", '"red fox"', limit=3)
    got = [f.message.message_id for p in pages for f in p.found]
    assert got == [str(i) for i in reversed(wanted)]
    assert pages[0].found == [] and pages[0].next_cursor is not None  # a short, empty page
    assert len(world.search.requests) <= MAX_INDEX_ROUNDS * len(pages)


def test_tampered_cursor_reveals_nothing_of_other_chats(world: World) -> None:
    mine, theirs = world.chat(), world.chat(("carol",))
    secret = world.post(theirs, "zircon secret")
    world.post(mine, "zircon mine")
    # A cursor placed just above the other chat's message: membership still filters.
    forged = encode_search_cursor("newest", SortKey(0.0, secret + 1))
    page = world.service.search_all("alice", "zircon", SearchOptions(cursor=forged))
    assert all(f.message.chat_id == mine for f in page.found)
    assert world.search.requests[-1].chat_ids == [mine]


def test_cursor_round_trip_and_canonical_form() -> None:
    key = SortKey(2.0, 0xFBFF_FEFF_FFFF_FFF)  # bytes that base64 spells with "-" and "_"
    cursor = encode_search_cursor("relevance", key)
    assert decode_search_cursor(cursor, "relevance") == key
    assert len(cursor) == 24 and cursor.isascii()
    raw = base64.urlsafe_b64decode(cursor)
    bad_version = base64.urlsafe_b64encode(b"\x02" + raw[1:]).decode()
    bad_sort = base64.urlsafe_b64encode(raw[:1] + b"\x07" + raw[2:]).decode()
    standard_alphabet = base64.b64encode(raw).decode()  # "+" and "/" are not base64url
    assert standard_alphabet != cursor
    for bad in (cursor[:-1], cursor + "A", bad_version, bad_sort, standard_alphabet, "=" * 24):
        with pytest.raises(ApiError) as excinfo:
            decode_search_cursor(bad, "relevance")
        assert excinfo.value.field == "query.cursor"
    with pytest.raises(ApiError):
        decode_search_cursor(encode_search_cursor("newest", SortKey(1.0, 5)), "newest")
    with pytest.raises(ApiError):
        decode_search_cursor(encode_search_cursor("newest", SortKey(float("nan"), 5)), "newest")


# --- query semantics -------------------------------------------------------------------------


def test_phrase_words_must_be_consecutive(world: World) -> None:
    chat = world.chat()
    world.post(chat, "the quick brown fox")
    world.post(chat, "brown and quick")
    world.post(chat, "Quick, brown!")  # punctuation between words does not break a phrase
    assert texts(world.service.search_all("alice", '"quick brown"')) == [
        "Quick, brown!",
        "the quick brown fox",
    ]
    assert len(world.service.search_all("alice", "quick brown ").found) == 3


def test_last_word_is_a_prefix_while_typing(world: World) -> None:
    chat = world.chat()
    world.post(chat, "a quokka appeared")
    world.post(chat, "quorum reached")
    assert texts(world.service.search_all("alice", "quok")) == ["a quokka appeared"]
    assert texts(world.service.search_all("alice", "quo")) == [
        "quorum reached",
        "a quokka appeared",
    ]
    assert world.service.search_all("alice", "quok ").found == []  # a finished word is whole
    assert world.service.search_all("alice", '"quok"').found == []


def test_parse_query_words_phrases_and_prefix() -> None:
    q = 'Café "red  fox" cafe ab'
    query = parse_query(q, analyze_one(q))
    assert [(w.token.term, w.prefix) for w in query.words] == [
        ("café", False),
        ("red", False),
        ("fox", False),
        ("cafe", False),
        ("ab", True),
    ]
    assert [[w.token.term for w in p] for p in query.phrases] == [["red", "fox"]]
    repeated = "ab ab"
    assert [w.prefix for w in parse_query(repeated, analyze_one(repeated)).words] == [False]
    unclosed = 'x "open phr'
    parsed = parse_query(unclosed, analyze_one(unclosed))
    assert [[(w.token.term, w.prefix) for w in p] for p in parsed.phrases] == [
        [("open", False), ("phr", True)]
    ]
    assert parse_query("?!", analyze_one("?!")).empty


def test_word_matches_follow_the_contract_and_union_tenants() -> None:
    token = TextToken(term="café", folded="cafe", start=0, end=4, position=0)

    class Keyed:
        def word_match(self, tenant_id: str, token: TextToken, prefix: bool) -> WordMatch:
            if tenant_id == "plain":
                return PlainQueryTerms().word_match(tenant_id, token, prefix)
            return WordMatch(any_of=[f"k:{token.folded}"], exact=[f"k:{token.term}"])

    q = "café"
    query = parse_query(q, [token])
    assert word_matches(query, ["plain"], PlainQueryTerms()) == [
        # `term` too: documents indexed before ICU analysis hold no folded forms.
        WordMatch(any_of=["cafe", "~cafe", "café"], exact=["café"], prefix="cafe")
    ]
    assert word_matches(query, ["plain", "blind", "plain"], Keyed()) == [
        WordMatch(
            any_of=["k:cafe", "cafe", "~cafe", "café"], exact=["k:café", "café"], prefix="cafe"
        )
    ]


# --- highlights ------------------------------------------------------------------------------


def test_highlights_are_code_point_offsets_in_the_text_as_written(world: World) -> None:
    chat = world.chat()
    text = "🚀🚀 Ünïcödé ＱＵＯＫＫＡ and e\u0301clair — 東京 Quokka!"
    world.post(chat, text)
    [found] = world.service.search_all("alice", "quokka").found
    assert found.message.text == text
    spans = found.highlights
    assert [text[s:e] for s, e in spans] == ["ＱＵＯＫＫＡ", "Quokka"]
    assert spans[0][0] == 11  # two emoji count one code point each
    [accented] = world.service.search_all("alice", "éclair ünïcödé").found
    assert [text[s:e] for s, e in accented.highlights] == ["Ünïcödé", "e\u0301clair"]
    [cjk] = world.service.search_all("alice", "東").found
    assert [cjk.message.text[s:e] for s, e in cjk.highlights] == ["東"]


def test_highlights_of_a_prefix_cover_the_whole_word(world: World) -> None:
    chat = world.chat()
    world.post(chat, "quokkas, quokka and a quorum")
    [found] = world.service.search_all("alice", "quok").found
    assert [found.message.text[s:e] for s, e in found.highlights] == ["quokkas", "quokka"]


def test_search_all_reads_membership_once_per_page(world: World) -> None:
    chat = world.chat()
    for n in range(4):
        world.post(chat, f"ibis {n}")
    all_pages(world, "alice", "ibis", limit=2)
    assert world.chats.member_lookups == 2


def test_more_chats_than_one_search_covers_is_flagged(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("reader.search.MAX_SEARCH_CHATS", 2)
    old = world.chat()
    world.post(old, "egret old")
    world.clock += int(timedelta(days=1).total_seconds() * 1000)
    newer = [world.chat(), world.chat()]
    for chat in newer:
        world.post(chat, "egret new")
    page = world.service.search_all("alice", "egret")
    assert page.more_chats and page.chats_searched == 2
    assert {f.message.chat_id for f in page.found} == set(newer)


def test_hits_of_chats_outside_the_membership_are_dropped_even_if_the_index_returns_them(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs = world.chat(), world.chat(("carol",))
    world.post(theirs, "tapir secret")
    world.post(mine, "tapir mine")
    search = world.search.search_messages

    def ignoring_the_chat_filter(request: SearchRequest) -> SearchHits:
        return search(replace(request, chat_ids=[mine, theirs]))

    monkeypatch.setattr(world.search, "search_messages", ignoring_the_chat_filter)
    page = world.service.search_all("alice", "tapir")
    assert texts(page) == ["tapir mine"] and page.decrypted == 1


def test_a_tenant_whose_index_key_is_unusable_is_left_out_not_failing_the_search(
    world: World,
) -> None:
    """A user's chats can span tenants; one blind tenant's master key deleted (its index key
    no longer unwraps: KmsKeyUnusable) made every search of the user answer 500. Its chats are
    left out; the others are searched."""

    class OneTenantLost:
        def word_match(self, tenant_id: str, token: TextToken, prefix: bool) -> WordMatch:
            if tenant_id == "gone":
                raise KmsKeyUnusable("KMS rejected decrypt: encryption key not found")
            return PlainQueryTerms().word_match(tenant_id, token, prefix)

    world.service = ReaderService(
        world.chats,
        world.messages,
        world.keys,
        world.search,
        clock_ms=lambda: world.clock + 60_000,
        analyzer=StandInAnalyzer(),
        query_terms=OneTenantLost(),
    )
    kept, lost = world.chat(), world.chat()
    world.chats.rows[lost] = replace(world.chats.rows[lost], tenant_id="gone")
    world.post(kept, "wombat kept")
    world.post(lost, "wombat lost")
    assert texts(world.service.search_all("alice", "wombat")) == ["wombat kept"]
    only_lost = world.service.search_all("alice", "wombat", SearchOptions(chat_ids=[lost]))
    assert texts(only_lost) == []
