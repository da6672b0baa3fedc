"""Deletion, retention and crypto-shredding of attachments on the real stack: files stored with
`AttachmentFiles` (S3Proxy + Cassandra) under a real KeyService (Postgres, Redis, OpenBao).

What a user relies on: once a chat is deleted nothing of its files remains (rows, objects,
unfinished uploads; the receipt counts them), not even from an upload that finishes after the
deletion; a deleted message's files stop downloading and their bytes go; retention removes old
files and keeps new ones readable; and a copy of a deleted chat's objects taken before the
deletion cannot be decrypted by someone holding the KMS, Postgres and Redis.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from admin.wiring import build as build_admin
from encryptor.logic import store_batch
from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds, bucket_of
from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.object_store import ObjectNotFound, ObjectStore, ObjectStoreError
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.redis import RedisKeyCache
from sealstream.attachments import AttachmentFiles, chat_prefix, object_key
from sealstream.auth import ADMIN_ROLE, mint_token
from sealstream.crypto import ChatKey
from sealstream.errors import DecryptionError, KeyDestroyed
from sealstream.file_crypto import FileContext, decrypt_file
from sealstream.keys.service import KeyService, kms_context
from sealstream.lifecycle import (
    apply_retention,
    delete_chat,
    delete_message,
    reencrypt_chat,
    settle_upload,
    sweep_drafts,
)
from sealstream.settings import KafkaSettings, Settings, StackSettings
from sealstream.streaming import RawRecord
from tests.integration.conftest import SCRATCH_PART_SIZE
from tests.sealed_rows import sealed_row

SEGMENT = 4096
IDS = SnowflakeIds(worker_id=1013)
CANARY = b"sealstream-deletion-canary-" + os.urandom(6).hex().encode()


@pytest.fixture(scope="module")
def keys(settings: Settings, database: Database, kms: object) -> Iterator[KeyService]:
    service = KeyService(
        ChatKeyRepository(database),
        kms,  # type: ignore[arg-type]
        RedisKeyCache(settings.redis),
        settings.keys,
        settings.vault.default_key,
        actor="attachment-deletion-test",
    )
    service.start()
    yield service
    service.close()


@pytest.fixture(scope="module")
def files(
    scratch_object_store: ObjectStore, message_store: MessageStore, keys: KeyService
) -> AttachmentFiles:
    return AttachmentFiles(scratch_object_store, message_store, keys, segment_size=SEGMENT)


def new_chat(keys: KeyService, *people: str) -> uuid.UUID:
    chat = uuid.uuid4()
    keys.create_chat(chat, people or ("ann", "bob"))
    return chat


def canary_file(size: int) -> bytes:
    """The canary over and over: any stored plaintext fragment of 40+ bytes contains it."""
    return (CANARY * (size // len(CANARY) + 1))[:size]


def pieces(data: bytes, size: int = 10_007) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def upload(files: AttachmentFiles, chat: uuid.UUID, data: bytes, file_id: int | None = None) -> Any:
    return files.store(
        chat, file_id or IDS.next_id(), "ann", "image/png", pieces(data), max_bytes=len(data) + 1
    )


def open_upload(objects: ObjectStore, key: str) -> str:
    """A multipart upload with one part, never completed (a client cut off halfway)."""
    client = objects._client
    upload_id = str(client.create_multipart_upload(Bucket=objects.bucket, Key=key)["UploadId"])
    client.upload_part(
        Bucket=objects.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1024
    )
    return upload_id


def set_attachments(store: MessageStore, chat: uuid.UUID, message_id: int, ids: list[int]) -> None:
    """The message references these attachments (part A's encryptor writes the column)."""
    store.session.execute(
        f"UPDATE {store.keyspace}.messages SET attachment_ids = %s"
        " WHERE chat_id = %s AND bucket = %s AND message_id = %s",
        (ids, chat, bucket_of(message_id), message_id),
    )


# --- chat deletion -------------------------------------------------------------------------------


def test_chat_deletion_removes_rows_objects_and_unfinished_uploads_and_counts_them(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
) -> None:
    objects = files.objects
    chat, other = new_chat(keys), new_chat(keys)
    stored = [upload(files, chat, os.urandom(n)) for n in (0, 5000, SCRATCH_PART_SIZE + 3)]
    keys.rotate(chat, "test")  # files under two DEK versions
    stored.append(upload(files, chat, os.urandom(100)))
    # An object whose row was never written (an upload that died between the two), and an
    # upload cut off halfway: the prefix listing finds both.
    objects.put(object_key(chat, IDS.next_id()), [b"orphan ciphertext"])
    open_upload(objects, object_key(chat, IDS.next_id()))
    kept_data = os.urandom(3000)
    kept = upload(files, other, kept_data)

    receipt = delete_chat(keys, search_index, message_store, chat, "erasure", objects=objects)

    assert receipt.dek_versions_destroyed == [1, 2]
    assert receipt.attachment_rows_deleted == 4
    assert receipt.attachment_objects_deleted == 5
    assert receipt.incomplete_uploads_aborted == 1
    for row in stored:
        assert message_store.attachment(chat, row.file_id) is None
        assert files.get(chat, row.file_id) is None
        with pytest.raises(ObjectNotFound):
            objects.head(row.object_key)
    assert list(objects.keys(chat_prefix(chat))) == []
    assert objects.incomplete_uploads(chat_prefix(chat)) == []
    # Another chat's file is untouched.
    assert b"".join(files.read(files.get(other, kept.file_id) or kept)) == kept_data
    # Idempotent: a second run finds nothing more.
    again = delete_chat(keys, search_index, message_store, chat, "again", objects=objects)
    assert (again.attachment_rows_deleted, again.attachment_objects_deleted) == (0, 0)


class HeldStream:
    """An upload's body that stops after `before` bytes until released (a slow client)."""

    def __init__(self, data: bytes, before: int) -> None:
        self.data, self.before = data, before
        self.reached, self.release = threading.Event(), threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield from pieces(self.data[: self.before])
        self.reached.set()
        assert self.release.wait(60)
        yield from pieces(self.data[self.before :])


def test_an_upload_completing_after_the_shred_leaves_nothing_readable(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
) -> None:
    objects = files.objects
    chat = new_chat(keys)
    # A small upload held before its object is written, and a multipart one held after its
    # first part went up: both read the chat's DEK before the deletion.
    small = HeldStream(canary_file(20_000), before=10_000)
    large = HeldStream(os.urandom(SCRATCH_PART_SIZE + 50_000), before=SCRATCH_PART_SIZE + 20_000)
    outcomes: dict[str, Any] = {}

    def run(name: str, stream: HeldStream, file_id: int) -> None:
        try:
            row = files.store(chat, file_id, "ann", "text/plain", stream, 10**9)
            outcomes[name] = ("stored", row, settle_upload(keys, objects, row))
        except ObjectStoreError as exc:
            outcomes[name] = ("failed", exc, None)

    small_id, large_id = IDS.next_id(), IDS.next_id()
    threads = [
        threading.Thread(target=run, args=("small", small, small_id)),
        threading.Thread(target=run, args=("large", large, large_id)),
    ]
    for thread in threads:
        thread.start()
    try:
        assert small.reached.wait(30) and large.reached.wait(30)
        assert objects.incomplete_uploads(chat_prefix(chat)), "the large upload should be open"
        # The large upload's first part may still be in flight: the deletion's abort races it
        # (test_object_store.py has that race on its own).
        receipt = delete_chat(keys, search_index, message_store, chat, "erasure", objects=objects)
    finally:  # a failure above must not leave the uploads hanging into the next tests
        small.release.set()
        large.release.set()
        for thread in threads:
            thread.join(60)
    assert receipt.incomplete_uploads_aborted == 1

    # The small upload completed with the DEK it held: its row is shadowed by the deletion, and
    # the upload path's check deletes its object and says the chat is gone.
    status, row, settled = outcomes["small"]
    assert status == "stored" and settled is False
    # The large one lost its multipart upload to the deletion.
    assert outcomes["large"][0] == "failed"
    for file_id in (small_id, large_id):
        assert message_store.attachment(chat, file_id) is None
        assert files.get(chat, file_id) is None
    assert list(objects.keys(chat_prefix(chat))) == []
    assert objects.incomplete_uploads(chat_prefix(chat)) == []
    # Nor the large upload's parts: S3Proxy keeps those sent after the abort as files of its
    # own (`.mpus-<upload>-<key>-<n>`) unless the uploader's failure removes them.
    assert not [key for key in objects.keys(".mpus-") if object_key(chat, large_id) in key]
    with pytest.raises(KeyDestroyed):
        keys.key(chat, row.dek_version)


def test_an_upload_to_a_live_chat_is_settled_as_stored(
    files: AttachmentFiles, keys: KeyService
) -> None:
    chat = new_chat(keys)
    row = upload(files, chat, b"still here")
    assert settle_upload(keys, files.objects, row) is True
    assert b"".join(files.read(row)) == b"still here"


# --- message deletion ----------------------------------------------------------------------------


def test_admin_message_deletion_deletes_its_attachments_and_their_objects(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
) -> None:
    objects = files.objects
    chat = new_chat(keys)
    attached = [upload(files, chat, os.urandom(n)) for n in (10, SEGMENT + 1)]
    unrelated = upload(files, chat, b"another message's file")
    message_id = IDS.next_id()
    message_store.write_many(
        [sealed_row(chat, message_id, "ann", keys.current_key(chat), "see files")]
    )
    set_attachments(message_store, chat, message_id, [r.file_id for r in attached])

    done = delete_message(message_store, search_index, chat, message_id, objects=objects)

    assert (done.found, done.attachments_deleted, done.attachment_objects_deleted) == (True, 2, 2)
    for row in attached:
        assert files.get(chat, row.file_id) is None  # the reader answers 404
        marked = message_store.attachment(chat, row.file_id)
        assert marked is not None and marked.deleted_at is not None
        with pytest.raises(ObjectNotFound):
            files.read(row)  # even with the metadata in hand, the bytes are gone
    assert b"".join(files.read(unrelated)) == b"another message's file"
    # Run again (a retry after a failure): nothing left to do, nothing counted twice.
    again = delete_message(message_store, search_index, chat, message_id, objects=objects)
    assert (again.found, again.attachments_deleted, again.attachment_objects_deleted) == (
        False,
        0,
        0,
    )


def _raw(record: MessageRecord) -> RawRecord:
    return RawRecord("sealstream.messages.v1", 0, 0, record.key(), record.value())


def test_a_senders_deletion_through_the_encryptor_deletes_the_attachments(
    files: AttachmentFiles, keys: KeyService, message_store: MessageStore
) -> None:
    objects = files.objects
    chat = new_chat(keys)
    post = MessageRecord(
        message_id=IDS.next_id(), chat_id=chat, sender_id="ann", text="my photo",
        sent_at=datetime.now(UTC),
    )  # fmt: skip
    assert store_batch([_raw(post)], keys, message_store, keys.repo).rejected == []
    photo = upload(files, chat, canary_file(SEGMENT * 3))
    set_attachments(message_store, chat, post.message_id, [photo.file_id])
    assert files.get(chat, photo.file_id) is not None
    delete = MessageRecord(
        kind="delete", message_id=post.message_id, event_id=IDS.next_id(), chat_id=chat,
        sender_id="ann", sent_at=datetime.now(UTC),
    )  # fmt: skip

    stored = store_batch([_raw(delete)], keys, message_store, keys.repo, objects=objects)

    assert stored.rejected == [] and [c.kind for c in stored.changes] == ["delete"]
    message = message_store.get(chat, post.message_id)
    assert message is not None and message.deleted_at is not None
    assert files.get(chat, photo.file_id) is None
    with pytest.raises(ObjectNotFound):
        objects.head(photo.object_key)


class FailingDeletes:
    """The object store refusing deletions (an outage): the batch must fail, not drop them."""

    def delete(self, key: str) -> None:
        raise ObjectStoreError(f"DeleteObject {key} failed: outage", retriable=True)


def test_a_senders_deletion_during_an_object_store_outage_is_retried_not_dropped(
    files: AttachmentFiles, keys: KeyService, message_store: MessageStore
) -> None:
    chat = new_chat(keys)
    post = MessageRecord(
        message_id=IDS.next_id(), chat_id=chat, sender_id="ann", text="doc",
        sent_at=datetime.now(UTC),
    )  # fmt: skip
    store_batch([_raw(post)], keys, message_store, keys.repo)
    doc = upload(files, chat, b"contract")
    set_attachments(message_store, chat, post.message_id, [doc.file_id])
    delete = MessageRecord(
        kind="delete", message_id=post.message_id, event_id=IDS.next_id(), chat_id=chat,
        sender_id="ann", sent_at=datetime.now(UTC),
    )  # fmt: skip
    with pytest.raises(ObjectStoreError):
        store_batch([_raw(delete)], keys, message_store, keys.repo, objects=FailingDeletes())
    message = message_store.get(chat, post.message_id)
    assert message is not None and message.deleted_at is None  # left for the retry
    # The retry (the runtime redelivers the batch) once the store is back.
    retried = store_batch([_raw(delete)], keys, message_store, keys.repo, objects=files.objects)
    assert retried.rejected == []
    assert files.get(chat, doc.file_id) is None
    with pytest.raises(ObjectNotFound):
        files.objects.head(doc.object_key)


def test_the_admin_api_receipts_count_attachments(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    smoke_settings: Settings,
    kafka_topics: KafkaSettings,
) -> None:
    """The admin API on the real adapters (its own ObjectStore on the test bucket): the message
    deletion's answer and the chat deletion's receipt count the attachments they removed."""
    settings = smoke_settings.model_copy(
        update={
            "object_store": files.objects.settings,
            "kafka": kafka_topics,
            "deletion": smoke_settings.deletion.model_copy(update={"sweep_seconds": 0.5}),
        }
    )
    token = mint_token(settings.auth, "ops", roles=(ADMIN_ROLE,))
    admin_headers = {"Authorization": f"Bearer {token}"}
    chat = new_chat(keys)
    message_id = IDS.next_id()
    message_store.write_many([sealed_row(chat, message_id, "ann", keys.current_key(chat), "x")])
    on_message = upload(files, chat, b"on the message")
    set_attachments(message_store, chat, message_id, [on_message.file_id])
    in_chat = [upload(files, chat, os.urandom(n)) for n in (1, 2, 3)]
    app, close = build_admin(settings)
    try:
        with TestClient(app) as admin:
            gone = admin.delete(f"/v1/chats/{chat}/messages/{message_id}", headers=admin_headers)
            assert gone.status_code == 200, gone.text
            assert gone.json()["attachments_deleted"] == 1
            assert gone.json()["attachment_objects_deleted"] == 1
            receipt = admin.delete(f"/v1/chats/{chat}", headers=admin_headers)
            assert receipt.status_code == 200, receipt.text
            body = receipt.json()
    finally:
        close()
    # The message's attachment row (marked deleted) and the chat's three files.
    assert body["attachment_rows_deleted"] == 4
    assert body["attachment_objects_deleted"] == 3
    assert body["incomplete_uploads_aborted"] == 0
    for row in in_chat:
        with pytest.raises(ObjectNotFound):
            files.objects.head(row.object_key)


def test_the_cli_message_deletion_prints_the_attachment_counts(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    smoke_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from sealstream.cli import app

    chat = new_chat(keys)
    message_id = IDS.next_id()
    message_store.write_many([sealed_row(chat, message_id, "ann", keys.current_key(chat), "x")])
    attached = [upload(files, chat, b"one"), upload(files, chat, b"two")]
    set_attachments(message_store, chat, message_id, [r.file_id for r in attached])
    monkeypatch.setenv("SEALSTREAM_CASSANDRA__KEYSPACE", smoke_settings.cassandra.keyspace)
    monkeypatch.setenv(
        "SEALSTREAM_OPENSEARCH__INDEX_PREFIX", smoke_settings.opensearch.index_prefix
    )
    monkeypatch.setenv("SEALSTREAM_OBJECT_STORE__BUCKET", files.objects.bucket)

    result = CliRunner().invoke(app, ["keys", "delete-message", str(chat), str(message_id)])

    assert result.exit_code == 0, result.output
    assert "deleted; 2 attachments marked deleted, 2 objects deleted" in result.output
    for row in attached:
        assert files.get(chat, row.file_id) is None
        with pytest.raises(ObjectNotFound):
            files.objects.head(row.object_key)


# --- retention and re-encryption -----------------------------------------------------------------


def test_retention_removes_old_attachments_and_keeps_new_ones(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
    database: Database,
) -> None:
    objects = files.objects
    chat = new_chat(keys)
    now = datetime.now(UTC)
    with database.connection() as conn:
        conn.execute(
            "UPDATE chats SET created_at = %s WHERE chat_id = %s", (now - timedelta(days=30), chat)
        )
    old_ids = SnowflakeIds(14, clock_ms=lambda: int((now - timedelta(days=20)).timestamp() * 1000))
    old = [upload(files, chat, os.urandom(n), old_ids.next_id()) for n in (1, SEGMENT * 2)]
    orphan = object_key(chat, old_ids.next_id())  # an old object whose row was never written
    objects.put(orphan, [b"orphan"])
    keys.rotate(chat, "test")
    with database.connection() as conn:  # version 1 retired 19 days ago
        conn.execute(
            "UPDATE chat_deks SET valid_to = %s WHERE chat_id = %s AND dek_version = 1",
            (now - timedelta(days=19), chat),
        )
    new_data = os.urandom(SEGMENT + 7)
    new = upload(files, chat, new_data)
    assert new.dek_version == 2
    keys.repo.set_retention(7, chat_id=chat)

    report = apply_retention(keys, search_index, message_store, objects=objects)

    assert report.attachment_rows_deleted >= 2 and report.attachment_objects_deleted >= 3
    for row in old:
        assert message_store.attachment(chat, row.file_id) is None
        with pytest.raises(ObjectNotFound):
            objects.head(row.object_key)
    with pytest.raises(ObjectNotFound):
        objects.head(orphan)
    assert b"".join(files.read(files.get(chat, new.file_id) or new)) == new_data
    assert {d.dek_version: d.state for d in keys.repo.deks(chat)} == {
        1: "destroyed",
        2: "active",
    }


def test_retention_keeps_a_dek_version_a_live_attachment_uses(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
    database: Database,
) -> None:
    """A file written under a version retired long ago (an upload that held its key for long):
    the time rule alone would destroy the version; the file must stay readable."""
    chat = new_chat(keys)
    now = datetime.now(UTC)
    with database.connection() as conn:
        conn.execute(
            "UPDATE chats SET created_at = %s WHERE chat_id = %s", (now - timedelta(days=30), chat)
        )
    first = keys.current_key(chat)
    keys.rotate(chat, "test")
    with database.connection() as conn:
        conn.execute(
            "UPDATE chat_deks SET valid_to = %s WHERE chat_id = %s AND dek_version = 1",
            (now - timedelta(days=19), chat),
        )

    class HeldKey:
        def current_key(self, chat_id: uuid.UUID) -> ChatKey:
            return first

        def key(self, chat_id: uuid.UUID, version: int) -> ChatKey:
            return keys.key(chat_id, version)

    late = AttachmentFiles(files.objects, message_store, HeldKey(), SEGMENT)
    row = upload(late, chat, b"late upload under version 1")
    assert row.dek_version == 1
    keys.repo.set_retention(7, chat_id=chat)

    apply_retention(keys, search_index, message_store, objects=files.objects)

    assert {d.dek_version: d.state for d in keys.repo.deks(chat)}[1] == "retired"
    assert b"".join(files.read(row)) == b"late upload under version 1"


def test_reencryption_keeps_versions_live_attachments_use(
    files: AttachmentFiles, keys: KeyService, message_store: MessageStore, database: Database
) -> None:
    chat = new_chat(keys)
    photo = upload(files, chat, b"photo under version 1")
    message_id = IDS.next_id()
    message_store.write_many([sealed_row(chat, message_id, "ann", keys.current_key(chat), "hi")])
    keys.rotate(chat, "test")
    with database.connection() as conn:  # retired long enough ago for the job to destroy it
        conn.execute(
            "UPDATE chat_deks SET valid_to = %s WHERE chat_id = %s AND dek_version = 1",
            (datetime.now(UTC) - timedelta(days=1), chat),
        )

    report = reencrypt_chat(keys, message_store, chat)

    assert report.rows_reencrypted == 1
    assert report.dek_versions_destroyed == [] and report.dek_versions_kept_for_attachments == [1]
    assert b"".join(files.read(photo)) == b"photo under version 1"
    # Once the file is gone, the next run destroys the version.
    message_store.mark_attachment_deleted(chat, photo.file_id, datetime.now(UTC))
    assert reencrypt_chat(keys, message_store, chat).dek_versions_destroyed == [1]


# --- crypto-shredding ----------------------------------------------------------------------------


def attacker_keys(
    database: Database, kms: Any, redis: RedisKeyCache, chat: uuid.UUID
) -> list[ChatKey]:
    """Every DEK of `chat` someone holding Postgres, Redis and the KMS can recover: each wrapped
    DEK found in Postgres, unwrapped by the KMS (Redis is checked to hold none of the chat)."""
    with database.connection() as conn:
        rows = conn.execute(
            "SELECT dek_version, encrypted_dek, kms_key_name FROM chat_deks WHERE chat_id = %s",
            (chat,),
        ).fetchall()
    assert not [v for v in redis.scan_values() if str(chat) in v]
    return [
        ChatKey(
            row["dek_version"],
            kms.unwrap(
                row["kms_key_name"], row["encrypted_dek"], kms_context(chat, row["dek_version"])
            ),
        )
        for row in rows
        if row["encrypted_dek"] is not None
    ]


def opens_with_any(candidates: list[ChatKey], ctx: FileContext, ciphertext: bytes) -> bytes | None:
    for key in candidates:
        try:
            return b"".join(decrypt_file(key, ctx, [ciphertext]))
        except DecryptionError:
            continue
    return None


def test_shredded_files_cannot_be_decrypted_with_kms_postgres_redis_and_a_backup(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
    database: Database,
    kms: Any,
    settings: Settings,
) -> None:
    objects = files.objects
    redis = RedisKeyCache(settings.redis)
    chat = new_chat(keys)
    data = canary_file(3 * SEGMENT + 11)
    row = upload(files, chat, data)
    ctx = FileContext(chat, row.file_id)
    backup = b"".join(objects.get(row.object_key))  # the attacker's copy, taken before
    # The attack works before the deletion: it recovers the DEK that opens the copy.
    assert opens_with_any(attacker_keys(database, kms, redis, chat), ctx, backup) == data

    delete_chat(keys, search_index, message_store, chat, "erasure", objects=objects)

    assert attacker_keys(database, kms, redis, chat) == []
    with pytest.raises(KeyDestroyed):
        keys.key(chat, row.dek_version)
    fresh = KeyService(
        ChatKeyRepository(database), kms, redis, settings.keys, settings.vault.default_key
    )
    fresh.start()
    try:
        with pytest.raises(KeyDestroyed):
            fresh.key(chat, row.dek_version)
    finally:
        fresh.close()
    with pytest.raises(ObjectNotFound):
        objects.head(row.object_key)
    assert CANARY not in backup  # the copy itself is ciphertext


def test_the_object_stores_files_hold_no_plaintext_of_stored_attachments(
    files: AttachmentFiles, keys: KeyService
) -> None:
    objects = files.objects
    folder = StackSettings().dir.resolve() / "s3proxy" / "blobs" / objects.bucket
    assert folder.is_dir(), f"S3Proxy's blob folder {folder} is missing (is the stack local?)"
    chat = new_chat(keys)
    stored = [upload(files, chat, canary_file(n)) for n in (100, SEGMENT * 5 + 3)]
    stored.append(upload(files, chat, canary_file(SCRATCH_PART_SIZE + SEGMENT)))  # multipart
    objects.put(f"{chat_prefix(chat)}control", [b"clear " + CANARY + b" clear"])

    def files_holding_canary() -> set[str]:
        return {
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file() and CANARY in path.read_bytes()
        }

    assert files_holding_canary() == {f"{chat_prefix(chat)}control"}  # the scan can find it
    objects.delete(f"{chat_prefix(chat)}control")
    assert files_holding_canary() == set()
    for row in stored:
        assert (folder / row.object_key).is_file()  # each encrypted file is there, and scanned


def test_the_draft_sweep_removes_uploads_never_sent_and_keeps_sent_and_recent_ones(
    files: AttachmentFiles, keys: KeyService, message_store: MessageStore, database: Database
) -> None:
    """An upload no message referenced (the sender changed their mind, or a client uploads
    without ever sending) stayed, bytes and row, until its chat was deleted or retention
    reached it: storage anyone in a chat could fill for good. `sweep_drafts` removes those
    older than the threshold and never a sent file or a recent draft."""
    objects = files.objects
    chat = new_chat(keys)
    now = datetime.now(UTC)
    with database.connection() as conn:
        conn.execute(
            "UPDATE chats SET created_at = %s WHERE chat_id = %s", (now - timedelta(days=5), chat)
        )
    old_ids = SnowflakeIds(15, clock_ms=lambda: int((now - timedelta(days=3)).timestamp() * 1000))
    old_draft = upload(files, chat, canary_file(SEGMENT + 3), old_ids.next_id())
    old_sent = upload(files, chat, os.urandom(10), old_ids.next_id())
    files.share(chat, [old_sent.file_id])
    new_draft = upload(files, chat, os.urandom(10))

    report = sweep_drafts(keys, message_store, objects, timedelta(hours=24), chats=[chat])

    assert (report.drafts_deleted, report.objects_deleted) == (1, 1)
    assert files.get(chat, old_draft.file_id) is None
    with pytest.raises(ObjectNotFound):
        objects.head(old_draft.object_key)
    for kept in (old_sent, new_draft):
        assert files.get(chat, kept.file_id) is not None
        objects.head(kept.object_key)
    again = sweep_drafts(keys, message_store, objects, timedelta(hours=24), chats=[chat])
    assert again.drafts_deleted == 0


def test_a_post_stored_by_the_encryptor_shares_its_attachments(
    files: AttachmentFiles, keys: KeyService, message_store: MessageStore, database: Database
) -> None:
    """A direct producer's post (no gateway in the way) referencing a file: the encryptor
    marks the file sent when it stores the message, so the chat can read it and the draft
    sweep never removes a file a message names. An id naming no file leaves no row behind."""
    chat = new_chat(keys)
    now = datetime.now(UTC)
    with database.connection() as conn:
        conn.execute(
            "UPDATE chats SET created_at = %s WHERE chat_id = %s", (now - timedelta(days=5), chat)
        )
    old_ids = SnowflakeIds(16, clock_ms=lambda: int((now - timedelta(days=3)).timestamp() * 1000))
    photo = upload(files, chat, os.urandom(100), old_ids.next_id())
    missing = old_ids.next_id()
    post = MessageRecord(
        message_id=IDS.next_id(), chat_id=chat, sender_id="ann", text="photo",
        sent_at=datetime.now(UTC), attachment_ids=(photo.file_id, missing),
    )  # fmt: skip
    assert store_batch([_raw(post)], keys, message_store, keys.repo).rejected == []
    row = files.get(chat, photo.file_id)
    assert row is not None and row.shared_at is not None
    assert message_store.attachment(chat, missing) is None
    swept = sweep_drafts(keys, message_store, files.objects, timedelta(hours=24), chats=[chat])
    assert swept.drafts_deleted == 0
    assert files.get(chat, photo.file_id) is not None


def test_a_file_two_messages_reference_goes_with_the_last_of_them(
    files: AttachmentFiles,
    keys: KeyService,
    message_store: MessageStore,
    search_index: SearchIndex,
) -> None:
    """The gateway lets a sender name one of their files in several messages (a forward, a
    repost). Deleting one of them removed the file for all: the other message then named a
    file that answered 404. A file goes when the last message naming it is deleted, by the
    sender (encryptor) or an operator (admin API, CLI)."""
    chat = new_chat(keys)
    photo = upload(files, chat, os.urandom(100))
    posts = [
        MessageRecord(
            message_id=IDS.next_id(),
            chat_id=chat,
            sender_id="ann",
            text=f"photo {i}",
            sent_at=datetime.now(UTC),
            attachment_ids=(photo.file_id,),
        )
        for i in range(3)
    ]
    assert store_batch([_raw(p) for p in posts], keys, message_store, keys.repo).rejected == []
    delete = MessageRecord(
        kind="delete", message_id=posts[0].message_id, event_id=IDS.next_id(), chat_id=chat,
        sender_id="ann", sent_at=datetime.now(UTC),
    )  # fmt: skip
    store_batch([_raw(delete)], keys, message_store, keys.repo, objects=files.objects)
    assert files.get(chat, photo.file_id) is not None, "a sender's deletion took a shared file"
    files.objects.head(photo.object_key)
    done = delete_message(
        message_store, search_index, chat, posts[1].message_id, objects=files.objects
    )
    assert done.found and done.attachments_deleted == 0
    assert files.get(chat, photo.file_id) is not None, "an operator's deletion took it"
    last = delete_message(
        message_store, search_index, chat, posts[2].message_id, objects=files.objects
    )
    assert (last.attachments_deleted, last.attachment_objects_deleted) == (1, 1)
    assert files.get(chat, photo.file_id) is None
    with pytest.raises(ObjectNotFound):
        files.objects.head(photo.object_key)
