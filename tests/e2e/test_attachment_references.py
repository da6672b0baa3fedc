"""Attachments on the running pipeline (issue 14, part A): a file uploaded through the gateway,
a message referencing it, and the reader's message JSON naming it, with the services as
processes on the real stack."""

from __future__ import annotations

import os

import httpx

from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import create_chat, history, wait_until


def test_an_uploaded_file_referenced_in_a_message_shows_in_the_reader(pipeline: Pipeline) -> None:
    pipe = pipeline
    chat = create_chat(pipe, "ray", ["sue"])
    contract = os.urandom(300_000)
    uploaded = httpx.post(
        f"{pipe.ingest_url}/v1/chats/{chat}/attachments",
        content=contract,
        headers={**pipe.token("ray"), "Content-Type": "application/pdf"},
        timeout=60,
    )
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["attachment_id"]
    posted = httpx.post(
        f"{pipe.ingest_url}/v1/chats/{chat}/messages",
        json={"text": "the contract, signed", "attachments": [file_id]},
        headers=pipe.token("ray"),
        timeout=30,
    )
    assert posted.status_code == 202, posted.text
    plain = httpx.post(
        f"{pipe.ingest_url}/v1/chats/{chat}/messages",
        json={"text": "no file here"},
        headers=pipe.token("ray"),
        timeout=30,
    )
    assert plain.status_code == 202, plain.text

    wait_until(lambda: len(history(pipe, "sue", chat)) == 2, what="both messages stored")
    shown = {m["text"]: m["attachments"] for m in history(pipe, "sue", chat)}
    assert shown == {"the contract, signed": [file_id], "no file here": []}
    one = httpx.get(
        f"{pipe.reader_url}/v1/chats/{chat}/messages/{posted.json()['message_id']}",
        headers=pipe.token("sue"),
        timeout=30,
    )
    assert one.status_code == 200 and one.json()["attachments"] == [file_id]

    # The file a message names downloads for the other participant; one never sent does not.
    url = f"{pipe.reader_url}/v1/chats/{chat}/attachments"
    sent = httpx.get(f"{url}/{file_id}", headers=pipe.token("sue"), timeout=60)
    assert sent.status_code == 200 and sent.content == contract
    draft = httpx.post(
        f"{pipe.ingest_url}/v1/chats/{chat}/attachments",
        content=b"not sent after all",
        headers={**pipe.token("ray"), "Content-Type": "text/plain"},
        timeout=60,
    )
    assert draft.status_code == 201, draft.text
    draft_url = f"{url}/{draft.json()['attachment_id']}"
    assert httpx.get(draft_url, headers=pipe.token("sue"), timeout=30).status_code == 404
    mine = httpx.get(draft_url, headers=pipe.token("ray"), timeout=30)
    assert mine.status_code == 200 and mine.content == b"not sent after all"
