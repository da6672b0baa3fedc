# ruff: noqa: RUF001 - text in other scripts (and fullwidth Latin) is what these tests are about
"""Search recall in many languages and scripts, on the real OpenSearch (its ICU analysis).

Messages go in the way the indexer takes them (raw Kafka record values through
`indexer.logic.index_batch`: one `_analyze` pass, then the index terms) and come back through
`SearchIndex.search_chat`, one fresh chat per case. Each case names the queries a user expects to
find the message with, and the queries that must not find it (another word, a fragment of a word
where ICU segments words). docs/search.md, "Languages", lists what each script gets.
"""

from __future__ import annotations

import json
import unicodedata
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from indexer.logic import index_batch
from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import (
    ANALYZE_CHARS,
    IndexedMessage,
    SearchIndex,
    SearchRejected,
    document_terms,
)
from sealstream.errors import StoreUnavailable
from sealstream.settings import Settings
from sealstream.streaming import RawRecord

REPO = Path(__file__).resolve().parents[2]

IDS = SnowflakeIds(7)


def index_texts(index: SearchIndex, texts: list[str]) -> tuple[uuid.UUID, list[int]]:
    """Index `texts` (oldest first) into a fresh chat through the indexer's logic."""
    chat = uuid.uuid4()
    ids = [IDS.next_id() for _ in texts]
    records = [
        RawRecord(
            "t",
            0,
            n,
            str(chat).encode(),
            json.dumps(
                {
                    "message_id": message_id,
                    "chat_id": str(chat),
                    "sender_id": "alice",
                    "text": text,
                    "sent_at": "2026-12-01T10:00:00+00:00",
                }
            ).encode(),
        )
        for n, (message_id, text) in enumerate(zip(ids, texts, strict=True))
    ]
    assert index_batch(records, index) == []
    index.refresh()
    return chat, ids


# (case, message, queries that find it, queries that must not)
LANGUAGES = [
    (
        "english",
        "The quick brown fox jumps over the lazy dog",
        ["lazy dog", "QUICK Fox", "the DOG"],
        ["cat", "lazy cat"],
    ),
    (
        "french accents",
        "Le café est très bon à Paris",
        ["café", "cafe", "tres bon", "TRÈS", "paris"],
        ["thé", "cafes"],
    ),
    (
        "spanish accents",
        "¿Dónde está la estación de tren?",
        ["donde esta", "estación", "ESTACION", "tren"],
        ["avión"],
    ),
    (
        "german sharp s",
        "Die Straße ist sehr groß",
        ["Straße", "strasse", "STRASSE", "gross", "groß"],
        ["weg"],
    ),
    (
        "russian",
        "Москва — столица России, я купил ёлку",
        ["москва", "МОСКВА столица", "России", "елку", "ЁЛКУ"],
        ["Петербург"],
    ),
    (
        "greek final sigma",
        "Ο Σωκράτης ήταν σοφός",
        ["σοφός", "ΣΟΦΟΣ", "σοφος", "Σωκρατης"],
        ["Πλάτων"],
    ),
    (
        "arabic",
        "مرحبا بكم في القاهرة",
        ["القاهرة", "مرحبا", "مَرْحَبًا"],  # the last one written with its vowel marks
        ["بيروت"],
    ),
    (
        "hebrew",
        "שלום עולם, מה שלומך?",
        ["עולם", "שלום", "שָׁלוֹם"],  # the last one with niqqud
        ["ירושלים"],
    ),
    (
        "hindi",
        "मैं दिल्ली में रहता हूँ",
        ["दिल्ली", "रहता"],
        ["मुंबई"],
    ),
    (
        # "I like to eat fried rice very much": no spaces; "eat" is found inside the run, and
        # "vegetable" (ผัก), made of letters of the text, is not.
        "thai",
        "ผมชอบกินข้าวผัดมาก",
        ["กิน", "ข้าวผัด", "ชอบ"],
        ["ผัก", "ปลา"],
    ),
    (
        "lao",  # "I love the country of Laos"
        "ຂ້ອຍຮັກປະເທດລາວ",
        ["ປະເທດ", "ລາວ"],
        ["ໄທ"],
    ),
    (
        "khmer",  # "I love Cambodia"
        "ខ្ញុំស្រឡាញ់ប្រទេសកម្ពុជា",
        ["កម្ពុជា", "ប្រទេស"],
        ["ថៃ"],
    ),
    (
        "myanmar",  # "I live in Yangon"
        "ကျွန်တော် ရန်ကုန်မှာ နေတယ်",
        ["ရန်ကုန်"],
        ["မန္တလေး"],
    ),
    (
        # Whole words are found; "京烤" (the end of Beijing + the start of roast) is not.
        "chinese",
        "我喜欢吃北京烤鸭",
        ["北京", "烤鸭", "喜欢"],
        ["京烤", "鸭", "上海"],
    ),
    (
        # "I live in Tokyo-to": 東京 is found; 京都 (Kyoto), written inside 東京都, is not.
        "japanese",
        "東京都に住んでいます ｶﾀｶﾅ",
        ["東京", "住んで", "カタカナ"],  # half-width katakana written, full-width typed
        ["京都", "大阪"],
    ),
    (
        # Hangul words are space-separated; particles stay on the word (no morphology).
        "korean",
        "서울에서 친구를 만났어요",
        ["서울에서", "친구를", "서울"],  # "서울" as the last word typed: a prefix
        ["부산", "서울 "],  # "서울 " is complete (ends in a space): no word "서울" alone
    ),
    (
        "vietnamese",
        "Tôi yêu Việt Nam và Đà Nẵng",
        ["Việt Nam", "viet nam", "da nang", "ĐÀ NẴNG", "yêu"],
        ["Hà Nội"],
    ),
    (
        "mixed scripts and emoji",
        "Meeting at 東京 tomorrow 🎉 très bien! Привет",
        ["tomorrow 🎉", "東京 meeting", "tres bien", "привет", "🎉"],
        ["🎂", "東京 cancelled"],
    ),
]


