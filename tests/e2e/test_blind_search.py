"""The blind index end to end: real gateway, workers, reader and admin processes. A tenant turned
on through the admin API has its messages indexed as keyed tokens by the running indexer, found
by the reader, and absent (words and key) from the OpenSearch data folder, Redis and the logs."""

from __future__ import annotations

import base64
import signal
import time
import uuid
from typing import Any

import httpx
import redis
from opensearchpy import OpenSearch

from sealstream.adapters.postgres import ChatKeyRepository, IndexKeyRepository
from sealstream.auth import mint_token
from sealstream.keys.index_keys import IndexKeys
from tests.conftest import index_folder, phrases
from tests.e2e.conftest import Pipeline

TEXTS = [
    "The heliotrope shipment leaves Rotterdam on Thursday",
    "Le mot de passe est Zygomatique",
    "Встреча перенесена на пятницу",
    "会議は金曜日に変更されました",
]
WORDS = ["heliotrope", "shipment", "rotterdam", "thursday", "zygomatique", "встреча", "пятницу"]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_blind_tenant_is_searchable_and_leaves_no_word_or_key_behind(
    pipeline: Pipeline, database: Any, kms: Any
) -> None:
    settings = pipeline.settings
    tenant = f"e2e-blind-{uuid.uuid4().hex[:8]}"
    cmk = f"{settings.vault.default_key}-{tenant}"
    pipeline.start("admin")
    pipeline.wait_http(pipeline.admin_url)
    admin = pipeline.admin_token()
    try:
        made = httpx.post(
            f"{pipeline.admin_url}/v1/tenants",
            json={"tenant_id": tenant, "kms_key_name": cmk},
            headers=admin,
            timeout=30,
        )
        assert made.status_code == 201, made.text
        on = httpx.post(
            f"{pipeline.admin_url}/v1/tenants/{tenant}/blind-index",
            json={"reason": "e2e"},
            headers=admin,
            timeout=30,
        )
        assert on.status_code == 202, on.text
        job_url = f"{pipeline.admin_url}/v1/jobs/{on.json()['job_id']}"

        def job_done() -> bool:
            state = httpx.get(job_url, headers=admin, timeout=30).json()["state"]
            assert state != "failed"
            return bool(state == "succeeded")

        # Settling (twice the services' 30 s key-list TTL), then the purge's lease wait.
        wait_for(job_done, 400, "the blind index's re-index job")
        state = httpx.get(
            f"{pipeline.admin_url}/v1/tenants/{tenant}/blind-index", headers=admin, timeout=30
        ).json()
        assert state["mode"] == "on", state

        alice = {"Authorization": f"Bearer {mint_token(settings.auth, 'alice', tenant=tenant)}"}
        bob = {"Authorization": f"Bearer {mint_token(settings.auth, 'bob', tenant=tenant)}"}
        chat = httpx.post(
            f"{pipeline.ingest_url}/v1/chats", json={"participants": ["bob"]}, headers=alice
        )
        assert chat.status_code == 201, chat.text
        chat_id = chat.json()["chat_id"]
        posted = httpx.post(
            f"{pipeline.ingest_url}/v1/chats/{chat_id}/messages:batch",
            json={"messages": [{"text": t} for t in TEXTS]},
            headers=alice,
            timeout=30,
        )
        assert posted.status_code == 202, posted.text

        def search(q: str) -> list[str]:
            response = httpx.get(
                f"{pipeline.reader_url}/v1/chats/{chat_id}/search",
                params={"q": q},
                headers=bob,
                timeout=30,
            )
            assert response.status_code == 200, response.text
            return sorted(m["text"] for m in response.json()["messages"])

        wait_for(lambda: search("heliotrope") == [TEXTS[0]], 120, "the blind search hit")
        assert search("ZYGOMATIQUE") == [TEXTS[1]]
        assert search("пятницу") == [TEXTS[2]]
        assert search("金曜日") == [TEXTS[3]]
        assert search("heliotrope zygomatique") == []

        key = IndexKeys(IndexKeyRepository(database), ChatKeyRepository(database), kms).current(
            tenant
        )
        assert key is not None
        secrets = [
            key.material,
            key.material.hex().encode(),
            base64.b64encode(key.material),
            base64.urlsafe_b64encode(key.material).rstrip(b"="),
        ]
        client = OpenSearch(hosts=[settings.opensearch.url])
        index = f"{settings.opensearch.index_prefix}-messages"
        client.indices.flush(index=index)
        folder = index_folder(client, index)
        files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        client.close()
        needles = set(WORDS) | {n for t in TEXTS for n in phrases(t)}
        for needle in needles:
            for encoded in (needle.encode(), needle.encode("utf-16-le")):
                hits = [str(p.relative_to(folder)) for p, d in files.items() if encoded in d]
                assert not hits, f"{needle!r} in {hits}"
        for path, data in files.items():
            assert not any(s in data for s in secrets), f"index key in {path}"
        r = redis.Redis.from_url(settings.redis.url)
        for name in r.scan_iter(count=1000):
            assert not any(s in (r.dump(name) or b"") for s in secrets), name
        r.close()
        for log in pipeline.log_dir.glob("*.log"):
            text = log.read_bytes()
            assert not any(s in text for s in secrets), f"index key in {log.name}"
            assert not any(w.encode() in text for w in WORDS), f"a posted word in {log.name}"
    finally:
        pipeline.signal("admin", signal.SIGTERM)
        kms.delete_key(cmk)
