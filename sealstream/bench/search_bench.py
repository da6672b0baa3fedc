"""Search benchmark: query latency on an index of a million messages, with and without the blind
index, and what indexing costs per message with each analysis.

    sealstream bench search                               # 1,000,000 messages (~10 min)
    python -m sealstream.bench.search_bench 100000        # a smaller index

The corpus: `chats` chats (2,000) of which one user belongs to half (1,000), messages spread over
them evenly, each 4-20 words drawn from a 20,000-word vocabulary with Zipf frequencies (rank^-1,
as word frequencies in text are): Latin words with and without accents, Cyrillic, Greek and CJK
words. Documents are built the way the indexer builds them: each distinct vocabulary word is
analysed once by the index's own ICU analysis (`SearchIndex.analyze`), a message's terms are the
union of its words' terms (`document_terms` of its tokens: words are separated by spaces, so
analysing the message whole gives the same set), and a blind-index copy keys every term with a
tenant index key (`keyed_term`). Both copies go into indexes of their own through the adapter's
`index_many`, so the documents, mapping and settings are the product's.

Queries go through the reader's query path without decryption (`SearchIndex.search_messages`,
newest first, 20 hits, the `WordMatch` list the reader's `PlainQueryTerms` / `TenantQueryTerms`
build): one or two words drawn with the same Zipf weights (so common words that match many
documents come up as often as in use), within one chat of the user, and across all 1,000 of the
user's chats; as whole words on both indexes, and on the plain one also as typed so far (the
last word two letters short, matched as a prefix). Each kind is timed over `queries` searches
after 20 untimed ones; p50/p99 in milliseconds, and the mean number of hits.

Indexing cost per message, per analysis: `sample` real multilingual messages analysed and
indexed as the indexer does it (analyse → terms → [keyed] → `index_many`), with this process's
CPU and OpenSearch's CPU (its process group, from /proc) per message.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from reader.ports import QueryTerms
from reader.query import PlainQueryTerms, TenantQueryTerms
from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import (
    IndexedMessage,
    SearchHits,
    SearchIndex,
    SearchRequest,
    WordMatch,
)
from sealstream.bench.pipeline_bench import _process_groups
from sealstream.crypto import IndexKey, keyed_term
from sealstream.keys.index_keys import KeyedWord
from sealstream.settings import Settings
from sealstream.stack.runner import group_cpu_seconds
from sealstream.tokens import TextToken, document_terms, marked

VOCABULARY = 20_000
TENANT = "bench-tenant"
_LOAD_CHUNK = 2_000  # documents per bulk request while loading
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
_ACCENTED = "áàâäãéèêëíìîïóòôöõúùûüñçÿ"
_CYRILLIC = "абвгдежзиклмнопрстуфхцчшщэюя"
_GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
_CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 600)]

# Real sentences (the indexing-cost sample cycles through them, numbered so no two are equal).
SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the riverbank",
    "Le café du coin sert un croissant délicieux chaque matin à sept heures",
    "El niño pequeño corrió hacia la estación para no perder el último tren",
    "Die Straße vor dem Bahnhof wird nächste Woche für den Verkehr gesperrt",
    "Мы встретимся завтра у главного входа в библиотеку после обеда",
    "Η συνάντηση μετατέθηκε για την επόμενη εβδομάδα λόγω της απεργίας",
    "سوف نلتقي غدا في المكتبة بعد الظهر لمناقشة المشروع الجديد",
    "אנחנו נפגשים מחר בספרייה אחרי הצהריים כדי לדבר על הפרויקט",
    "हम कल दोपहर के बाद पुस्तकालय में नई परियोजना पर चर्चा करेंगे",
    "พรุ่งนี้เราจะพบกันที่ห้องสมุดหลังอาหารกลางวันเพื่อคุยเรื่องโครงการใหม่",
    "我们明天下午在图书馆见面讨论新的项目计划",
    "明日の午後に図書館で新しいプロジェクトについて話し合いましょう",
    "내일 오후에 도서관에서 새 프로젝트에 대해 이야기합시다",
    "Chúng ta sẽ gặp nhau ở thư viện vào chiều mai để bàn dự án mới",
    "Meeting moved to 3pm 🚀 see you at the café ☕ near Zürich HB",
)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def vocabulary(rng: random.Random, size: int = VOCABULARY) -> list[str]:
    """`size` distinct words: 70 % Latin (a fifth with an accent), 10 % each Cyrillic and Greek,
    10 % CJK (two or three ideographs)."""
    words: set[str] = set()
    while len(words) < size:
        kind = rng.random()
        if kind < 0.7:
            word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
            if rng.random() < 0.2:
                at = rng.randrange(len(word))
                word = word[:at] + rng.choice(_ACCENTED) + word[at + 1 :]
        elif kind < 0.8:
            word = "".join(rng.choice(_CYRILLIC) for _ in range(rng.randint(4, 9)))
        elif kind < 0.9:
            word = "".join(rng.choice(_GREEK) for _ in range(rng.randint(4, 9)))
        else:
            word = "".join(rng.choice(_CJK) for _ in range(rng.randint(2, 3)))
        words.add(word)
    return sorted(words)


class Zipf:
    """Draws indexes 0..n-1 with weight 1/(rank+1) (rank = index)."""

    def __init__(self, n: int, rng: random.Random) -> None:
        total = 0.0
        self.cumulative: list[float] = []
        for rank in range(n):
            total += 1.0 / (rank + 1)
            self.cumulative.append(total)
        self.population = range(n)
        self.rng = rng

    def draw(self, k: int) -> list[int]:
        return self.rng.choices(self.population, cum_weights=self.cumulative, k=k)


def _word_tokens(index: SearchIndex, words: list[str]) -> list[list[TextToken]]:
    """Each vocabulary word as the index analyses it (2,000 words per request); a CJK "word"
    can come back as several dictionary words."""
    out: list[list[TextToken]] = []
    for start in range(0, len(words), 2_000):
        out.extend(index.analyze(words[start : start + 2_000]))
    return out


def _documents(
    count: int,
    chats: list[uuid.UUID],
    word_terms: list[list[str]],
    zipf: Zipf,
    rng: random.Random,
    keyed: Callable[[str], str] | None,
    key_version: int | None,
) -> Iterable[list[IndexedMessage]]:
    """The corpus in chunks of `_LOAD_CHUNK` documents (ids in time order, one per message)."""
    ids = SnowflakeIds(5)
    start = datetime.now(UTC) - timedelta(days=30)
    chunk: list[IndexedMessage] = []
    for i in range(count):
        terms: set[str] = set()
        for w in zipf.draw(rng.randint(4, 20)):
            terms.update(word_terms[w])
        tokens = sorted({keyed(t) for t in terms}) if keyed else sorted(terms)
        chunk.append(
            IndexedMessage(
                message_id=ids.next_id(),
                chat_id=chats[i % len(chats)],
                tenant_id=TENANT,
                sender_id=f"user{i % 50}",
                sent_at=start + timedelta(seconds=i),
                tokens=tokens,
                index_key_version=key_version,
            )
        )
        if len(chunk) == _LOAD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load(index: SearchIndex, chunks: Iterable[list[IndexedMessage]]) -> tuple[int, float]:
    loaded, started = 0, time.perf_counter()
    for chunk in chunks:
        refused = index.index_many(chunk)
        if refused:
            raise RuntimeError(f"{len(refused)} documents refused: {refused[0].reason}")
        loaded += len(chunk)
    index.refresh()
    return loaded, time.perf_counter() - started


def _timed(search: Callable[[], SearchHits], count: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, mean hits) over `count` calls, after 20 untimed ones."""
    for _ in range(20):
        search()
    samples: list[float] = []
    hits = 0
    for _ in range(count):
        started = time.perf_counter()
        found = search()
        samples.append((time.perf_counter() - started) * 1000)
        hits += len(found.hits)
    return _percentile(samples, 0.5), _percentile(samples, 0.99), hits / count