@pytest.mark.parametrize(
    ("text", "hits", "misses"),
    [case[1:] for case in LANGUAGES],
    ids=[case[0] for case in LANGUAGES],
)
def test_words_are_found_in_every_script(
    search_index: SearchIndex, text: str, hits: list[str], misses: list[str]
) -> None:
    chat, ids = index_texts(search_index, [text, "an unrelated message about nothing"])
    for query in hits:
        assert search_index.search_chat(chat, query) == [ids[0]], f"{query!r} should find it"
    for query in misses:
        assert search_index.search_chat(chat, query) == [], f"{query!r} should not find it"


def test_unicode_forms_meet_nfc_nfd_and_fullwidth(search_index: SearchIndex) -> None:
    nfc = unicodedata.normalize("NFC", "Rendez-vous au café de la gare")
    nfd = unicodedata.normalize("NFD", "Un thé glacé à emporter")
    assert nfc != unicodedata.normalize("NFD", nfc) and nfd != unicodedata.normalize("NFC", nfd)
    chat, ids = index_texts(search_index, [nfc, nfd, "Ｐａｒｉｓ ＴＯＫＹＯ", "London"])
    assert search_index.search_chat(chat, unicodedata.normalize("NFD", "café")) == [ids[0]]
    assert search_index.search_chat(chat, unicodedata.normalize("NFC", "glacé")) == [ids[1]]
    assert search_index.search_chat(chat, "paris tokyo") == [ids[2]]
    assert search_index.search_chat(chat, "ｌｏｎｄｏｎ") == [ids[3]]
    assert search_index.search_chat(chat, "ｂｅｒｌｉｎ") == []


