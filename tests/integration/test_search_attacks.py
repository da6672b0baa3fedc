"""Attacks on search (issue 12) that once worked, on the real Postgres, OpenSearch, Cassandra and
OpenBao: each test here failed on the code before its fix (branch `break12`)."""

from __future__ import annotations

import string
import time
import uuid
from datetime import UTC, datetime
from typing import Literal

from fastapi.testclient import TestClient

from encryptor.logic import encrypt_and_store
from reader.wiring import build as build_reader
from schemas.events import MessageRecord
from sealstream.adapters.opensearch import (
    MESSAGE_VERSION,
    IndexedMessage,
    RefusedDocument,
    SearchIndex,
    SearchRequest,
    WordMatch,
)
from sealstream.adapters.postgres import ChatKeyRepository
from sealstream.keys.index_keys import keyed_terms
from sealstream.keys.service import KeyService
from sealstream.lifecycle import delete_chat
from sealstream.search_reindex import reindex_tenant
from sealstream.streaming import RawRecord
from tests.integration import test_blind_index
from tests.integration.test_blind_index import Blind, user

# The blind-index module's fixtures: its tenants, stores and index keys.
blind_settings = test_blind_index.blind_settings
blind = test_blind_index.blind

# One word per letter and digit: whatever the first character of a keyed token, some word of
# this text starts with it (a keyed token is base64url, its letters folded to lowercase here).
EVERY_INITIAL = " ".join(f"{c}quux" for c in string.ascii_lowercase + string.digits)


def _keyed_initials(blind: Blind, tenant: str, text: str) -> set[str]:
    """First characters of the keyed tokens the indexer stored for `text`."""
    tokens, version = blind.index_keys.document_tokens(tenant, blind.index.analyze_terms([text])[0])
    assert version is not None
    return {token[0] for token in tokens}


def test_a_prefix_never_matches_keyed_tokens(blind: Blind, run_id: str) -> None:
    """A prefix (search-as-you-type, plain tenants only) run against a blind tenant's keyed
    tokens matched those whose base64url text happened to start with it: a blind message was
    then found by a one-letter query that it does not answer by any other prefix, and every
    such hit cost a decryption. The prefix must only meet plain words."""
    tenant = f"blindpfx-{run_id}-{uuid.uuid4().hex[:6]}"
    blind.keys.register_tenant(tenant, f"test-{run_id}-blind")
    blind.index_keys.enable(tenant, "prefix test")
    blind_chat = blind.chat(tenant)
    plain_chat = blind.chat(blind.plain_tenant)
    blind.post(blind_chat, [EVERY_INITIAL])
    blind.post(plain_chat, ["nothing here to find"])
    initials = _keyed_initials(blind, tenant, EVERY_INITIAL)
    # The reader: bob is in a plain chat (which offers prefixes) and the blind chat.
    app, close = build_reader(blind.settings)
    try:
        with TestClient(app) as reader:
            for c in sorted(initials & set(string.ascii_lowercase + string.digits)):
                response = reader.get(
                    "/v1/search", params={"q": c, "limit": 50}, headers=user(blind.settings, "bob")
                )
                assert response.status_code == 200, response.text
                texts = [m["text"] for m in response.json()["messages"]]
                assert EVERY_INITIAL not in texts, f"a blind message found by the prefix {c!r}"
            whole = reader.get(
                "/v1/search", params={"q": "aquux "}, headers=user(blind.settings, "bob")
            )
            assert [m["text"] for m in whole.json()["messages"]] == [EVERY_INITIAL]
    finally:
        close()
    # The adapter: a prefix alone never finds a keyed document.
    for c in sorted(initials):
        page = blind.index.search_messages(
            SearchRequest(chat_ids=[blind_chat], words=[WordMatch([], [], prefix=c)], size=5)
        )
        assert page.hits == [], f"prefix {c!r} matched a keyed token"