def _query_figures(
    index: SearchIndex,
    name: str,
    user_chats: list[uuid.UUID],
    vocab_tokens: list[list[TextToken]],
    zipf: Zipf,
    rng: random.Random,
    terms: QueryTerms,
    queries: int,
    typing: bool,
) -> dict[str, float]:
    """p50/p99/mean hits of `queries` searches within one chat and across all of the user's
    chats: whole words (`words`), and with `typing` also the last word cut short as a prefix
    (`typing`: search-as-you-type, the reader's rule when the query does not end in a space;
    plain index only: keyed terms have no prefixes)."""

    def whole_words() -> list[WordMatch]:
        drawn = [t for w in zipf.draw(rng.randint(1, 2)) for t in vocab_tokens[w]]
        return [terms.word_match(TENANT, token, False) for token in drawn]

    def typed_so_far() -> list[WordMatch]:
        drawn = [t for w in zipf.draw(rng.randint(1, 2)) for t in vocab_tokens[w]]
        matches = []
        for n, token in enumerate(drawn):
            cut_short = n == len(drawn) - 1 and len(token.folded) > 3
            if cut_short:
                part = token.folded[: len(token.folded) - 2]
                token = replace(token, term=part, folded=part)
            matches.append(terms.word_match(TENANT, token, cut_short))
        return matches

    kinds: list[tuple[str, Callable[[], list[WordMatch]]]] = [("words", whole_words)]
    if typing:
        kinds.append(("typing", typed_so_far))
    figures: dict[str, float] = {}
    for kind, words in kinds:
        for scope, chats in (
            ("one_chat", lambda: [rng.choice(user_chats)]),
            ("all_chats", lambda: user_chats),
        ):
            p50, p99, hits = _timed(
                lambda chats=chats, words=words: index.search_messages(  # type: ignore[misc]
                    SearchRequest(chat_ids=chats(), words=words(), size=20)
                ),
                queries,
            )
            figures |= {
                f"{name}_{kind}_{scope}_p50_ms": p50,
                f"{name}_{kind}_{scope}_p99_ms": p99,
                f"{name}_{kind}_{scope}_mean_hits": hits,
            }
    return figures