def test_accents_match_both_ways_and_exact_ranks_first(search_index: SearchIndex) -> None:
    # The accented message is the older one: only the exact match can put it first.
    chat, ids = index_texts(
        search_index, ["Le café est ouvert", "Le cafe est ouvert", "Le bar est ouvert"]
    )
    accented, plain, _ = ids
    assert search_index.search_chat(chat, "café ouvert") == [accented, plain]
    assert search_index.search_chat(chat, unicodedata.normalize("NFD", "CAFÉ")) == [
        accented,
        plain,
    ]
    # Without accents both match, and the one written without accents ranks first even when it
    # is the older one: "café" is indexed with its folded form marked ("~cafe"), not as "cafe".
    assert search_index.search_chat(chat, "cafe") == [plain, accented]
    chat, (older_plain, newer_accented) = index_texts(
        search_index, ["Le cafe est ouvert", "Le café est ouvert"]
    )
    assert search_index.search_chat(chat, "cafe") == [older_plain, newer_accented]
    assert search_index.search_chat(chat, "café") == [newer_accented, older_plain]
    assert search_index.search_chat(chat, "caf") == [newer_accented, older_plain]  # prefix: newest


def test_prefix_of_the_last_word_only(search_index: SearchIndex) -> None:
    chat, ids = index_texts(
        search_index, ["a happy quokka smiles", "the quokkas sleep", "quiet day"]
    )
    happy, sleepy, _ = ids
    assert search_index.search_chat(chat, "quok") == [sleepy, happy]
    assert search_index.search_chat(chat, "happy quok") == [happy]
    assert search_index.search_chat(chat, "Quokk") == [sleepy, happy]
    # A complete last word (query ends in a space or a quote) is matched whole, not as a prefix.
    assert search_index.search_chat(chat, "quok ") == []
    assert search_index.search_chat(chat, '"quok"') == []
    # Only the last word is a prefix.
    assert search_index.search_chat(chat, "quok happy") == []
    # A word typed in full ranks above words it only begins, though older.
    assert search_index.search_chat(chat, "quokka") == [happy, sleepy]


def test_migrate_gives_an_existing_index_its_analyzers(smoke_settings: Settings) -> None:
    """An index made before ICU analysis (no analyzers, no `index_key_version`) gets them in
    place: analysis settings are static, so `migrate` closes and reopens the index. While it is
    closed the indexer's calls are retriable (StoreUnavailable), never dead letters."""
    cfg = smoke_settings.opensearch.model_copy(
        update={"index_prefix": f"{smoke_settings.opensearch.index_prefix}-pre-icu"}
    )
    index = SearchIndex(cfg)
    body = json.loads((REPO / "schemas/opensearch/messages.json").read_text())
    del body["settings"]["analysis"], body["settings"]["analyze.max_token_count"]
    del body["mappings"]["properties"]["index_key_version"]
    index.drop()
    index._client.indices.create(index=index.index, body=body)
    try:
        chat = uuid.uuid4()
        sent = datetime.now(UTC)
        # Terms of the old in-process analyzer: NFKC + casefold words, no folded forms.
        old = IndexedMessage(1, chat, "default", "alice", sent, ["café", "hello"])
        assert index.index_many([old]) == []
        with pytest.raises(SearchRejected):
            index.analyze(["no analyzer yet"])
        index._client.indices.close(index=index.index)
        with pytest.raises(StoreUnavailable):
            index.index_many([IndexedMessage(2, chat, "default", "alice", sent, ["closed"])])
        with pytest.raises(StoreUnavailable):
            index.analyze(["closed for a moment"])
        index._client.indices.open(index=index.index, wait_for_active_shards="all")

        index.migrate()
        index.migrate()  # idempotent: nothing left to change
        assert [(t.term, t.folded) for t in index.analyze(["Grüße"])[0]] == [("grüsse", "grusse")]
        mapping = index._client.indices.get_mapping(index=index.index)[index.index]["mappings"]
        assert mapping["properties"]["index_key_version"] == {"type": "integer"}
        settings = index._client.indices.get_settings(index=index.index, flat_settings=True)
        assert settings[index.index]["settings"]["index.analyze.max_token_count"] == "100000"
        index.refresh()
        # Documents indexed before stay found by their words as written, accents included.
        assert index.search_chat(chat, "hello") == [1]
        assert index.search_chat(chat, "Café ") == [1]
    finally:
        index.drop()
        index.close()


