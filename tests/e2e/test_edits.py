"""A sender's edits and deletions through the whole pipeline (issue 15): the gateway checks and
publishes them, the encryptor seals the new revision or marks the row deleted, the indexer
follows, and the reader shows the result. Services are real processes on the real stack.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from websockets.sync.client import connect

from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import create_chat, history, post_batch, search, wait_until


def read(pipe: Pipeline, user: str, chat: str, message: str) -> httpx.Response:
    return httpx.get(
        f"{pipe.reader_url}/v1/chats/{chat}/messages/{message}",
        headers=pipe.token(user),
        timeout=30,
    )


def shown(pipe: Pipeline, user: str, chat: str, message: str) -> dict[str, Any] | None:
    """The message as the reader shows it, None while it is not readable."""
    response = read(pipe, user, chat, message)
    return response.json() if response.status_code == 200 else None


def found(pipe: Pipeline, user: str, chat: str, word: str) -> list[str]:
    response = search(pipe, user, chat, word)
    assert response.status_code == 200, response.text
    return [hit["message_id"] for hit in response.json()["messages"]]


def change(pipe: Pipeline, method: str, user: str, chat: str, message: str, **body: Any) -> Any:
    return httpx.request(
        method,
        f"{pipe.ingest_url}/v1/chats/{chat}/messages/{message}",
        json=body or None,
        headers=pipe.token(user),
        timeout=30,
    )


def test_an_edit_shows_as_revision_2_and_the_index_follows(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "alice", ["bob"])
    old, new = f"before{uuid.uuid4().hex[:8]}", f"after{uuid.uuid4().hex[:8]}"
    [message] = post_batch(pipeline, "alice", chat, [f"first words {old}"])
    wait_until(lambda: shown(pipeline, "bob", chat, message) is not None, what="readable")
    wait_until(lambda: found(pipeline, "bob", chat, old) == [message], what="searchable")
    first = shown(pipeline, "bob", chat, message)
    assert first is not None and (first["revision"], first["edited_at"]) == (1, None)

    # Someone else may not edit it; the sender may.
    refused = change(pipeline, "PATCH", "bob", chat, message, text="not yours")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_sender"
    edited = change(pipeline, "PATCH", "alice", chat, message, text=f"second words {new} ✓")
    assert edited.status_code == 202, edited.text
    assert int(edited.json()["event_id"]) > int(message)

    wait_until(
        lambda: (shown(pipeline, "bob", chat, message) or {}).get("revision") == 2,
        what="revision 2 readable",
    )
    now = shown(pipeline, "bob", chat, message)
    assert now is not None and now["text"] == f"second words {new} ✓"
    assert now["edited_at"] is not None and now["sender_id"] == "alice"
    assert [m["text"] for m in history(pipeline, "bob", chat)] == [f"second words {new} ✓"]
    wait_until(lambda: found(pipeline, "bob", chat, new) == [message], what="new words found")
    assert found(pipeline, "bob", chat, old) == []  # the old words no longer match


def test_an_edit_over_the_websocket(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "carol", [])
    [message] = post_batch(pipeline, "carol", chat, ["typed on a phone"])
    wait_until(lambda: shown(pipeline, "carol", chat, message) is not None, what="readable")
    url = pipeline.ingest_url.replace("http://", "ws://") + "/v1/ws"
    headers = pipeline.token("carol")
    with connect(url, additional_headers=headers, open_timeout=30) as ws:
        for text in ("typed on a phone, fixed", "typed on a phone, fixed twice"):
            ws.send(
                json.dumps({"type": "edit", "chat_id": chat, "message_id": message, "text": text})
            )
            reply = json.loads(ws.recv(timeout=30))
            assert reply["ok"] is True and reply["type"] == "edit", reply
    wait_until(
        lambda: (shown(pipeline, "carol", chat, message) or {}).get("revision") == 3,
        what="revision 3 readable",
    )
    now = shown(pipeline, "carol", chat, message)
    assert now is not None and now["text"] == "typed on a phone, fixed twice"


def test_a_sender_deletes_their_own_message(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "dora", ["ed"])
    word = f"regret{uuid.uuid4().hex[:8]}"
    kept, regretted = post_batch(pipeline, "dora", chat, [f"fine {word}", f"oops {word}"])
    wait_until(lambda: len(found(pipeline, "ed", chat, word)) == 2, what="searchable")

    assert change(pipeline, "DELETE", "ed", chat, regretted).json()["error"]["code"] == (
        "not_sender"
    )
    deleted = change(pipeline, "DELETE", "dora", chat, regretted)
    assert deleted.status_code == 202, deleted.text

    # As after an operator's deletion: the reader answers 404, history and search leave it out.
    wait_until(lambda: read(pipeline, "ed", chat, regretted).status_code == 404, what="deleted")
    assert [m["message_id"] for m in history(pipeline, "ed", chat)] == [kept]
    wait_until(lambda: found(pipeline, "ed", chat, word) == [kept], what="index tombstone")
    # Once applied, the gateway refuses to change it again.
    again = change(pipeline, "PATCH", "dora", chat, regretted, text="back?")
    assert again.status_code == 410 and again.json()["error"]["code"] == "message_deleted"