def _indexing_cost(
    index: SearchIndex, sample: int, keyed: Callable[[str], str] | None, key_version: int | None
) -> tuple[float, float]:
    """(this process's CPU ms, OpenSearch's CPU ms) per message to analyse and index `sample`
    real multilingual messages as the indexer does, 500 per batch."""
    opensearch = _process_groups({}).get("opensearch")
    ids = SnowflakeIds(6)
    chat = uuid.uuid4()
    texts = [f"{SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)]} {i}" for i in range(sample)]
    cpu0 = time.process_time()
    os0 = group_cpu_seconds(opensearch) if opensearch else 0.0
    for start in range(0, sample, 500):
        batch = texts[start : start + 500]
        documents = []
        for terms in index.analyze_terms(batch):
            documents.append(
                IndexedMessage(
                    message_id=ids.next_id(),
                    chat_id=chat,
                    tenant_id=TENANT,
                    sender_id="sampler",
                    sent_at=datetime.now(UTC),
                    tokens=sorted({keyed(t) for t in terms}) if keyed else terms,
                    index_key_version=key_version,
                )
            )
        index.index_many(documents)
    cpu = time.process_time() - cpu0
    os_cpu = (group_cpu_seconds(opensearch) - os0) if opensearch else math.nan
    return 1000 * cpu / sample, 1000 * os_cpu / sample


class _OneKey:
    """`IndexKeys.query_word` for a tenant with one live index key (the bench's)."""

    def __init__(self, key: IndexKey) -> None:
        self.key = key

    def query_word(self, tenant_id: str, term: str, folded: str) -> KeyedWord | None:
        plain = sorted({folded, marked(folded), term})
        return KeyedWord(
            any_of=[keyed_term(self.key, w) for w in plain], exact=[keyed_term(self.key, term)]
        )


def run(
    messages: int = 1_000_000,
    chats: int = 2_000,
    queries: int = 300,
    sample: int = 20_000,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    base = settings or Settings()
    run_id = secrets.token_hex(3)
    rng = random.Random(20261201)  # noqa: S311 - a reproducible corpus, not a secret
    key = IndexKey(tenant_id=TENANT, version=1, material=os.urandom(32))
    plain = SearchIndex(
        base.opensearch.model_copy(update={"index_prefix": f"bench-search-{run_id}-plain"})
    )
    blind = SearchIndex(
        base.opensearch.model_copy(update={"index_prefix": f"bench-search-{run_id}-blind"})
    )
    figures: dict[str, float] = {"messages": float(messages), "chats": float(chats)}
    try:
        for index in (plain, blind):
            index.migrate()
        words = vocabulary(rng)
        vocab_tokens = _word_tokens(plain, words)
        vocab_terms = [document_terms(tokens) for tokens in vocab_tokens]
        zipf = Zipf(len(words), rng)
        all_chats = [uuid.uuid4() for _ in range(chats)]
        user_chats = all_chats[: chats // 2]
        figures["user_chats"] = float(len(user_chats))

        # Every vocabulary term keyed once (as the indexer keys each term of a message).
        keyed_vocabulary = {t: keyed_term(key, t) for terms in vocab_terms for t in terms}

        def keyed(term: str) -> str:
            return keyed_vocabulary.get(term) or keyed_term(key, term)

        blind_terms = TenantQueryTerms(_OneKey(key))
        for name, index, key_fn, version, query_terms in (
            ("plain", plain, None, None, PlainQueryTerms()),
            ("blind", blind, keyed, key.version, blind_terms),
        ):
            log(f"loading {messages:,} messages into the {name} index")
            loaded, seconds = _load(
                index,
                _documents(messages, all_chats, vocab_terms, zipf, rng, key_fn, version),
            )
            figures[f"{name}_documents"] = float(loaded)
            figures[f"{name}_load_msgs_per_s"] = loaded / seconds
            log(f"querying the {name} index")
            figures |= _query_figures(
                index,
                name,
                user_chats,
                vocab_tokens,
                zipf,
                rng,
                query_terms,
                queries,
                typing=key_fn is None,
            )
            log(f"indexing cost, {name}")
            own, server = _indexing_cost(index, sample, key_fn, version)
            figures[f"{name}_index_cpu_ms_per_msg"] = own
            figures[f"{name}_opensearch_cpu_ms_per_msg"] = server
    finally:
        for index in (plain, blind):
            index.drop()
            index.close()
    return figures


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    for figure, value in run(messages=count, log=print).items():
        print(f"{figure:<40} {value:,.3f}")