def test_search_goes_on_when_a_cached_key_list_names_a_destroyed_key(
    blind: Blind, run_id: str
) -> None:
    """A reader caches a tenant's live index-key versions (`keys.pointer_ttl_seconds`) apart
    from the keys themselves (`keys.ttl_seconds`). When a rotation's re-index finished and
    destroyed the old key while the cached list still named it and the old key had left the
    key cache, the reader unwrapped a destroyed key: every search touching the tenant answered
    `410 this chat was deleted` until the list expired."""
    tenant = f"blindrot-{run_id}-{uuid.uuid4().hex[:6]}"
    blind.keys.register_tenant(tenant, f"test-{run_id}-blind")
    blind.index_keys.enable(tenant, "rotation test")
    chat = blind.chat(tenant)
    blind.post(chat, ["the numbat digs at dusk"])
    assert reindex_tenant(
        blind.index_keys, blind.keys, blind.store, blind.index, tenant, purge_seconds=0
    ).completed
    assert blind.index_keys.rotate(tenant, "rotation test") == 2
    # A reader that keeps key lists for long and keys for a short while.
    keys_settings = blind.settings.keys.model_copy(
        update={"pointer_ttl_seconds": 600.0, "ttl_seconds": 1.0}
    )
    app, close = build_reader(blind.settings.model_copy(update={"keys": keys_settings}))
    try:
        with TestClient(app) as reader:

            def numbat() -> tuple[int, list[str]]:
                response = reader.get(
                    f"/v1/chats/{chat}/search",
                    params={"q": "numbat"},
                    headers=user(blind.settings, "bob"),
                )
                texts = [m["text"] for m in response.json().get("messages", [])]
                return response.status_code, texts

            assert numbat() == (200, ["the numbat digs at dusk"])  # both versions live, cached
            report = reindex_tenant(
                blind.index_keys, blind.keys, blind.store, blind.index, tenant, purge_seconds=0
            )
            assert report.completed and report.index_key_versions_destroyed == [1]
            time.sleep(1.5)  # the reader's copy of key 1 expires; its list still names it
            assert numbat() == (200, ["the numbat digs at dusk"])
    finally:
        close()


def test_a_row_that_never_opens_does_not_hold_a_reindex_open_with_plain_words(
    blind: Blind, run_id: str
) -> None:
    """Turning the blind index on re-keys every document from its row. A row that fails to
    open (integrity check failed, key shredded) was skipped by the chat pass and again by every
    sweep round: the job never completed, the tenant stayed `enabling` (rotation refused with
    409) and the document kept its plain words in the index, which the blind index exists to
    remove. Such a document must go, like one whose row is missing."""
    tenant = f"blindbad-{run_id}-{uuid.uuid4().hex[:6]}"
    blind.keys.register_tenant(tenant, f"test-{run_id}-blind")
    chat = blind.chat(tenant)
    good, bad = blind.post(chat, ["the quokka sleeps", "the dugong swims"])
    row = blind.store.get(chat, bad)
    assert row is not None
    tampered = bytearray(row.envelope)
    tampered[-1] ^= 1  # the GCM tag no longer matches
    # A direct write: the encryptor's own (at the post's write timestamp) would lose the tie.
    blind.store.overwrite_envelope(chat, bad, bytes(tampered))
    stored = blind.store.get(chat, bad)
    assert stored is not None and stored.envelope == bytes(tampered)
    blind.index_keys.enable(tenant, "unreadable row test")
    report = reindex_tenant(
        blind.index_keys,
        blind.keys,
        blind.store,
        blind.index,
        tenant,
        sweep_rounds=3,
        purge_seconds=0,
    )
    assert report.completed, report
    assert blind.index_keys.repo.mode(tenant) == "on"
    blind.index.refresh()
    plain = blind.index.search_messages(
        SearchRequest(chat_ids=[chat], words=[WordMatch(["dugong"], [])])
    )
    assert plain.hits == [], "the unreadable message's plain words are still indexed"
    keyed = blind.index_keys.query_word(tenant, "quokka", "quokka")
    assert keyed is not None
    found = blind.index.search_messages(
        SearchRequest(chat_ids=[chat], words=[WordMatch(keyed.any_of, keyed.exact)])
    )
    assert [h.message_id for h in found.hits] == [good]


