"""The blind index on the real stack: a tenant's search terms are stored as keyed tokens (HMAC
under an index key from the KMS), found by the reader, absent from the OpenSearch data folder,
re-keyed by a resumable re-index after a rotation; a plain tenant is unaffected; the index key
itself never reaches OpenSearch, Redis or a log line.

The pipeline's two workers run as their process functions (`encrypt_and_store`, `index_batch`)
on the real Cassandra, OpenSearch, Postgres and OpenBao; the reader and the admin API are the
real apps (in-process HTTP); the re-index is also run as a real `sealstream search reindex`
process and killed mid-way.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from opensearchpy import OpenSearch

from admin.wiring import build as build_admin
from encryptor.logic import encrypt_and_store
from indexer.logic import index_batch
from reader.wiring import build as build_reader
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.opensearch import SearchIndex, SearchRequest, WordMatch
from sealstream.adapters.postgres import ChatKeyRepository, Database, IndexKeyRepository
from sealstream.adapters.redis import RedisKeyCache
from sealstream.adapters.vault import TransitKms
from sealstream.auth import ADMIN_ROLE, mint_token
from sealstream.crypto import keyed_term
from sealstream.errors import KeyDestroyed, KmsUnavailable
from sealstream.keys.index_keys import IndexKeys
from sealstream.keys.service import KeyService
from sealstream.search_reindex import ReindexBusy, reindex_tenant
from sealstream.services import settings_env
from sealstream.settings import Settings
from sealstream.streaming import RawRecord, run_until_done
from tests.conftest import index_folder, phrases
from tests.tcp_proxy import TcpProxy

# Words only the blind tenant ever posts (the leak scan looks for each of them), in several
# scripts; none is shorter than 4 characters, so a chance match in binary data is negligible.
BLIND_TEXTS = [
    "Meet me by the Quincetree at dawn, bring the marmalade",
    "The zeppelin password is Kangaroo-Wombat",
    "Café Übersee öffnet morgen früh",
    "東京タワーで会いましょう",
    "Встретимся у фонтана завтра",  # noqa: RUF001 - Cyrillic on purpose
    "ประชุมพรุ่งนี้ 🦘 okapibanana",
]
BLIND_WORDS = [
    "quincetree",
    "marmalade",
    "zeppelin",
    "password",
    "kangaroo",
    "wombat",
    "übersee",
    "öffnet",
    "morgen",
    "встретимся",
    "фонтана",
    "завтра",
    "okapibanana",
]
PLAIN_TEXTS = ["The platypus sings at noon", "nobody expects the aardvark"]


@dataclass
class Blind:
    settings: Settings
    database: Database
    keys: KeyService
    index_keys: IndexKeys
    store: MessageStore
    index: SearchIndex
    kms: TransitKms
    blind_tenant: str
    plain_tenant: str
    ids: SnowflakeIds

    def chat(self, tenant: str) -> uuid.UUID:
        chat = uuid.uuid4()
        self.keys.create_chat(chat, ("alice", "bob"), tenant)
        return chat

    def post(self, chat: uuid.UUID, texts: list[str]) -> list[int]:
        """What the two workers do with these records; returns the message ids."""
        row = self.keys.repo.chat(chat)
        assert row is not None
        tenant = row.tenant_id  # as the gateway sets it (another claim is dead-lettered)
        records = []
        for offset, text in enumerate(texts):
            record = MessageRecord(
                message_id=self.ids.next_id(),
                chat_id=chat,
                tenant_id=tenant,
                sender_id="alice",
                text=text,
                sent_at=datetime.now(UTC),
            )
            records.append(RawRecord("t", 0, offset, record.key(), record.value()))
        chats = ChatKeyRepository(self.database)
        assert encrypt_and_store(records, self.keys, self.store, chats) == []
        assert index_batch(records, self.index, chats, self.index_keys) == []
        self.index.refresh()
        return [MessageRecord.model_validate_json(r.value).message_id for r in records]


@pytest.fixture(scope="module")
def blind_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "cassandra": settings.cassandra.model_copy(
                update={"keyspace": f"{settings.cassandra.keyspace}_blind"}
            ),
            "opensearch": settings.opensearch.model_copy(
                update={"index_prefix": f"{settings.opensearch.index_prefix}-blind"}
            ),
            # Index-key changes reach every process within 1 s, so the re-index's wait before its
            # final sweep (twice that) stays short.
            "keys": settings.keys.model_copy(update={"pointer_ttl_seconds": 1.0}),
        }
    )


@pytest.fixture(scope="module")
def blind(
    blind_settings: Settings, database: Database, kms: TransitKms, run_id: str
) -> Iterator[Blind]:
    store = MessageStore(blind_settings.cassandra)
    store.connect()
    store.migrate()
    index = SearchIndex(blind_settings.opensearch)
    index.migrate()
    keys = KeyService(
        ChatKeyRepository(database),
        kms,
        RedisKeyCache(blind_settings.redis),
        blind_settings.keys,
        blind_settings.vault.default_key,
        actor="blind-test",
    )
    keys.start()
    index_keys = IndexKeys(
        IndexKeyRepository(database), ChatKeyRepository(database), kms, ttl_seconds=1.0
    )
    blind_tenant, plain_tenant = f"blind-{run_id}", f"plain-{run_id}"
    keys.register_tenant(blind_tenant, f"test-{run_id}-blind")
    keys.register_tenant(plain_tenant, f"test-{run_id}-plain")
    yield Blind(
        blind_settings,
        database,
        keys,
        index_keys,
        store,
        index,
        kms,
        blind_tenant,
        plain_tenant,
        SnowflakeIds(77),
    )
    keys.close()
    store.drop_keyspace()
    store.close()
    index.drop()
    index.close()


def user(settings: Settings, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(settings.auth, name)}"}


def admin_headers(settings: Settings) -> dict[str, str]:
    token = mint_token(settings.auth, "ops", roles=(ADMIN_ROLE,))
    return {"Authorization": f"Bearer {token}"}


def found(reader: TestClient, settings: Settings, chat: uuid.UUID, q: str) -> list[str]:
    response = reader.get(
        f"/v1/chats/{chat}/search", params={"q": q, "limit": 50}, headers=user(settings, "bob")
    )
    assert response.status_code == 200, response.text
    return sorted(m["text"] for m in response.json()["messages"])


def key_encodings(material: bytes) -> list[bytes]:
    return [
        material,
        material.hex().encode(),
        base64.b64encode(material),
        base64.urlsafe_b64encode(material).rstrip(b"="),
    ]


@pytest.fixture(scope="module")
def enabled(blind: Blind) -> Iterator[dict[str, object]]:
    """The blind tenant, turned on through the admin API, with messages posted before (plain,
    then re-indexed) and after (keyed by the indexer); a plain tenant alongside."""
    early_chat = blind.chat(blind.blind_tenant)
    early = blind.post(early_chat, BLIND_TEXTS[:2])
    app, close = build_admin(blind.settings)
    with TestClient(app) as admin:
        url = f"/v1/tenants/{blind.blind_tenant}/blind-index"
        bad = admin.post(url, json={"reason": ""}, headers=admin_headers(blind.settings))
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "reason"
        unknown = admin.post(
            "/v1/tenants/nobody-here/blind-index", headers=admin_headers(blind.settings)
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "path.tenant_id"
        started = admin.post(
            url, json={"reason": "customer asked"}, headers=admin_headers(blind.settings)
        )
        assert started.status_code == 202, started.text
        again = admin.post(url, headers=admin_headers(blind.settings))
        assert again.status_code == 409, again.text
        job_url = f"/v1/jobs/{started.json()['job_id']}"
        deadline = time.monotonic() + 400
        while (job := admin.get(job_url, headers=admin_headers(blind.settings)).json())[
            "state"
        ] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        assert job["result"]["completed"] and job["result"]["messages"] == 2
        # The plain documents' old versions are purged from the data folder (leak scan below).
        assert job["result"]["history_purged"]
        state = admin.get(url, headers=admin_headers(blind.settings)).json()
        assert state["mode"] == "on" and state["reindex"]["state"] == "done"
        assert [v["state"] for v in state["versions"]] == ["active"]
    close()
    chat = blind.chat(blind.blind_tenant)
    later = blind.post(chat, BLIND_TEXTS[2:])
    plain_chat = blind.chat(blind.plain_tenant)
    plain = blind.post(plain_chat, PLAIN_TEXTS)
    yield {
        "early_chat": early_chat,
        "early": early,
        "chat": chat,
        "later": later,
        "plain_chat": plain_chat,
        "plain": plain,
    }


def test_blind_documents_hold_keyed_tokens_and_the_reader_finds_them(
    blind: Blind, enabled: dict[str, object]
) -> None:
    chat, early_chat = enabled["chat"], enabled["early_chat"]
    assert isinstance(chat, uuid.UUID) and isinstance(early_chat, uuid.UUID)
    key = blind.index_keys.current(blind.blind_tenant)
    assert key is not None and key.version == 1
    client = blind.index._client
    # Stored terms: keyed, at the key's version, for messages indexed before and after.
    for word, where in (("zeppelin", early_chat), ("morgen", chat), ("okapibanana", chat)):
        raw = {"bool": {"filter": [{"term": {"chat_id": str(where)}}]}}
        plain_hit = {"bool": {"filter": [*raw["bool"]["filter"], {"term": {"tokens": word}}]}}
        keyed_hit = {
            "bool": {
                "filter": [
                    *raw["bool"]["filter"],
                    {"term": {"tokens": keyed_term(key, word)}},
                    {"term": {"index_key_version": 1}},
                ]
            }
        }
        body_plain = {"query": plain_hit}
        body_keyed = {"query": keyed_hit}
        assert client.count(index=blind.index.index, body=body_plain)["count"] == 0
        assert client.count(index=blind.index.index, body=body_keyed)["count"] == 1

    app, close = build_reader(blind.settings)
    with TestClient(app) as reader:
        s = blind.settings
        assert found(reader, s, chat, "okapibanana") == [BLIND_TEXTS[5]]
        assert found(reader, s, early_chat, "kangaroo wombat") == [BLIND_TEXTS[1]]
        assert found(reader, s, early_chat, "kangaroo platypus") == []
        # Normalisation happens before the HMAC: case, NFD against NFC, fullwidth letters.
        assert found(reader, s, chat, "ÜBERSEE") == [BLIND_TEXTS[2]]
        assert found(reader, s, chat, unicodedata.normalize("NFD", "übersee früh")) == [
            BLIND_TEXTS[2]
        ]
        fullwidth = "ＯＫＡＰＩＢＡＮＡＮＡ"  # noqa: RUF001 - fullwidth Latin on purpose
        assert found(reader, s, chat, fullwidth) == [BLIND_TEXTS[5]]
        # ICU segments 東京タワー as one dictionary word: whole words match, not fragments.
        assert found(reader, s, chat, "東京タワー") == [BLIND_TEXTS[3]]
        assert found(reader, s, chat, "東京") == []
        assert found(reader, s, chat, "фонтана") == [BLIND_TEXTS[4]]
        assert found(reader, s, chat, "🦘") == [BLIND_TEXTS[5]]  # ICU: an emoji is a word
        # No prefix or fuzzy match on keyed tokens (docs/security.md, "Blind index").
        assert found(reader, s, chat, "okapi") == []
        # The plain tenant is unaffected: plain terms, no key version, found as before.
        plain_chat = enabled["plain_chat"]
        assert isinstance(plain_chat, uuid.UUID)
        assert found(reader, s, plain_chat, "PLATYPUS noon") == [PLAIN_TEXTS[0]]
        body = {
            "query": {
                "bool": {
                    "filter": [
                        {"term": {"chat_id": str(plain_chat)}},
                        {"term": {"tokens": "aardvark"}},
                    ]
                }
            }
        }
        assert blind.index._client.count(index=blind.index.index, body=body)["count"] == 1
        sources = [s for s in blind.index.all_sources() if s.get("chat_id") == str(plain_chat)]
        assert len(sources) == 2 and all("index_key_version" not in s for s in sources)
    close()


def test_opensearch_data_folder_holds_no_word_of_a_blind_tenant(
    blind: Blind, enabled: dict[str, object]
) -> None:
    key = blind.index_keys.current(blind.blind_tenant)
    assert key is not None
    client = OpenSearch(hosts=[blind.index.settings.url])
    folder = index_folder(client, blind.index.index)
    needles = {n for text in BLIND_TEXTS for n in phrases(text)} | set(BLIND_WORDS)
    for flushed in (False, True):
        if flushed:
            client.indices.flush(index=blind.index.index, params={"force": "true"})
        files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        # The scan sees what was sent: the keyed tokens are in the translog (before the flush)
        # and the plain tenant's words are in the files (so plain words would be seen too).
        if not flushed:
            token = keyed_term(key, "okapibanana").encode()
            assert any("translog" in str(p) and token in d for p, d in files.items())
        assert any(b"aardvark" in d for d in files.values())
        for needle in needles:
            forms = {needle, needle.casefold(), unicodedata.normalize("NFD", needle)}
            for form in forms:
                for encoded in (form.encode(), form.encode("utf-16-le")):
                    hits = [str(p.relative_to(folder)) for p, d in files.items() if encoded in d]
                    assert not hits, f"{form!r} found in {hits} (flushed={flushed})"
    client.close()


def test_index_key_never_reaches_opensearch_redis_or_logs(
    blind: Blind, enabled: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fresh = IndexKeys(
        IndexKeyRepository(blind.database), ChatKeyRepository(blind.database), blind.kms
    )
    key = fresh.current(blind.blind_tenant)  # unwrapped through the KMS (logged paths run)
    assert key is not None and fresh.live(blind.blind_tenant) == [key]
    assert "material" not in repr(key) or "<redacted>" in repr(key)
    assert key.material.hex() not in repr(key) and key.material.hex() not in str(key)
    chat = blind.chat(blind.blind_tenant)
    blind.post(chat, ["one more secret okapibanana"])
    encodings = key_encodings(key.material)
    client = OpenSearch(hosts=[blind.index.settings.url])
    folder = index_folder(client, blind.index.index)
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(e in data for e in encodings), f"index key in {path}"
    client.close()
    # Redis: every value of every key (this run's and everyone else's).
    r = redis.Redis.from_url(blind.settings.redis.url)
    scanned = 0
    for name in r.scan_iter(count=1000):
        dumped = r.dump(name) or b""
        scanned += 1
        assert not any(e in dumped or e in name for e in encodings), f"index key in Redis {name!r}"
    assert scanned > 0  # the run's wrapped DEKs and pointers are there: the scan sees Redis
    r.close()
    text = "\n".join(f"{rec.getMessage()} {rec.__dict__}" for rec in caplog.records)
    assert not any(e.decode("latin-1") in text for e in encodings)
    assert not any(word in text for word in ("okapibanana", "secret"))
    # The wrapped key in Postgres is a Transit ciphertext, not the key.
    [row] = IndexKeyRepository(blind.database).keys(blind.blind_tenant)
    assert row.wrapped_key is not None and row.wrapped_key.startswith("vault:v")
    assert not any(e.decode("latin-1") in row.wrapped_key for e in encodings)


def test_kms_outage_holds_the_batch_and_indexes_it_once_the_kms_is_back(
    blind: Blind, enabled: dict[str, object]
) -> None:
    address = blind.settings.vault.address
    host, port = address.split("://", 1)[-1].rsplit(":", 1)
    proxy = TcpProxy(host, int(port)).start()
    try:
        vault = blind.settings.vault.model_copy(update={"address": f"http://{proxy.address}"})
        cut_off = IndexKeys(
            IndexKeyRepository(blind.database),
            ChatKeyRepository(blind.database),
            TransitKms(vault, retry_seconds=1.0, timeout=1.0),
        )
        chat = blind.chat(blind.blind_tenant)
        record = MessageRecord(
            message_id=blind.ids.next_id(),
            chat_id=chat,
            tenant_id=blind.blind_tenant,
            sender_id="alice",
            text="held while the KMS is down",
            sent_at=datetime.now(UTC),
        )
        records = [RawRecord("t", 0, 0, record.key(), record.value())]
        chats = ChatKeyRepository(blind.database)
        assert encrypt_and_store(records, blind.keys, blind.store, chats) == []
        proxy.down()
        with pytest.raises(KmsUnavailable):  # retriable: the runtime holds the batch
            index_batch(records, blind.index, chats, cut_off)
        stop = threading.Event()
        outcome: list[object] = []
        worker = threading.Thread(
            target=lambda: outcome.append(
                run_until_done(
                    "indexer", lambda b: index_batch(b, blind.index, chats, cut_off), records, stop
                )
            )
        )
        worker.start()
        time.sleep(3)  # several failed attempts while the KMS is down
        assert worker.is_alive() and blind.index.count(chat) == 0
        proxy.forward()
        worker.join(60)
        assert outcome == [[]]
        blind.index.refresh()
        assert blind.index.count(chat) == 1
        key = blind.index_keys.current(blind.blind_tenant)
        assert key is not None
        found = blind.index.search_messages(
            SearchRequest(
                chat_ids=[chat], words=[WordMatch(any_of=[keyed_term(key, "kms")], exact=[])]
            )
        )
        assert [hit.message_id for hit in found.hits] == [record.message_id]
    finally:
        proxy.close()


def sessions_blocked_by(
    database: Database, holder_pid: int, proc: subprocess.Popen[bytes]
) -> list[int]:
    """The server sessions waiting on a lock of session `holder_pid`, once there is one."""
    deadline = time.monotonic() + 120
    with database.connection() as watcher:
        while True:
            rows = watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (holder_pid,),
            ).fetchall()
            if rows:
                return [int(row["pid"]) for row in rows]
            assert proc.poll() is None, "the re-index ended before it waited on its progress row"
            assert time.monotonic() < deadline, "the re-index never waited on its progress row"
            time.sleep(0.05)


def sessions_alive(database: Database, pids: list[int]) -> bool:
    with database.connection() as watcher:
        row = watcher.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
    return row is not None and int(row["n"]) > 0


def test_rotation_reindex_resumes_after_a_kill_and_search_never_misses(
    blind: Blind, enabled: dict[str, object], database: Database
) -> None:
    tenant = blind.blind_tenant
    chats = [blind.chat(tenant) for _ in range(40)]
    posted: dict[uuid.UUID, list[str]] = {}
    for n, chat in enumerate(chats):
        texts = [f"rotation word{n} common", f"second message{n} common"]
        blind.post(chat, texts)
        posted[chat] = texts
    old = blind.index_keys.current(tenant)
    assert old is not None
    total_chats = len(IndexKeyRepository(database).tenant_chats(tenant, None, 10_000))
    new_version = blind.index_keys.rotate(tenant, "test rotation")
    assert new_version == old.version + 1

    env = {**os.environ, **settings_env(blind.settings)}
    repo = IndexKeyRepository(database)
    with (
        open(os.devnull, "wb") as sink,
        psycopg.connect(blind.settings.postgres.conninfo()) as conn,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealstream.cli", "search", "reindex", "--tenant", tenant],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while (job := repo.reindex_job(tenant)) is not None and job.chats_done < 3:
                assert proc.poll() is None, "the re-index ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # Hold its progress row: the job blocks at its next chat, then dies there.
            conn.execute(f'SET search_path TO "{blind.settings.postgres.schema_name}"')
            conn.execute("SELECT 1 FROM search_reindex WHERE tenant_id = %s FOR UPDATE", (tenant,))
            # Its server sessions waiting on that row (not a fixed pause: a loaded machine
            # may take longer to finish the chat it was on).
            blocked = sessions_blocked_by(database, conn.info.backend_pid, proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        conn.rollback()
    # The killed job's last progress update was waiting on the row: it commits now (that chat
    # was written), then its server process notices the client is gone. Read the progress
    # once those sessions ended, so that no late update follows the reading.
    deadline = time.monotonic() + 60
    while sessions_alive(database, blocked):
        assert time.monotonic() < deadline, "the killed job's sessions never ended"
        time.sleep(0.1)
    mid = repo.reindex_job(tenant)
    assert mid is not None and mid.state == "running" and mid.target_version == new_version
    assert 3 <= mid.chats_done < total_chats, mid

    def every_message_found(reader: TestClient) -> None:
        s = blind.settings
        for n, chat in enumerate(chats):
            assert found(reader, s, chat, "common") == sorted(posted[chat]), chat
            assert found(reader, s, chat, f"word{n}") == [posted[chat][0]]

    app, close = build_reader(blind.settings)
    with TestClient(app) as reader:
        # Mid-way: documents under both key versions; the reader queries both.
        states = {
            hit["_source"].get("index_key_version")
            for hit in blind.index._client.search(
                index=blind.index.index,
                body={"size": 1000, "query": {"term": {"tenant_id": tenant}}},
            )["hits"]["hits"]
        }
        assert states == {old.version, new_version}
        every_message_found(reader)

        deadline = time.monotonic() + 60
        while True:
            try:
                report = reindex_tenant(
                    blind.index_keys, blind.keys, blind.store, blind.index, tenant
                )
                break
            except ReindexBusy:  # until Postgres has ended the killed job's session
                assert time.monotonic() < deadline
                time.sleep(0.5)
        print(f"\nresumed re-index: {report}")  # the figure docs/search.md quotes
        assert report.completed and report.target_version == new_version
        assert report.chats == total_chats - mid.chats_done  # resumed, not started over
        assert report.index_key_versions_destroyed == [old.version]
        assert blind.index.stale_documents(tenant, new_version) == []
        time.sleep(1.1)  # the reader's index-key list lives 1 s
        every_message_found(reader)
    close()
    [row_new, row_old] = repo.keys(tenant)
    assert (row_new.state, row_old.state, row_old.wrapped_key) == ("active", "destroyed", None)
    with pytest.raises(KeyDestroyed):
        IndexKeys(repo, ChatKeyRepository(database), blind.kms).key(tenant, old.version)
    actions = [e.action for e in ChatKeyRepository(database).audit_entries(None, 1000)]
    assert "index_key_rotated" in actions and "index_key_destroyed" in actions


def test_a_rotation_reindex_rekeys_an_edited_message_and_completes(
    blind: Blind, enabled: dict[str, object], database: Database
) -> None:
    """An edited message's document is at its edit's event id, above the re-index's version:
    the re-index must still re-key it (else the sweep finds it stale for ever and the job never
    completes) and must not bring the pre-edit words back."""
    tenant = blind.blind_tenant
    chat = blind.chat(tenant)
    [message_id] = blind.post(chat, ["before the edit: albatross"])
    edit = MessageRecord(
        kind="edit",
        message_id=message_id,
        event_id=blind.ids.next_id(),
        chat_id=chat,
        tenant_id=tenant,
        sender_id="alice",
        text="after the edit: cormorant",
        sent_at=datetime.now(UTC),
    )
    records = [RawRecord("t", 0, 0, edit.key(), edit.value())]
    chats = ChatKeyRepository(database)
    assert encrypt_and_store(records, blind.keys, blind.store, chats) == []
    assert index_batch(records, blind.index, chats, blind.index_keys) == []
    new_version = blind.index_keys.rotate(tenant, "rotation after an edit")

    report = reindex_tenant(
        blind.index_keys, blind.keys, blind.store, blind.index, tenant, purge_seconds=1.0
    )
    assert report.completed and report.target_version == new_version
    assert blind.index.stale_documents(tenant, new_version) == []
    document = blind.index.current_documents([message_id])[message_id]
    assert document.version == edit.event_id  # that edit's document, re-keyed in place
    key = blind.index_keys.current(tenant)
    assert key is not None and key.version == new_version

    def holding(word: str) -> int:
        term = {"term": {"tokens": keyed_term(key, word)}}
        query = {"bool": {"filter": [{"term": {"chat_id": str(chat)}}, term]}}
        return int(
            blind.index._client.count(index=blind.index.index, body={"query": query})["count"]
        )

    assert (holding("cormorant"), holding("albatross")) == (1, 0)
    time.sleep(1.1)  # the reader's index-key list lives 1 s
    app, close = build_reader(blind.settings)
    with TestClient(app) as reader:
        assert found(reader, blind.settings, chat, "cormorant") == ["after the edit: cormorant"]
    close()


def test_migrate_adds_the_key_version_field_to_an_index_made_before(settings: Settings) -> None:
    import json
    from importlib import resources

    older = SearchIndex(
        settings.opensearch.model_copy(
            update={"index_prefix": f"{settings.opensearch.index_prefix}-preblind"}
        )
    )
    body = json.loads(resources.files("schemas").joinpath("opensearch/messages.json").read_text())
    del body["mappings"]["properties"]["index_key_version"]
    try:
        older._client.indices.create(index=older.index, body=body)
        older.migrate()
        mapping = older._client.indices.get_mapping(index=older.index)
        properties = mapping[older.index]["mappings"]["properties"]
        assert properties["index_key_version"] == {"type": "integer"}
    finally:
        older.drop()
        older.close()
