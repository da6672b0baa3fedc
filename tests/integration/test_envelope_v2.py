"""Envelope v2 on the real stack: what a Cassandra writer can no longer do (docs/security.md).

Messages are written by the encryptor's own logic (`encrypt_and_store`, real key service, real
Cassandra) and read back through the reader's HTTP API. An attacker with write access to
Cassandra then changes one column of a row with a plain CQL UPDATE; with envelope v2 the row no
longer opens (500 `integrity_error`), where v1 showed the forged value. Also: v1 rows (written
before v2) still read, and the history re-encryption job upgrades them to v2 in place.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from encryptor.logic import encrypt_and_store
from reader.wiring import build
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds, bucket_of, id_time
from sealstream import crypto
from sealstream.adapters.cassandra import MessageStore, StoredMessage
from sealstream.adapters.opensearch import SearchIndex
from sealstream.auth import mint_token
from sealstream.keys.service import KeyService
from sealstream.lifecycle import reencrypt_chat
from sealstream.settings import CassandraSettings, Settings
from sealstream.streaming import RawRecord
from sealstream.wiring import key_service
from tests.integration.conftest import fresh_index, fresh_store, module_stores


@pytest.fixture(scope="module")
def env_settings(settings: Settings) -> Settings:
    """This run's settings with a keyspace and index of this module's own."""
    return module_stores(settings, "env2")


@pytest.fixture(scope="module")
def store(env_settings: Settings) -> Iterator[MessageStore]:
    with fresh_store(env_settings) as store:
        yield store


@pytest.fixture(scope="module")
def index(env_settings: Settings) -> Iterator[SearchIndex]:
    with fresh_index(env_settings) as index:
        yield index


@pytest.fixture(scope="module")
def keys(env_settings: Settings, database: Any, kms: Any) -> Iterator[KeyService]:
    kms.ensure_key(env_settings.vault.default_key)  # the kms fixture deletes it at the end
    with key_service(env_settings, database) as service:
        yield service


@pytest.fixture(scope="module")
def client(
    env_settings: Settings, store: MessageStore, index: SearchIndex, keys: KeyService
) -> Iterator[TestClient]:
    app, close = build(env_settings)
    try:
        with TestClient(app) as test_client:
            yield test_client
    finally:
        close()


@pytest.fixture(scope="module")
def as_user(env_settings: Settings) -> Callable[[str], dict[str, str]]:
    return lambda user: {"Authorization": f"Bearer {mint_token(env_settings.auth, user)}"}


_IDS = SnowflakeIds(worker_id=907)


def post(keys: KeyService, store: MessageStore, chat: uuid.UUID, sender: str, text: str) -> int:
    """One message written exactly as the encryptor writes it (its own batch function)."""
    record = MessageRecord(
        message_id=_IDS.next_id(),
        chat_id=chat,
        sender_id=sender,
        text=text,
        sent_at=datetime.now(UTC),
    )
    raw = RawRecord("sealstream.messages.v1", 0, 0, record.key(), record.value())
    assert encrypt_and_store([raw], keys, store) == []
    return record.message_id


def cql(
    store: MessageStore, assignment: str, chat: uuid.UUID, message_id: int, *values: Any
) -> None:
    """A direct CQL UPDATE of one row, as anyone holding Cassandra credentials could run."""
    store.session.execute(
        f"UPDATE {store.keyspace}.messages SET {assignment}"
        " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
        (*values, chat, bucket_of(message_id), message_id),
    )


def read(client: TestClient, headers: dict[str, str], chat: uuid.UUID, message_id: int) -> Any:
    return client.get(f"/v1/chats/{chat}/messages/{message_id}", headers=headers)


def assert_integrity_error(response: Any) -> None:
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "integrity_error", response.text
    assert "mallory" not in response.text and "secret plan" not in response.text


def test_sender_rewritten_by_cql_fails_to_open(
    client: TestClient, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob", "mallory"))
    message_id = post(keys, store, chat, "alice", "the secret plan")
    before = read(client, as_user("bob"), chat, message_id)
    assert before.status_code == 200, before.text
    assert before.json()["sender_id"] == "alice"

    cql(store, "sender_id = %s", chat, message_id, "mallory")

    # v1 opened this row and showed "mallory" as the sender; v2 binds the sender.
    assert_integrity_error(read(client, as_user("bob"), chat, message_id))
    page = client.get(f"/v1/chats/{chat}/messages", headers=as_user("bob"))
    assert_integrity_error(page)

    cql(store, "sender_id = %s", chat, message_id, "alice")  # put back: opens again
    assert read(client, as_user("bob"), chat, message_id).json()["text"] == "the secret plan"


def test_creation_time_rewritten_by_cql_fails_to_open(
    client: TestClient, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob"))
    message_id = post(keys, store, chat, "alice", "on time")
    assert read(client, as_user("bob"), chat, message_id).status_code == 200
    cql(store, "created_at = %s", chat, message_id, datetime(2026, 1, 2, tzinfo=UTC))
    assert_integrity_error(read(client, as_user("bob"), chat, message_id))


def test_revision_rewritten_by_cql_fails_to_open(
    client: TestClient, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob"))
    message_id = post(keys, store, chat, "alice", "first and only revision")
    row = store.get(chat, message_id)
    assert row is not None and row.revision == 1
    assert crypto.envelope_format(row.envelope) == crypto.FORMAT_V2
    cql(store, "revision = %s", chat, message_id, 2)
    assert_integrity_error(read(client, as_user("bob"), chat, message_id))
    # A row from before the revision column (null) is revision 1 and opens.
    store.session.execute(
        f"DELETE revision FROM {store.keyspace}.messages"
        " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
        (chat, bucket_of(message_id), message_id),
    )
    assert read(client, as_user("bob"), chat, message_id).status_code == 200


def _write_v1_row(
    keys: KeyService, store: MessageStore, chat: uuid.UUID, sender: str, text: str
) -> StoredMessage:
    """A row as the encryptor wrote it before v2: a v1 envelope, no revision column."""
    message_id = _IDS.next_id()
    key = keys.current_key(chat)
    row = StoredMessage(chat, message_id, sender, key.version, b"", id_time(message_id))
    rnd = os.urandom(28)
    envelope = crypto._seal_v1_with(text.encode(), key, row.context(), rnd[:16], rnd[16:])
    assert store.write_many([StoredMessage(**{**row.__dict__, "envelope": envelope})]) == []
    store.session.execute(
        f"DELETE revision FROM {store.keyspace}.messages"
        " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
        (chat, bucket_of(message_id), message_id),
    )
    got = store.get(chat, message_id)
    assert got is not None and crypto.envelope_format(got.envelope) == crypto.FORMAT_V1
    return got


def test_v1_rows_still_read_and_reencryption_upgrades_them_to_v2(
    client: TestClient, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob", "mallory"))
    old = [_write_v1_row(keys, store, chat, "alice", f"old message {i}") for i in range(3)]
    new_id = post(keys, store, chat, "bob", "written as v2")
    for i, row in enumerate(old):
        body = read(client, as_user("bob"), chat, row.message_id).json()
        assert (body["sender_id"], body["text"]) == ("alice", f"old message {i}")

    # A v1 envelope claimed for an edited message (revision 2) is a downgrade: it fails.
    cql(store, "revision = %s", chat, old[0].message_id, 2)
    assert_integrity_error(read(client, as_user("bob"), chat, old[0].message_id))
    cql(store, "revision = %s", chat, old[0].message_id, 1)

    report = reencrypt_chat(keys, store, chat, retire=False)
    assert (report.rows_examined, report.rows_reencrypted) == (4, 3)  # the v2 row is left alone
    for i, row in enumerate(old):
        upgraded = store.get(chat, row.message_id)
        assert upgraded is not None
        assert crypto.envelope_format(upgraded.envelope) == crypto.FORMAT_V2
        assert upgraded.dek_version == row.dek_version  # same DEK version, new format
        body = read(client, as_user("bob"), chat, row.message_id).json()
        assert (body["sender_id"], body["text"]) == ("alice", f"old message {i}")
    assert read(client, as_user("alice"), chat, new_id).json()["text"] == "written as v2"

    # Once upgraded, the sender is bound: the rewrite that v1 let through now fails.
    cql(store, "sender_id = %s", chat, old[1].message_id, "mallory")
    assert_integrity_error(read(client, as_user("bob"), chat, old[1].message_id))
    # A second run finds nothing left to upgrade.
    cql(store, "sender_id = %s", chat, old[1].message_id, "alice")
    assert reencrypt_chat(keys, store, chat, retire=False).rows_reencrypted == 0


def test_reencryption_upgrades_v1_rows_under_an_old_dek_version_too(
    client: TestClient, keys: KeyService, store: MessageStore, as_user
) -> None:
    chat = uuid.uuid4()
    keys.create_chat(chat, ("alice", "bob"))
    old = _write_v1_row(keys, store, chat, "alice", "before rotation")
    keys.rotate(chat, "test")
    report = reencrypt_chat(keys, store, chat, retire=False)
    assert report.rows_reencrypted == 1
    row = store.get(chat, old.message_id)
    assert row is not None and row.dek_version == old.dek_version + 1
    assert crypto.envelope_format(row.envelope) == crypto.FORMAT_V2
    assert read(client, as_user("bob"), chat, old.message_id).json()["text"] == "before rotation"


def test_migrate_adds_the_revision_column_to_an_older_keyspace(env_settings: Settings) -> None:
    """A keyspace made before v2 (no `revision` column) gets it from `migrate`, twice harmless."""
    settings = CassandraSettings(
        hosts=env_settings.cassandra.hosts,
        port=env_settings.cassandra.port,
        keyspace=f"{env_settings.cassandra.keyspace}_old",
    )
    store = MessageStore(settings)
    store.connect()
    try:
        store.migrate()
        store.session.execute(f"ALTER TABLE {settings.keyspace}.messages DROP revision")

        def columns() -> set[str]:
            rows = store.session.execute(
                "SELECT column_name FROM system_schema.columns"
                " WHERE keyspace_name = %s AND table_name = 'messages'",
                (settings.keyspace,),
            )
            return {row.column_name for row in rows}

        assert "revision" not in columns()
        store.migrate()
        store.migrate()
        assert "revision" in columns()
    finally:
        store.drop_keyspace()
        store.close()
