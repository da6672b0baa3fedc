"""Dead letters for operators, on the running pipeline: records the workers refused are listed
with stage, reason and origin and never their value (CLI and admin API alike); after the fix, a
replay makes the message stored and readable once, and a forced second replay still once; a
letter whose value the dead-letter topic refused cannot be replayed, and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.adapters.kafka import ConsumerGroupsProgress, DeadLetterReader, kafka_client_config
from sealstream.dead_letters import DeadLetterInfo, LetterFilter, list_letters
from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import (
    _set_topic_config,
    create_chat,
    history,
    search,
    wait_until,
)
from tests.kafka_records import SealingProducer

SECRET = "zqdlqsecretx launch words of a refused record"


def produce_to_message_topic(
    pipe: Pipeline, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None
) -> tuple[int, int, int]:
    """Publish one record straight to the message topic, sealed as a direct producer must
    (tests/kafka_records.py), bound to the value's `message_id` when it has a numeric one;
    returns its (partition, offset, sealed size). The only place this module produces."""
    try:
        event_id = int(json.loads(value)["message_id"])
    except (ValueError, KeyError, TypeError):
        event_id = 1  # a poison record: bound to some id, refused for what it holds
    producer = SealingProducer(pipe.settings)
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))

    try:
        sealed = producer.produce(key, value, event_id, on_delivery, extra_headers=headers)
        producer.flush(30)
    finally:
        producer.close()
    [(partition, offset)] = delivered
    return partition, offset, len(sealed)


@pytest.fixture(scope="module")
def admin(pipeline: Pipeline) -> Iterator[Pipeline]:
    pipeline.start("admin", key="admin-dlq")
    try:
        pipeline.wait_http(pipeline.admin_url)
        yield pipeline
    finally:
        pipeline.signal("admin-dlq", signal.SIGTERM)


def letters(pipe: Pipeline, where: LetterFilter) -> list[DeadLetterInfo]:
    reader = DeadLetterReader(pipe.settings.kafka)
    try:
        return list_letters(reader, where, limit=1000).letters
    finally:
        reader.close()


def wait_for_letters(pipe: Pipeline, where: LetterFilter, count: int) -> list[DeadLetterInfo]:
    found: list[DeadLetterInfo] = []

    def enough() -> bool:
        found[:] = letters(pipe, where)
        return len(found) >= count

    wait_until(enough, what=f"{count} dead letters matching {where}")
    return found


def cli(pipe: Pipeline, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`sealstream dlq ...` as an operator runs it, against this run's topics and schema."""
    return subprocess.run(
        [sys.executable, "-m", "sealstream.cli", "dlq", *args],
        env={**pipe.env, "COLUMNS": "300", "NO_COLOR": "1"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def workers_done(pipe: Pipeline) -> None:
    """Wait until both worker groups have handled every record published so far."""
    progress = ConsumerGroupsProgress(pipe.settings.kafka)
    position = progress.position()
    wait_until(lambda: progress.passed(position), what="workers past every record")


def test_unknown_chat_letter_listed_without_value_then_replayed_into_one_message(
    admin: Pipeline,
) -> None:
    pipe = admin
    before = datetime.now(UTC) - timedelta(seconds=1)
    # A post for a chat nobody created yet (the encryptor finds no key: "unknown chat").
    chat = str(uuid.uuid4())
    record = MessageRecord(
        message_id=SnowflakeIds(81).next_id(),
        chat_id=uuid.UUID(chat),
        sender_id="alice",
        text=SECRET,
        sent_at=datetime.now(UTC),
    )
    value = record.value()
    *origin, sealed_size = produce_to_message_topic(
        pipe, chat.encode(), value, [("trace", b"zqtracex")]
    )
    # And a poison record (a field the schema refuses) in a chat that exists: both stages refuse.
    other = create_chat(pipe, "erin", ["frank"])
    poison = json.dumps({"schema_version": 1, "message_id": "not-a-number", "text": SECRET})
    produce_to_message_topic(pipe, other.encode(), poison.encode())

    # Both stages refuse it: the encryptor finds no key, the indexer no chat to file it under.
    found = wait_for_letters(pipe, LetterFilter(chat_id=chat), 2)
    assert sorted(i.stage for i in found) == ["encryptor", "indexer"]
    [letter] = [i for i in found if i.stage == "encryptor"]
    assert (letter.stage, letter.reason) == ("encryptor", f"unknown chat {chat}")
    assert (letter.origin_topic, letter.origin_partition, letter.origin_offset) == (
        pipe.settings.kafka.messages_topic,
        *origin,
    )
    assert letter.value_bytes == sealed_size and letter.value_omitted is None
    assert letter.at >= before
    poisoned = wait_for_letters(pipe, LetterFilter(chat_id=other), 2)
    assert sorted(i.stage for i in poisoned) == ["encryptor", "indexer"]
    assert all("message_id" in i.reason for i in poisoned)

    # Filters: by reason (any case), stage, time and origin topic.
    mine = LetterFilter(chat_id=other)
    assert [i.stage for i in letters(pipe, LetterFilter(chat_id=other, stage="indexer"))] == [
        "indexer"
    ]
    assert letters(pipe, LetterFilter(reason="UNKNOWN CHAT " + chat.upper())) == found
    assert not letters(pipe, LetterFilter(chat_id=other, until=before))
    assert len(letters(pipe, LetterFilter(chat_id=other, since=before))) == 2
    assert not letters(pipe, LetterFilter(chat_id=other, origin_topic="elsewhere"))
    assert len(letters(pipe, mine)) == 2

    # The CLI: the same letter, its metadata only.
    coords = f"{letter.partition}:{letter.offset}"
    listed = cli(pipe, "list", "--chat", chat, "--stage", "encryptor", "--json")
    assert listed.returncode == 0, listed.stderr
    [as_json] = json.loads(listed.stdout)["dead_letters"]
    assert (as_json["partition"], as_json["offset"], as_json["reason"]) == (
        letter.partition,
        letter.offset,
        letter.reason,
    )
    assert as_json["value_bytes"] == sealed_size
    # A letter carries the record's own headers (names only are shown, never their values).
    assert "trace" in as_json["headers"] and "sealstream.key_id" in as_json["headers"]
    outputs = [listed, cli(pipe, "list", "--reason", "unknown chat"), cli(pipe, "show", coords)]
    outputs.append(cli(pipe, "show", coords, "--json"))
    outputs.append(cli(pipe, "list", "--chat", other, "--stage", "indexer"))
    for out in outputs:
        assert out.returncode == 0, out.stderr
        for needle in ("zqdlqsecretx", "launch words", "zqtracex", value.decode()[:30]):
            assert needle not in out.stdout + out.stderr
    assert f"unknown chat {chat}" in outputs[2].stdout and "never" in outputs[2].stdout

    # The admin API: admin auth, then the same letter, metadata only.
    url = f"{pipe.admin_url}/v1/dead-letters"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers=pipe.token("alice"), timeout=30).status_code == 403
    shown_url = f"{url}/{letter.partition}/{letter.offset}"
    assert httpx.get(shown_url, headers=pipe.token("alice"), timeout=30).status_code == 403
    listed_api = httpx.get(
        url, params={"chat_id": chat, "stage": "encryptor"}, headers=pipe.admin_token(), timeout=60
    ).json()
    same = ("partition", "offset", "stage", "reason", "origin_topic", "origin_partition")
    same += ("origin_offset", "chat_id", "value_bytes", "value_omitted", "headers", "replayed")
    [from_api] = listed_api["dead_letters"]
    assert {k: from_api[k] for k in same} == {k: as_json[k] for k in same}
    assert datetime.fromisoformat(from_api["at"]) == datetime.fromisoformat(as_json["at"])
    shown = httpx.get(shown_url, headers=pipe.admin_token(), timeout=60)
    assert shown.status_code == 200, shown.text
    assert shown.json()["reason"] == letter.reason and shown.json()["replayable"] is True
    assert "zq" not in shown.text and "launch" not in shown.text
    missing = httpx.get(f"{url}/{letter.partition}/999999999", headers=pipe.admin_token())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    filtered = httpx.get(
        url, params={"chat_id": other, "stage": "indexer"}, headers=pipe.admin_token(), timeout=60
    ).json()["dead_letters"]
    assert [(d["stage"], d["chat_id"]) for d in filtered] == [("indexer", other)]

    # Not confirmed: nothing is replayed.
    declined = cli(pipe, "replay", coords, stdin="n\n")
    assert declined.returncode == 1
    assert "never" in cli(pipe, "show", coords).stdout

    # The fix: the chat is created (same id), then the letter replayed, with a progress bar.
    created = httpx.post(
        f"{pipe.ingest_url}/v1/chats",
        json={"participants": ["bob"], "chat_id": chat},
        headers=pipe.token("alice"),
        timeout=30,
    )
    assert created.status_code == 201, created.text
    # Both letters (the same record, refused by each stage): two records, one message.
    replayed = cli(pipe, "replay", "--chat", chat, "--yes")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "2 replayed" in replayed.stdout
    assert "zqdlqsecretx" not in replayed.stdout + replayed.stderr
    wait_until(
        lambda: [m["text"] for m in history(pipe, "bob", chat)] == [SECRET],
        what="the replayed message readable",
    )

    # Once: a second replay is skipped, a forced one republishes but makes no second message.
    body = {"letters": [{"partition": letter.partition, "offset": letter.offset}]}
    again = httpx.post(f"{url}/replay", json=body, headers=pipe.admin_token(), timeout=60)
    assert again.status_code == 200, again.text
    assert [r["outcome"] for r in again.json()["results"]] == ["already_replayed"]
    forced = httpx.post(
        f"{url}/replay", json={**body, "force": True}, headers=pipe.admin_token(), timeout=60
    )
    assert [r["outcome"] for r in forced.json()["results"]] == ["replayed"], forced.text
    workers_done(pipe)  # both workers have handled all three replayed records
    assert [m["text"] for m in history(pipe, "bob", chat)] == [SECRET]
    wait_until(
        lambda: len(search(pipe, "bob", chat, "zqdlqsecretx").json().get("messages", [])) >= 1,
        what="searchable",
    )
    hits = search(pipe, "bob", chat, "zqdlqsecretx").json()["messages"]
    assert [h["message_id"] for h in hits] == [str(record.message_id)]
    assert letters(pipe, LetterFilter(chat_id=chat)) == found  # no replay refused again

    shown = httpx.get(shown_url, headers=pipe.admin_token(), timeout=60).json()
    assert shown["replayed"]["times"] == 2 and shown["replayed"]["last_by"] == "admin:ops"
    audit = httpx.get(
        f"{pipe.admin_url}/v1/audit", params={"chat_id": chat}, headers=pipe.admin_token()
    ).json()
    actors = [e["actor"] for e in audit if e["action"] == "dead_letter_replayed"]
    assert actors[0] == "admin:ops" and len(actors) == 3
    assert all(a.startswith("cli:") for a in actors[1:])


def test_letter_without_its_value_cannot_be_replayed(admin: Pipeline) -> None:
    pipe = admin
    kafka = pipe.settings.kafka
    chat = create_chat(pipe, "gina", ["hugo"])
    kafka_admin = AdminClient(kafka_client_config(kafka))
    # The dead-letter topic takes at most 16 KiB: a larger refused record is lettered without it.
    _set_topic_config(kafka_admin, kafka.dead_letter_topic, "max.message.bytes", "16384")
    try:
        produce_to_message_topic(pipe, chat.encode(), b"not json " + os.urandom(32_000))
        found = wait_for_letters(pipe, LetterFilter(chat_id=chat), 2)
    finally:
        _set_topic_config(kafka_admin, kafka.dead_letter_topic, "max.message.bytes", None)
    letter = found[0]
    assert letter.value_bytes is None and "MSG_SIZE_TOO_LARGE" in (letter.value_omitted or "")
    coords = f"{letter.partition}:{letter.offset}"

    refused = cli(pipe, "replay", coords, "--yes")
    assert refused.returncode == 1
    assert "refused" in refused.stdout and "no value" in refused.stdout, refused.stdout
    shown = cli(pipe, "show", coords)
    assert "replayable" in shown.stdout and "no: the letter has no value" in shown.stdout

    url = f"{pipe.admin_url}/v1/dead-letters"
    body = {"letters": [{"partition": letter.partition, "offset": letter.offset}], "force": True}
    answer = httpx.post(f"{url}/replay", json=body, headers=pipe.admin_token(), timeout=60)
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    assert result["outcome"] == "refused" and "no value" in result["detail"]
    assert result["replayed_to_offset"] is None
    unauthorised = httpx.post(f"{url}/replay", json=body, headers=pipe.token("gina"), timeout=30)
    assert unauthorised.status_code == 403
    shown_api = httpx.get(
        f"{url}/{letter.partition}/{letter.offset}", headers=pipe.admin_token(), timeout=60
    ).json()
    assert shown_api["replayable"] is False and shown_api["replayed"] is None
