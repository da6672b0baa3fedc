"""Records published straight to Kafka, as a direct producer (or an attacker with write access
to the topic) would: odd but valid records end stored and searchable, bad ones dead-lettered by
both stages with a reason; neither blocks the partition, and no text reaches a dead letter's
headers, a service log or the index's files."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from opensearchpy import OpenSearch

from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import SearchIndex
from tests.conftest import index_folder, phrases
from tests.e2e.conftest import Pipeline
from tests.e2e.test_pipeline import (
    _dead_letters,
    _headers,
    create_chat,
    post_batch,
    search,
    wait_until,
)
from tests.kafka_records import SealingProducer


def _event_id(value: bytes) -> int:
    """The event id a producer seals a record under: its message id, when it has one."""
    try:
        message_id = json.loads(value)["message_id"]
    except (ValueError, KeyError, TypeError):
        return 1
    return message_id if isinstance(message_id, int) and 1 <= message_id < 2**63 else 1


def test_direct_records_end_stored_or_dead_lettered_and_leak_no_text(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "mallory", ["oscar"])
    key = chat.encode()
    ids = SnowflakeIds(79)

    def record(marker: str, text: str, **fields: Any) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "message_id": ids.next_id(),
            "chat_id": chat,
            "sender_id": "mallory",
            "text": f"{marker} {text}",
            "sent_at": "2026-11-30T12:00:00Z",
            **fields,
        }

    valid = [
        record("zqnulx", "nul \x00 inside"),
        record("zqrtlx", "right \u202e to \u200f left"),
        record("zqcombx", "e\u0301clair n\u0303 combining"),
        record("zqzwjx", "family 👨\u200d👩\u200d👧\u200d👦 zwj"),
        record("zqbigx", "x" * (16 * 1024 - 7)),
        record("zqid1x", "smallest id", message_id=1),
        record("zqidmaxx", "largest id", message_id=2**63 - 1),
        record("zqsendx", "long sender", sender_id="😀" * 128),
        record("zqeastx", "far east", sent_at="2026-01-01T00:00:00+18:00"),
        record("zqwestx", "far west", sent_at="2026-01-01T00:00:00-18:00"),
        record("zqy1x", "year one", sent_at="0001-01-01T18:00:00+18:00"),
        record("zqy9999x", "year 9999", sent_at="9999-12-31T05:59:59.999999-18:00"),
    ]
    values: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = [
        (key, json.dumps(r).encode(), None) for r in valid
    ]
    duplicated = record("zqdupx", "REPLACED")
    dup_value = json.dumps(duplicated)[:-1] + ', "text": "zqdupx second text wins"}'
    values.append((key, dup_value.encode(), [("trace", b"abc"), ("x", b"\xff")]))

    secret = "secret launch words"  # in every bad record: must show up in no header or log
    bad_texts = [
        json.dumps(record("zqbad1x", secret, sent_at="2016-12-31T23:59:60Z")),
        json.dumps(record("zqbad2x", secret, sent_at="2026-01-01T00:00:00")),
        json.dumps(record("zqbad3x", secret, sent_at="9999-12-31T23:59:59-00:01")),
        json.dumps(record("zqbad4x", secret)).replace(secret, secret + " \\ud800"),
        json.dumps(record("zqbad5x", secret, schema_version=2)),
        json.dumps(record("zqbad6x", secret, padding="p" * 900_000)),
        json.dumps({**record("zqbad9x", "x"), secret: 1}),  # text where a field name goes
    ]
    bad: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = [
        (key, v.encode(), None) for v in bad_texts
    ]
    bad += [
        (key, None, None),  # a tombstone on the message topic
        (key, b"", None),
        (key, f'{{"text": "{secret} \xff"}}'.encode("latin-1"), None),  # not UTF-8
        (b"not-the-chat", json.dumps(record("zqbad7x", secret)).encode(), None),
        (None, json.dumps(record("zqbad8x", secret)).encode(), None),
    ]

    # Sealed as every producer must (a keyless record or a tombstone cannot be: it goes as it
    # is and is refused as not sealed); the bad ones are refused for what they hold.
    producer = SealingProducer(pipeline.settings, **{"message.max.bytes": 2_000_000})
    bad_offsets: set[tuple[str, str]] = set()  # (partition, offset) of each bad record

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        bad_offsets.add((str(msg.partition()), str(msg.offset())))

    def send(
        k: bytes | None, v: bytes | None, h: list[tuple[str, bytes]] | None, on: Any = None
    ) -> None:
        if k is None or v is None:
            producer.produce_unsealed(k, v, h, on_delivery=on)
        else:
            producer.produce(k, v, _event_id(v), on_delivery=on, extra_headers=h)

    topic = pipeline.settings.kafka.messages_topic
    for k, v, h in values:
        send(k, v, h)
    for k, v, h in bad:
        # The keyless record lands on any partition: found by its offset and partition below.
        send(k, v, h, delivered)
    producer.close()
    [after] = post_batch(pipeline, "mallory", chat, ["zqafterx the partition flows on"])

    markers = [r["text"].split()[0] for r in valid] + ["zqdupx", "zqafterx"]
    expected = {r["text"].split()[0]: r["text"] for r in valid}
    expected["zqdupx"] = "zqdupx second text wins"
    expected["zqafterx"] = "zqafterx the partition flows on"

    def found(marker: str) -> list[str]:
        response = search(pipeline, "oscar", chat, marker)
        assert response.status_code == 200, response.text
        return [m["text"] for m in response.json()["messages"]]

    for marker in markers:
        wait_until(lambda m=marker: found(m) == [expected[m]], what=f"{marker} searchable")
    assert after

    # Every bad record dead-lettered by both stages, with a reason and no text in the headers.
    def letters_of(got: list[Any]) -> list[dict[str, str]]:
        # Letters of this test's bad records only (other tests share the run's topics).
        return [
            h
            for m in got
            if m.headers()
            and (h := _headers(m)).get("dlq.topic") == topic
            and (h.get("dlq.partition"), h.get("dlq.offset")) in bad_offsets
        ]

    def per_stage(headers: list[dict[str, str]]) -> dict[str, set[tuple[str, str]]]:
        return {
            stage: {
                (h["dlq.partition"], h["dlq.offset"]) for h in headers if h["dlq.stage"] == stage
            }
            for stage in ("encryptor", "indexer")
        }

    letters = _dead_letters(
        pipeline,
        lambda got: all(s == bad_offsets for s in per_stage(letters_of(got)).values()),
    )
    headers = letters_of(letters)
    assert len(bad_offsets) == len(bad)
    for stage, offsets in per_stage(headers).items():
        assert offsets == bad_offsets, (stage, headers)
    for h in headers:
        assert h["dlq.reason"], h
        blob = json.dumps(h)
        assert "secret" not in blob and "launch" not in blob and "zq" not in blob, h

    # No service log holds any text, valid or bad.
    logs = b"".join(p.read_bytes() for p in pipeline.log_dir.glob("*.log"))
    for needle in [secret, *expected.values()]:
        for phrase in phrases(needle):
            assert phrase.encode() not in logs, f"{phrase!r} in a service log"

    # The index's files hold tokens, never a text or two words in their order.
    client = OpenSearch(hosts=[pipeline.settings.opensearch.url])
    index_name = SearchIndex(pipeline.settings.opensearch).index
    client.indices.refresh(index=index_name)
    folder = index_folder(client, index_name)
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    client.close()
    for text in [*expected.values(), secret]:
        for phrase in phrases(text):
            if " " not in phrase and len(phrase) < 1000:
                continue  # a single word is a token, which the index holds by design
            hits = [str(p) for p, d in files.items() if phrase.encode() in d]
            assert not hits, f"{phrase[:40]!r} in {hits}"
    assert uuid.UUID(chat)


def test_odd_search_queries_never_get_a_server_error(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "quinn", ["rita"])
    [posted] = post_batch(pipeline, "quinn", chat, ["Ça va? 東京 สวัสดี zqfindx"])
    wait_until(lambda: search(pipeline, "rita", chat, "zqfindx").json()["messages"], what="indexed")
    queries = [
        "?!...,;",
        "東京",
        "สวัสดี",
        "ÇA VA",
        "c\u0327a",  # NFD of "ça"
        " ".join(f"w{i}" for i in range(100)),
        "y" * 256,
        "漢字" * 128,
        "\x00",
        "\u202e\u200f",
        "👨\u200d👩\u200d👧",
    ]
    statuses = {q[:20]: search(pipeline, "rita", chat, q).status_code for q in queries}
    assert all(code < 500 for code in statuses.values()), statuses
    assert [
        m["message_id"] for m in search(pipeline, "rita", chat, "c\u0327a").json()["messages"]
    ] == [posted]
    # Not valid UTF-8 once percent-decoded (a lone surrogate's bytes): refused, not a 500.
    raw = httpx.get(
        f"{pipeline.reader_url}/v1/chats/{chat}/search?q=%ED%A0%80",
        headers=pipeline.token("rita"),
        timeout=30,
    )
    assert raw.status_code < 500, raw.text