def test_edge_words_long_empty_folded_and_emoji_sequences(search_index: SearchIndex) -> None:
    long_word = "ﷺ" * 5000  # one word; NFKC makes it 90,000 characters
    texts = [long_word, "ـ", "family 👨‍👩‍👧 thumbs 👍🏽", "x" * 300 + " tail"]
    tokens = search_index.analyze(texts)
    assert all(len(t.term) <= 255 and t.folded for text in tokens for t in text)
    chat, ids = index_texts(search_index, texts)  # none refused (terms stay under Lucene's limit)
    assert search_index.search_chat(chat, "ـ") == [ids[1]]
    assert search_index.search_chat(chat, "👨‍👩‍👧") == [ids[2]]
    assert search_index.search_chat(chat, "👍🏽 family") == [ids[2]]
    assert search_index.search_chat(chat, "x" * 300) == [ids[3]]  # cut the same way as indexed


def test_the_indexers_terms_are_document_terms_of_analyze(search_index: SearchIndex) -> None:
    """`analyze_terms` (the indexer's one-pass path) gives what `analyze` + `document_terms`
    give, for every sentence of this file in one batch."""
    texts = [case[1] for case in LANGUAGES] + ["", "ـ", "x" * 300, "a😀b 👨‍👩‍👧"]
    expected = [document_terms(tokens) for tokens in search_index.analyze(texts)]
    assert search_index.analyze_terms(texts) == expected
    assert all(expected[: len(LANGUAGES)])


def test_the_icu_components_take_the_official_plugins_parameters(search_index: SearchIndex) -> None:
    """`icu_normalizer` (char and token filter: `name`, `mode`), `icu_folding`
    (`unicode_set_filter`) and `icu_tokenizer` as the official analysis-icu plugin names them, so
    an index mapping written for it works here (and the other way round)."""

    def words(body: dict[str, object]) -> list[str]:
        answer = search_index._client.indices.analyze(body=body)
        return [t["token"] for t in answer["tokens"]]

    decompose = {"type": "icu_normalizer", "name": "nfc", "mode": "decompose"}
    assert words({"tokenizer": "keyword", "char_filter": [decompose], "text": "é"}) == ["e\u0301"]
    assert words({"tokenizer": "keyword", "char_filter": ["icu_normalizer"], "text": "ＡＢ"}) == [
        "ab"
    ]
    nfc = {"type": "icu_normalizer", "name": "nfc"}
    assert words({"tokenizer": "icu_tokenizer", "filter": [nfc], "text": "ＡＢ Straße"}) == [
        "ＡＢ",
        "Straße",
    ]
    keep = {"type": "icu_folding", "unicode_set_filter": "[^åäöÅÄÖ]"}
    assert words({"tokenizer": "icu_tokenizer", "filter": [keep], "text": "Å för café"}) == [
        "Å",
        "för",
        "cafe",
    ]
    assert words({"tokenizer": "icu_tokenizer", "filter": ["icu_folding"], "text": "Å"}) == ["a"]


def test_large_batches_are_cut_into_requests_and_split_back(
    search_index: SearchIndex, wire: list[tuple[str, bytes]]
) -> None:
    """A batch over ANALYZE_CHARS characters goes in several `_analyze` requests, a full one over
    the default limit of 10,000 tokens (the index allows 100,000), and every text gets its own
    words back."""
    texts = [f"é{n} " * 700 + f"end{n}" for n in range(40)]  # 40 x ~2,800 chars, ~700 words each
    assert sum(map(len, texts)) > ANALYZE_CHARS
    terms = search_index.analyze_terms(texts)
    requests = [json.loads(body)["text"] for path, body in wire if path.endswith("/_analyze")]
    assert len(requests) >= 2 and [t for request in requests for t in request] == texts
    assert all(sum(map(len, request)) <= ANALYZE_CHARS for request in requests)
    # Each word gives two tokens (é0 and e0): the first request is well over the default limit.
    assert sum(t.count(" ") for t in requests[0]) * 2 > 10_000
    for n, found in enumerate(terms):
        assert found == sorted({f"é{n}", f"~e{n}", f"end{n}"}), n
