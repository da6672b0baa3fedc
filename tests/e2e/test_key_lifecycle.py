"""Every key-lifecycle operation through the admin HTTP API, on the running pipeline: messages
go in through the gateway and come back out of the reader before and after each operation."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sealstream.adapters.cassandra import MessageStore
from sealstream.auth import mint_token
from sealstream.wiring import key_service
from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import create_chat, history, post_batch, search, wait_until


@pytest.fixture(scope="module")
def admin(pipeline: Pipeline) -> Iterator[Pipeline]:
    pipeline.start("admin")
    try:
        pipeline.wait_http(pipeline.admin_url)
        yield pipeline
    finally:
        if "admin" in pipeline.procs:
            pipeline.signal("admin", signal.SIGTERM)


@pytest.fixture(scope="module")
def store(admin: Pipeline) -> Iterator[MessageStore]:
    store = MessageStore(admin.settings.cassandra)
    store.connect()
    yield store
    store.close()


def call(pipe: Pipeline, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, f"{pipe.admin_url}{path}", headers=pipe.admin_token(), timeout=60, **kwargs
    )


def finished(pipe: Pipeline, response: httpx.Response) -> dict[str, Any]:
    """Wait for the background job a 202 started; return its final state."""
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = call(pipe, "GET", f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            assert job["state"] == "succeeded", job
            return dict(job["result"])
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def readable(pipe: Pipeline, chat: str, texts: list[str]) -> None:
    """Wait until the reader returns exactly `texts` (newest first) for the chat."""
    wait_until(
        lambda: [m["text"] for m in history(pipe, "alice", chat)] == texts[::-1],
        what=f"{len(texts)} readable messages",
    )


def versions_in_store(store: MessageStore, chat: str) -> list[int]:
    rows = store.scan_chat(uuid.UUID(chat), 0, int(time.time() * 1000) + 60_000)
    return sorted(row.dek_version for row in rows)


def test_admin_api_needs_the_admin_role(admin: Pipeline) -> None:
    url = f"{admin.admin_url}/v1/audit"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers=admin.token("alice"))
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    assert httpx.get(url, headers=admin.admin_token()).status_code == 200


def test_rotation_then_history_reencryption(admin: Pipeline, store: MessageStore) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    before = [f"before rotation {i} {uuid.uuid4().hex}" for i in range(10)]
    post_batch(admin, "alice", chat, before)
    readable(admin, chat, before)

    rotated = call(admin, "POST", f"/v1/chats/{chat}/keys/rotate", json={"reason": "e2e"})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["dek_version"] == 2

    # Every encryptor seals with the new version right away, without a restart.
    after = [f"after rotation {i} {uuid.uuid4().hex}" for i in range(10)]
    post_batch(admin, "alice", chat, after)
    readable(admin, chat, before + after)
    assert versions_in_store(store, chat) == [1] * 10 + [2] * 10
    keys = call(admin, "GET", f"/v1/chats/{chat}/keys").json()
    assert [(v["dek_version"], v["state"]) for v in keys["versions"]] == [
        (1, "retired"),
        (2, "active"),
    ]
    assert "encrypted_dek" not in str(keys) and "vault:" not in str(keys)

    # Re-encrypt the history to version 2: every row moves, every message still reads.
    result = finished(admin, call(admin, "POST", f"/v1/chats/{chat}/keys/reencrypt", json={}))
    assert result["rows_examined"] == 20 and result["rows_reencrypted"] == 10
    assert versions_in_store(store, chat) == [2] * 20
    readable(admin, chat, before + after)

    audit = call(admin, "GET", "/v1/audit", params={"chat_id": chat}).json()
    actions = {(e["action"], e["actor"]) for e in audit}
    assert ("dek_rotated", "admin:ops") in actions
    assert ("history_reencrypted", "admin:ops") in actions


def test_tenant_batch_rotation_and_master_key_rewrap(admin: Pipeline) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    key_name = f"{tenant}-cmk"
    added = call(admin, "POST", "/v1/tenants", json={"tenant_id": tenant, "kms_key_name": key_name})
    assert added.status_code == 201, added.text
    # Only a token of the tenant may create chats in it.
    refused = httpx.post(
        f"{admin.ingest_url}/v1/chats",
        json={"participants": ["bob"], "tenant_id": tenant},
        headers=admin.token("alice"),
    )
    assert refused.status_code == 403
    member = {"Authorization": f"Bearer {mint_token(admin.settings.auth, 'alice', tenant=tenant)}"}
    chats = []
    for _ in range(3):
        response = httpx.post(
            f"{admin.ingest_url}/v1/chats", json={"participants": ["bob"]}, headers=member
        )
        assert response.status_code == 201, response.text
        chats.append(response.json()["chat_id"])
    texts = {chat: [f"tenant message {chat} {i}" for i in range(5)] for chat in chats}
    for chat in chats:
        post_batch(admin, "alice", chat, texts[chat])

    # Batch rotation of every chat of the tenant (and only of it).
    rotation = finished(
        admin,
        call(admin, "POST", "/v1/rotations", json={"all_chats": True, "tenant_id": tenant}),
    )
    assert rotation["rotated"] == 3

    # Master-key rotation: every DEK of the tenant (3 chats x 2 versions) rewrapped, then the old
    # master-key version retired; the messages still read.
    master = finished(
        admin,
        call(admin, "POST", f"/v1/tenants/{tenant}/master-key/rotate", json={"retire_old": True}),
    )
    assert master["kms_key_name"] == key_name and master["master_key_version"] == 2
    assert master["rewrapped"] == 6 and master["old_versions_retired"] is True
    for chat in chats:
        readable(admin, chat, texts[chat])
    # A process with empty caches unwraps both versions with the new master key only.
    with key_service(admin.settings, actor="e2e") as keys:
        for chat in chats:
            for dek in keys.repo.deks(uuid.UUID(chat)):
                assert dek.encrypted_dek is not None
                assert dek.encrypted_dek.startswith("vault:v2:")
                assert keys.key(uuid.UUID(chat), dek.dek_version).version == dek.dek_version


def test_delete_message_and_delete_chat(admin: Pipeline, store: MessageStore) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    token = f"shredme{uuid.uuid4().hex[:8]}"
    texts = [f"{token} number {i}" for i in range(20)]
    ids = post_batch(admin, "alice", chat, texts)
    readable(admin, chat, texts)
    wait_until(
        lambda: len(search(admin, "alice", chat, token).json()["messages"]) == 20,
        what="20 search hits",
    )

    # One message: gone from reads and search at once.
    gone = call(admin, "DELETE", f"/v1/chats/{chat}/messages/{ids[0]}")
    assert gone.status_code == 200, gone.text
    url = f"{admin.reader_url}/v1/chats/{chat}/messages/{ids[0]}"
    assert httpx.get(url, headers=admin.token("alice")).status_code == 404
    assert len(history(admin, "alice", chat)) == 19
    hits = search(admin, "alice", chat, token).json()["messages"]
    assert ids[0] not in {m["message_id"] for m in hits}
    assert call(admin, "DELETE", f"/v1/chats/{chat}/messages/{ids[0]}").status_code == 404

    # The whole chat: crypto-shredded, with a receipt; every API says 410 from then on.
    receipt = call(admin, "DELETE", f"/v1/chats/{chat}", params={"reason": "user erasure"})
    assert receipt.status_code == 200, receipt.text
    body = receipt.json()
    assert body["dek_versions_destroyed"] == [1]
    assert body["index_documents_deleted"] == 19 and body["rows_deleted"] == 20
    alice = admin.token("alice")
    assert (
        httpx.get(f"{admin.reader_url}/v1/chats/{chat}/messages", headers=alice).status_code == 410
    )
    assert search(admin, "alice", chat, token).status_code == 410
    post = httpx.post(
        f"{admin.ingest_url}/v1/chats/{chat}/messages", json={"text": "more"}, headers=alice
    )
    assert post.status_code == 410
    assert versions_in_store(store, chat) == []


def test_retention_via_admin_api(admin: Pipeline) -> None:
    chat = create_chat(admin, "alice", ["bob"])
    texts = [f"short lived {i}" for i in range(5)]
    post_batch(admin, "alice", chat, texts)
    readable(admin, chat, texts)
    set_days = call(admin, "PUT", f"/v1/chats/{chat}/retention", json={"days": 1})
    assert set_days.status_code == 200 and set_days.json()["retention_days"] == 1
    # Nothing is a day old yet: the run removes nothing from this chat.
    report = finished(admin, call(admin, "POST", "/v1/retention/runs"))
    assert report["chats"] >= 1
    # The run also destroys topic keys past the message topic's retention: none is, yet.
    assert report["topic_keys_destroyed"] == 0
    readable(admin, chat, texts)
    bad = call(admin, "PUT", f"/v1/chats/{chat}/retention", json={"days": 0})
    assert bad.status_code == 422 and "days" in bad.text


def test_policy_rotation_by_messages_sealed(admin: Pipeline) -> None:
    tenant = f"busy-{uuid.uuid4().hex[:8]}"
    added = call(admin, "POST", "/v1/tenants", json={"tenant_id": tenant, "kms_key_name": tenant})
    assert added.status_code == 201, added.text
    member = {"Authorization": f"Bearer {mint_token(admin.settings.auth, 'alice', tenant=tenant)}"}
    busy, quiet = (
        httpx.post(f"{admin.ingest_url}/v1/chats", json={}, headers=member).json()["chat_id"]
        for _ in range(2)
    )
    busy_texts = [f"busy {i}" for i in range(30)]
    quiet_texts = [f"quiet {i}" for i in range(5)]
    post_batch(admin, "alice", busy, busy_texts)
    post_batch(admin, "alice", quiet, quiet_texts)
    readable(admin, busy, busy_texts)
    readable(admin, quiet, quiet_texts)
    # The encryptor counted the messages each version sealed; the policy run rotates the chat
    # whose version sealed at least 25, and only that one.
    result = finished(
        admin,
        call(admin, "POST", "/v1/rotations", json={"max_messages": 25, "tenant_id": tenant}),
    )
    assert result["rotated"] == 1
    versions = {
        chat: [v["state"] for v in call(admin, "GET", f"/v1/chats/{chat}/keys").json()["versions"]]
        for chat in (busy, quiet)
    }
    assert versions == {busy: ["retired", "active"], quiet: ["active"]}
    missing = call(admin, "POST", "/v1/rotations", json={})
    assert missing.status_code == 422 and "max_messages" in missing.text
    typo = call(admin, "POST", "/v1/rotations", json={"max_mesages": 25})
    assert typo.status_code == 422 and "max_mesages" in typo.text
