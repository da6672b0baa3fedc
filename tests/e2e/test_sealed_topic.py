"""The sealed message topic end to end: Kafka's own log segments hold no message text (and the same
scan finds the text when sealing is off, so it can fail), and records that are not sealed or were
tampered with are dead-lettered with the reason while the pipeline flows on."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from schemas.events import MessageRecord
from schemas.ids import SnowflakeIds
from sealstream.record_seal import HEADER_EVENT_ID, HEADER_KEY_ID
from sealstream.services import stop
from sealstream.settings import StackSettings
from tests.e2e.conftest import Pipeline, free_port
from tests.e2e.test_pipeline import (
    _dead_letters,
    _headers,
    create_chat,
    history,
    post_batch,
    wait_until,
)
from tests.kafka_records import SealingProducer

# No hex digit, no lower-case letter, no 'Z' (JSON's UTC times): nothing else in a record
# shares a 4-byte run with these tokens, so lz4 (the producers' compression) keeps them verbatim
# in a plaintext record and the scan cannot miss one.
_TOKEN_ALPHABET = "GHJKLMNPQRSTUVWXY"


def _token() -> str:
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(24))


def kafka_log_files() -> list[Path]:
    """Every file of the local broker's `log.dirs` (segments, indexes, of every topic)."""
    folder = StackSettings().dir / "kafka" / "logs"
    assert folder.is_dir(), f"no Kafka log folder at {folder} (is the local stack up?)"
    return [p for p in folder.rglob("*") if p.is_file()]


def found_in_kafka_logs(tokens: list[str]) -> set[str]:
    found: set[str] = set()
    for path in kafka_log_files():
        try:
            data = path.read_bytes()
        except (FileNotFoundError, PermissionError):  # a segment deleted meanwhile
            continue
        found |= {t for t in tokens if t.encode() in data}
    return found


def _post_one_by_one(url: str, pipe: Pipeline, chat: str, texts: list[str]) -> None:
    # One message per request: each record its own produce batch, so compression never sees
    # two texts together.
    for text in texts:
        response = httpx.post(
            f"{url}/v1/chats/{chat}/messages",
            json={"text": text},
            headers=pipe.token("scanner"),
            timeout=30,
        )
        assert response.status_code == 202, response.text


def test_kafka_log_segments_hold_no_message_text(pipeline: Pipeline) -> None:
    chat = create_chat(pipeline, "scanner", ["reader"])
    sealed_tokens = [_token() for _ in range(20)]
    _post_one_by_one(pipeline.ingest_url, pipeline, chat, [f"secret {t} !" for t in sealed_tokens])
    wait_until(lambda: len(history(pipeline, "reader", chat)) == len(sealed_tokens), what="stored")
    assert found_in_kafka_logs(sealed_tokens) == set(), "message text in Kafka's log segments"

    # The same scan, against a gateway with sealing off, finds every text: the scan can fail.
    port = free_port()
    pipeline.start(
        "ingest",
        key="ingest-unsealed",
        env={"SEALSTREAM_KAFKA__SEAL_RECORDS": "false", "SEALSTREAM_INGEST__PORT": str(port)},
    )
    unsealed_url = f"http://127.0.0.1:{port}"
    try:
        pipeline.wait_http(unsealed_url)
        plain_tokens = [_token() for _ in range(20)]
        # Acknowledged (acks=all) once the 202 is in: the records are in the segment files.
        _post_one_by_one(unsealed_url, pipeline, chat, [f"secret {t} !" for t in plain_tokens])
        assert found_in_kafka_logs(plain_tokens) == set(plain_tokens)
    finally:
        stop([pipeline.procs.pop("ingest-unsealed")])


def test_unsealed_and_tampered_records_are_dead_lettered_and_the_pipeline_flows_on(
    pipeline: Pipeline,
) -> None:
    chat = create_chat(pipeline, "trent", ["uma"])
    ids = SnowflakeIds(94)

    def record(text: str) -> MessageRecord:
        return MessageRecord(
            message_id=ids.next_id(),
            chat_id=uuid.UUID(chat),
            sender_id="trent",
            text=text,
            sent_at=datetime.now(UTC),
        )

    producer = SealingProducer(pipeline.settings)
    plain = record("sent in plaintext by a producer that does not seal")
    producer.produce_unsealed(plain.key(), plain.value())
    forged = record("a sealed record whose last byte was changed")
    sealed, headers = producer.sealer.seal(
        producer.topic, forged.key(), forged.change_id, forged.value()
    )
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 0x01])
    producer.produce_unsealed(forged.key(), tampered, headers=headers)
    # A sealed record whose event id header names another record than its contents.
    other = record("a record sealed under another event id")
    producer.produce(other.key(), other.value(), other.message_id + 1)
    producer.close()
    [after] = post_batch(pipeline, "trent", chat, ["the pipeline flows on after them"])
    wait_until(
        lambda: [m["message_id"] for m in history(pipeline, "uma", chat)] == [after],
        what="the next message stored and none of the three",
    )

    def ours(letters: list[object]) -> list[tuple[dict[str, str], bytes]]:
        return [
            (_headers(m), m.value() or b"")  # type: ignore[attr-defined]
            for m in letters
            if m.key() == chat.encode()  # type: ignore[attr-defined]
        ]

    found = ours(_dead_letters(pipeline, lambda got: len(ours(got)) >= 6))
    for stage in ("encryptor", "indexer"):
        mine = {h["dlq.reason"]: (h, v) for h, v in found if h["dlq.stage"] == stage}
        assert set(mine) == {
            "record is not sealed: header sealstream.key_id missing",
            "sealed value: authentication failed (tampered, or not bound to this topic, record "
            "key, event id and key id)",
            "header sealstream.event_id does not match the record's event id",
        }, (stage, list(mine))
        # Each letter is the record as it came: its value, and its own headers before dlq.*.
        _, unsealed_value = mine["record is not sealed: header sealstream.key_id missing"]
        assert json.loads(unsealed_value)["message_id"] == plain.message_id
        letter_headers, tampered_value = next(v for r, v in mine.items() if "authentic" in r)
        assert tampered_value == tampered
        assert list(letter_headers)[:2] == [HEADER_KEY_ID, HEADER_EVENT_ID]
        assert list(letter_headers)[2].startswith("dlq.")
        assert letter_headers[HEADER_KEY_ID] == headers[0][1].decode()
        assert letter_headers[HEADER_EVENT_ID] == str(forged.change_id)