class _DeletesTheChatBeforeAWrite(SearchIndex):
    """The real index; once armed, deletes `chat` (the admin's `DELETE /v1/chats/{id}`, through
    `lifecycle.delete_chat`) right before the next write of one of its documents: the moment
    a concurrent deletion can fall between the re-index's read of a row and its write."""

    def __init__(self, blind: Blind, chat: uuid.UUID) -> None:
        super().__init__(blind.settings.opensearch)
        self.blind = blind
        self.chat = chat
        self.armed = False
        self.fired = False

    def index_many(
        self,
        messages: list[IndexedMessage],
        version: int = MESSAGE_VERSION,
        version_type: Literal["external", "external_gte"] = "external",
    ) -> list[RefusedDocument]:
        if self.armed and any(m.chat_id == self.chat for m in messages):
            self.armed = False
            b = self.blind
            delete_chat(b.keys, b.index, b.store, self.chat, "deleted during the re-index")
            self.fired = True
        return super().index_many(messages, version, version_type)


def test_a_chat_deleted_during_the_sweep_leaves_no_document(blind: Blind, run_id: str) -> None:
    """The re-index's chat pass takes back what it wrote for a chat deleted meanwhile, but its
    sweep did not: a stale document re-keyed from a row read before the chat's deletion was
    written after the deletion had cleared the index, and stayed there (a deleted chat's
    words, keyed). Deleted must stay deleted for every writer."""
    tenant = f"blinddel-{run_id}-{uuid.uuid4().hex[:6]}"
    blind.keys.register_tenant(tenant, f"test-{run_id}-blind")
    chat = blind.chat(tenant)
    blind.post(chat, ["the echidna waddles"])
    blind.index_keys.enable(tenant, "deletion race test")
    assert reindex_tenant(
        blind.index_keys, blind.keys, blind.store, blind.index, tenant, purge_seconds=0
    ).completed
    # A rotation: the re-index writes at external version 3, above what a deletion leaves.
    assert blind.index_keys.rotate(tenant, "deletion race test") == 2
    chats = ChatKeyRepository(blind.database)
    racing = _DeletesTheChatBeforeAWrite(blind, chat)
    # The job's own key service, as in the admin or CLI process (not the deleting one).
    job_keys = KeyService(
        chats,
        blind.kms,
        None,
        blind.settings.keys,
        blind.settings.vault.default_key,
        actor="reindex-test",
    )

    def progress(**counters: object) -> None:
        if counters.get("phase") == "settling" and not racing.armed and not racing.fired:
            # A document an indexer still on the old key wrote meanwhile: stale, so the sweep
            # re-keys it from its row, and the chat goes just before that write.
            record = MessageRecord(
                message_id=blind.ids.next_id(),
                chat_id=chat,
                tenant_id=tenant,
                sender_id="alice",
                text="the echidna sleeps",
                sent_at=datetime.now(UTC),
            )
            raw = [RawRecord("t", 0, 0, record.key(), record.value())]
            assert encrypt_and_store(raw, blind.keys, blind.store, chats) == []
            old = blind.index_keys.key(tenant, 1)
            terms = blind.index.analyze_terms([record.text])[0]
            stale = IndexedMessage(
                record.message_id,
                chat,
                tenant,
                "alice",
                record.sent_at,
                keyed_terms(old, terms),
                index_key_version=1,
            )
            assert blind.index.index_many([stale]) == []
            racing.armed = True

    try:
        report = reindex_tenant(
            blind.index_keys,
            job_keys,
            blind.store,
            racing,
            tenant,
            sweep_rounds=3,
            purge_seconds=0,
            progress=progress,
        )
    finally:
        job_keys.close()
        racing.close()
    assert racing.fired, "the sweep wrote nothing for the chat: the race was not run"
    assert report.completed, report
    blind.index.refresh()
    left = [s for s in blind.index.all_sources() if s.get("chat_id") == str(chat)]
    assert left == [], f"{len(left)} document(s) of the deleted chat are back in the index"
